"""GET /metrics, timing headers and the access log, through the real app over fake backends."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from service.app import create_app
from service.backends.fake import FakeBackend
from service.model_entry import ModelEntry
from service.settings import ServiceSettings
from tests.helpers import make_registry, scrape, value


def test_every_series_exists_before_the_first_request(client):
    s = scrape(client)
    for model in ("minilm", "clf"):
        assert value(s, "bertserve_requests_total", model=model, route="/v1/embeddings", code="200",
                     protocol="http") == 0
        assert value(s, "bertserve_request_duration_seconds_count", model=model, route="/embed", protocol="http") == 0
        for name in ("bertserve_queue_wait_seconds_count", "bertserve_inference_seconds_count",
                     "bertserve_batch_size_count", "bertserve_batch_tokens_count",
                     "bertserve_batch_padding_ratio_count", "bertserve_tokenization_seconds_count",
                     "bertserve_input_tokens_total", "bertserve_inference_errors_total"):
            assert value(s, name, model=model) == 0, name
        for reason in ("overloaded", "timeout", "too_large", "invalid"):
            assert value(s, "bertserve_rejections_total", model=model, reason=reason) == 0
        assert value(s, "bertserve_model_ready", model=model, version="1") == 1
        assert value(s, "bertserve_queue_depth", model=model) == 0
        assert value(s, "bertserve_model_load_failures_total", model=model) == 0
    assert value(s, "bertserve_model_info", model="minilm", version="1", format="onnx", precision="fp32",
                 provider="cpu") == 1
    # Millisecond resolution at the low end, so p99 of a fast request is readable.
    assert ("bertserve_request_duration_seconds_bucket",
            tuple(sorted({"model": "minilm", "route": "/v1/embeddings", "protocol": "http",
                          "le": "0.005"}.items()))) in s
    assert any(name == "process_resident_memory_bytes" for name, _ in s)


def test_requests_batches_and_tokens_are_counted(client):
    texts = ["one short text", "another one that is a bit longer than the first", "third"]
    tokens = sum(len(e) for e in client.registry.get("minilm").tokenizer.encode_texts(texts, False))
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda t: client.post("/v1/embeddings", json={"input": t}), texts))
    assert all(r.status_code == 200 for r in answers)
    assert client.post("/embed", json={"inputs": texts}).status_code == 200
    s = scrape(client)
    assert value(s, "bertserve_requests_total", model="minilm", route="/v1/embeddings", code="200",
                 protocol="http") == 3
    assert value(s, "bertserve_requests_total", model="minilm", route="/embed", code="200", protocol="http") == 1
    assert value(s, "bertserve_request_duration_seconds_count", model="minilm", route="/v1/embeddings",
                 protocol="http") == 3
    assert value(s, "bertserve_input_tokens_total", model="minilm") == 2 * tokens
    assert value(s, "bertserve_batch_size_sum", model="minilm") == 6  # every item ran in some batch
    assert value(s, "bertserve_queue_wait_seconds_count", model="minilm") == 6
    assert value(s, "bertserve_inference_seconds_count", model="minilm") == \
        value(s, "bertserve_batch_size_count", model="minilm") >= 1
    assert value(s, "bertserve_batch_padding_ratio_count", model="minilm") >= 1
    assert value(s, "bertserve_tokenization_seconds_count", model="minilm") == 4


def test_rejections_by_reason_and_no_label_from_the_body(client):
    assert client.post("/v1/embeddings", json={"input": "x", "model": "made-up-name"}).status_code == 404
    assert client.post("/v1/embeddings", json={"input": ["x"] * 17}).status_code == 413
    assert client.post("/v1/embeddings", json={"input": 5}).status_code == 422
    assert client.post("/v1/embeddings", content=b"x" * 30_000,
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/embed", json={"inputs": "   "}).status_code == 422
    s = scrape(client)
    assert not any("made-up-name" in str(labels) for _, labels in s)
    assert value(s, "bertserve_rejections_total", model="none", reason="not_found") == 1
    assert value(s, "bertserve_rejections_total", model="minilm", reason="too_large") == 1  # resolved, then too many
    assert value(s, "bertserve_rejections_total", model="none", reason="too_large") == 1  # body over the limit
    assert value(s, "bertserve_rejections_total", model="none", reason="invalid") == 1  # wrong JSON type
    assert value(s, "bertserve_rejections_total", model="minilm", reason="invalid") == 1  # empty text
    assert value(s, "bertserve_requests_total", model="none", route="/v1/embeddings", code="404", protocol="http") == 1


def test_overload_timeouts_and_failed_batches_are_counted(tmp_path):
    settings = ServiceSettings(model_store=tmp_path, max_batch_size=1, max_queue_delay_ms=0, max_queue_items=1)
    backend = FakeBackend(dim=8, delay_s=0.3)
    registry = make_registry(tmp_path, settings, {"minilm": backend})
    backend.fail_when_token = int(registry.get("minilm").tokenizer.encode_texts(["explode"], False)[0].ids[1])
    with TestClient(create_app(settings, registry=registry)) as client:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda i: client.post("/v1/embeddings", json={"input": f"text {i}"},
                                                        headers={"x-request-timeout": "0.2"}).status_code,
                                  range(6)))
        assert client.post("/v1/embeddings", json={"input": "explode"}).status_code == 500
        s = scrape(client)
    assert value(s, "bertserve_rejections_total", model="minilm", reason="overloaded") == codes.count(429) > 0
    timeouts = value(s, "bertserve_rejections_total", model="minilm", reason="timeout")
    assert timeouts == codes.count(503)
    assert value(s, "bertserve_inference_errors_total", model="minilm") == 1
    assert value(s, "bertserve_requests_total", model="minilm", route="/v1/embeddings", code="500",
                 protocol="http") == 1


def test_failed_load_is_counted_and_not_ready(tmp_path):
    settings = ServiceSettings(model_store=tmp_path)
    registry = make_registry(tmp_path, settings, {"minilm": FakeBackend(dim=8)})
    # What Registry.load leaves behind for a variant whose files do not match its manifest.
    registry.entries[("broken", 1)] = ModelEntry(name="broken", version=1, path=tmp_path, status="failed",
                                                 reason="sha256 mismatch")
    registry.load_failures["broken"] += 1
    with TestClient(create_app(settings, registry=registry)) as client:
        s = scrape(client)
    assert value(s, "bertserve_model_load_failures_total", model="broken") == 1
    assert value(s, "bertserve_model_ready", model="broken", version="1") == 0
    assert value(s, "bertserve_model_ready", model="minilm", version="1") == 1


def test_timing_headers_and_request_id(client):
    r = client.post("/v1/embeddings", json={"input": "timing please"}, headers={"x-request-id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    for name in ("x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time"):
        assert float(r.headers[name]) >= 0, name
    assert float(r.headers["x-total-time"]) >= float(r.headers["x-inference-time"])


def test_access_log_is_one_json_object_without_the_text(client, caplog):
    from service.observability import JsonLogFormatter

    secret = "my private sentence about nothing"
    with caplog.at_level(logging.INFO, logger="bertserve.access"):
        client.post("/v1/embeddings", json={"input": secret}, headers={"x-request-id": "log-me"})
        client.get("/metrics")  # scrapes and probes stay out of the access log
        client.get("/v2/health/ready")
    records = [r for r in caplog.records if r.name == "bertserve.access"]
    assert len(records) == 1
    line = JsonLogFormatter().format(records[0])
    entry = json.loads(line)
    assert entry["request_id"] == "log-me" and entry["route"] == "/v1/embeddings"
    assert entry["model"] == "minilm" and entry["status"] == 200 and entry["duration_ms"] >= 0
    assert secret not in line


def test_overload_refusals_are_logged_as_one_counted_line_per_second(tmp_path, caplog, monkeypatch):
    from service.observability import RefusalLog

    settings = ServiceSettings(model_store=tmp_path)
    registry = make_registry(tmp_path, settings, {"minilm": FakeBackend(dim=8)})
    batcher = registry.entries[("minilm", 1)].batcher
    with caplog.at_level(logging.INFO, logger="bertserve.access"), \
            TestClient(create_app(settings, registry=registry)) as client:
        monkeypatch.setattr(batcher.admission, "saturated", lambda items: True)
        assert {client.post("/v1/embeddings", json={"input": "hi"}).status_code for _ in range(20)} == {429}
        client.post("/v1/embeddings", json={"input": "x", "model": "nope"})  # other errors: a line each
    lines = [r.fields for r in caplog.records if r.name == "bertserve.access"]
    # The 404 has its own line; the 20 refusals at most a counted line per second, never one each.
    assert [line["status"] for line in lines if line["status"] != 429] == [404]
    refusal_lines = [line for line in lines if line["status"] == 429]
    assert len(refusal_lines) <= 2 and all(line["refused"] >= 1 for line in refusal_lines)
    # The last window is flushed too (on its timer, and at shutdown): every refusal is in the log.
    assert sum(line["refused"] for line in refusal_lines) == 20

    clock = iter([0.0, 0.2, 0.4, 1.1, 1.3]).__next__
    log = RefusalLog(interval_s=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="bertserve.access"):
        caplog.clear()
        for _ in range(3):
            log.note("minilm", "/v1/embeddings")
        log.note("minilm", "/embed")
    (line,) = [r.fields for r in caplog.records if r.name == "bertserve.access"]
    assert line == {"route": "/v1/embeddings", "model": "minilm", "status": 429, "error_type": "overloaded",
                    "refused": 3, "window_s": 1.1}
