"""OpenTelemetry: with an exporter, each inference request is one server span carrying the route template,
the status and bertserve's own attributes; without an endpoint, tracing stays off."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.helpers import make_registry

pytest.importorskip("opentelemetry.instrumentation.fastapi", reason="tracing extra not installed")


def test_inference_request_becomes_a_span_with_model_and_timings(tmp_path, settings):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    app = create_app(settings, registry=make_registry(tmp_path, settings), tracing_exporter=exporter)
    assert app.state.tracing
    with TestClient(app) as client:
        assert client.post("/v1/embeddings", json={"input": ["one text", "two texts"]}).status_code == 200
        assert client.get("/metrics").status_code == 200  # excluded: scrapes would drown the traces
    servers = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert len(servers) == 1
    attrs = dict(servers[0].attributes)
    assert attrs["http.route"] == "/v1/embeddings" and attrs.get("http.status_code", attrs.get(
        "http.response.status_code")) == 200
    assert attrs["bertserve.model"] == "minilm" and attrs["bertserve.inputs"] == 2
    for key in ("bertserve.tokenization_ms", "bertserve.queue_ms", "bertserve.infer_ms"):
        assert attrs[key] >= 0, key


def test_tracing_is_off_without_an_endpoint(tmp_path, settings, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    app = create_app(settings, registry=make_registry(tmp_path, settings))
    assert app.state.tracing is False
