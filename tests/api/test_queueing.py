"""Overload, deadlines, disconnects and backend faults: each fails only the requests it concerns."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from fastapi.testclient import TestClient

from service import model_entry
from service.app import create_app
from service.backends.fake import FakeBackend
from service.settings import ServiceSettings
from tests.helpers import LiveServer, make_registry


def token_id(registry, word: str) -> int:
    return int(registry.get("minilm").tokenizer.encode_texts([word], False)[0].ids[1])


def slow_client(tmp_path, delay_s=0.3, **overrides):
    settings = ServiceSettings(model_store=tmp_path, max_batch_size=1, max_queue_delay_ms=0, **overrides)
    backend = FakeBackend(dim=8, delay_s=delay_s)
    registry = make_registry(tmp_path, settings, {"minilm": backend})
    return TestClient(create_app(settings, registry=registry)), backend, registry


def test_expired_items_get_503_and_never_reach_the_backend(tmp_path):
    client, backend, registry = slow_client(tmp_path, delay_s=0.4)
    words = ["alpha", "bravo", "charlie", "delta"]
    with client:
        def call(word):
            return word, client.post("/v1/embeddings", json={"input": word}, headers={"x-request-timeout": "0.2"})

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, words))
    timed_out = [w for w, r in results if r.status_code == 503]
    assert timed_out, [r.status_code for _, r in results]
    for word, r in results:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "timeout"
        else:
            assert r.status_code == 200
    seen = {t for row in backend.seen_ids for t in row}
    for word in timed_out:
        assert token_id(registry, word) not in seen, word


def test_bad_timeout_header(tmp_path):
    client, _, _ = slow_client(tmp_path, delay_s=0)
    with client:
        r = client.post("/v1/embeddings", json={"input": "x"}, headers={"x-request-timeout": "soon"})
        assert r.status_code == 422 and "x-request-timeout" in r.json()["error"]["message"]


def test_full_queue_answers_429_at_once_with_retry_after(tmp_path):
    client, _, _ = slow_client(tmp_path, delay_s=0.3, max_queue_items=2)
    with client:
        def call(i):
            start = time.monotonic()
            r = client.post("/v1/embeddings", json={"input": f"text number {i}"})
            return r, time.monotonic() - start

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(call, range(10)))
    rejected = [(r, t) for r, t in results if r.status_code == 429]
    accepted = [r for r, _ in results if r.status_code == 200]
    assert rejected and accepted
    for r, _elapsed in rejected:
        assert r.json()["error"]["type"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    assert len(accepted) + len(rejected) == 10


def test_backend_failure_fails_only_its_batch_and_hides_internals(tmp_path):
    settings = ServiceSettings(model_store=tmp_path, max_batch_size=1)
    registry = make_registry(tmp_path, settings, {"minilm": FakeBackend(dim=8)})
    registry.get("minilm").backends[0].fail_when_token = token_id(registry, "explode")
    with TestClient(create_app(settings, registry=registry)) as client:
        bad = client.post("/v1/embeddings", json={"input": "explode now"})
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "inference_failed"
        assert "secret" not in bad.text and "RuntimeError" not in bad.text
        assert client.post("/v1/embeddings", json={"input": "calm text"}).status_code == 200


def test_disconnected_client_items_are_dropped_before_inference(tmp_path):
    settings = ServiceSettings(model_store=tmp_path, max_batch_size=1, max_queue_delay_ms=0)
    backend = FakeBackend(dim=8, delay_s=2.0)
    registry = make_registry(tmp_path, settings, {"minilm": backend})
    batcher = registry.entries[("minilm", 1)].batcher

    def wait_until(condition, what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            time.sleep(0.01)

    with LiveServer(create_app(settings, registry=registry)) as live:
        port = live.port
        # The first request occupies the only worker for 2 s.
        blocker = threading.Thread(target=lambda: httpx.post(f"http://127.0.0.1:{port}/v1/embeddings",
                                                             json={"input": "blocker"}, timeout=10))
        blocker.start()
        wait_until(lambda: len(backend.batches) == 1, "the blocker is in inference")
        body = b'{"input": "vanished"}'
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until(lambda: batcher.queue_depth == 1, "the request is queued behind the blocker")
        # The client went away while its item waited: the item leaves the queue before inference.
        wait_until(lambda: batcher.queue_depth == 0, "the vanished client's item is dropped")
        blocker.join(timeout=10)
        after = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "after"}, timeout=10)
        assert after.status_code == 200
        seen = {t for row in backend.seen_ids for t in row}
        assert token_id(registry, "blocker") in seen and token_id(registry, "after") in seen
        assert token_id(registry, "vanished") not in seen


def test_empty_store_starts_not_ready_and_says_why_in_the_log_only(tmp_path, caplog):
    settings = ServiceSettings(model_store=tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with TestClient(create_app(settings)) as client:
        health = client.get("/health")
        ready = client.get("/v2/health/ready")
        assert health.status_code == 503 and ready.status_code == 503
        # Why is the operator's business (the log, the admin index); probes see no filesystem path.
        for answer in (health, ready, client.get("/v2/models/minilm/ready")):
            assert str(tmp_path) not in answer.text and "empty" not in answer.text, answer.text
        assert any("holds no variants" in r.getMessage() for r in caplog.records)
        assert client.get("/v2/health/live").status_code == 200
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 404


def test_saturated_model_is_refused_at_the_door_before_any_route_work(tmp_path, monkeypatch):
    settings = ServiceSettings(model_store=tmp_path)
    backend = FakeBackend(dim=8)
    registry = make_registry(tmp_path, settings, {"minilm": backend})
    batcher = registry.entries[("minilm", 1)].batcher
    with TestClient(create_app(settings, registry=registry)) as client:
        reached_route = []
        monkeypatch.setattr(model_entry, "check", lambda *a, **k: reached_route.append(a))
        monkeypatch.setattr(batcher.admission, "saturated", lambda items: True)
        for path, body in [("/v1/embeddings", {"input": "hello"}), ("/embed", {"inputs": "hello"}),
                           ("/tokenize", {"inputs": ["hello"] * 3}),
                           ("/v2/models/minilm/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                                   "data": ["hello"]}]})]:
            r = client.post(path, json=body, headers={"x-request-id": "shed-1"})
            assert r.status_code == 429, (path, r.text)
            assert int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"] == "shed-1"
            assert r.json()["error"]["type"] == "overloaded" and r.json()["error"]["request_id"] == "shed-1"
        # Refused before the route validated or tokenized anything (the KServe route checks its own way).
        assert reached_route == [] and backend.seen_ids == []
        # What the door cannot read plainly still gets the routes' own answers.
        assert client.post("/v1/embeddings", content=b"{not json",
                           headers={"content-type": "application/json"}).status_code == 422
        assert client.post("/v1/embeddings", json={"input": "x", "model": "nope"}).status_code == 404
        metrics = client.get("/metrics").text
        assert 'bertserve_rejections_total{model="minilm",reason="overloaded"} 4.0' in metrics
        # Counted under the route each was for, though refused before routing.
        for route in ("/v1/embeddings", "/embed", "/tokenize", "/v2/models/{model}/infer"):
            series = f'bertserve_requests_total{{code="429",model="minilm",protocol="http",route="{route}"}}'
            assert f"{series} 1.0" in metrics, route
        assert 'route="unmatched"' not in metrics
        monkeypatch.undo()
        assert client.post("/v1/embeddings", json={"input": "hello"}).status_code == 200
        # Admitted at the door, then answered by the route (served, or refused as bad input): every
        # request's ticket is given back.
        assert client.post("/v1/embeddings", json={"input": ["a", ""]}).status_code == 422
        assert client.post("/embed", json={"inputs": ["a", "b"]}).status_code == 200
        assert batcher.admission.held == 0


def test_closed_loop_clients_within_what_the_queue_holds_are_never_refused(tmp_path):
    # A batch-indexing job: 8 clients, each sending 16 texts (tweets and news up to 256 tokens) and the
    # next only after its answer. The model runs at a fixed speed near the real MiniLM's on one core
    # (0.2 ms per padded token), two instances, every setting at its default. Together the requests
    # are far less work than the queue is sized for (max_queue_wait_ms), so none may be refused.
    settings = ServiceSettings(model_store=tmp_path, access_log=False)
    backend = FakeBackend(dim=8, per_token_s=0.0002)
    registry = make_registry(tmp_path, settings, {"minilm": backend}, max_seq_len=256, instances=2)
    tweet = "Watching the debate tonight, the economy answers were weak and nobody talked about trade"
    news = ("Oil prices rose sharply on Monday after the producers agreed to cut output, traders said, "
            "while wheat exports fell for a third week and the central bank held its rates. ") * 8
    bodies = [{"inputs": [news if (i + j) % 2 else tweet for j in range(16)], "truncate": True} for i in range(8)]
    statuses: list[int] = []
    with LiveServer(create_app(settings, registry=registry)) as live:
        def client(i: int) -> None:
            with httpx.Client(base_url=live.url, timeout=60) as http:
                for _ in range(3):
                    statuses.append(http.post("/embed", json=bodies[i]).status_code)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8)))
    assert statuses == [200] * 24, statuses


def test_a_request_larger_than_the_whole_queue_is_413_on_every_route_not_a_429_to_retry(tmp_path):
    # max_inputs_per_request above max_queue_items: no retry could ever fit such a request, so it must
    # not be told to retry later; the door lets it through and the model entry's admission answers.
    settings = ServiceSettings(model_store=tmp_path, max_queue_items=4, max_inputs_per_request=16)
    backend = FakeBackend(dim=8)
    registry = make_registry(tmp_path, settings, {"minilm": backend})
    texts = [f"text {i}" for i in range(6)]
    with TestClient(create_app(settings, registry=registry)) as client:
        for path, body in [("/v1/embeddings", {"input": texts}), ("/embed", {"inputs": texts}),
                           ("/v2/models/minilm/infer", {"inputs": [{"name": "text", "shape": [6], "datatype": "BYTES",
                                                                   "data": texts}]})]:
            r = client.post(path, json=body)
            assert r.status_code == 413, (path, r.text)
            assert r.json()["error"]["type"] == "payload_too_large" and "4 fit in the queue" in r.text
        assert backend.seen_ids == [] and registry.get("minilm").batcher.admission.held == 0
        assert client.post("/embed", json={"inputs": texts[:4]}).status_code == 200
