"""CORS for browser apps (BERTSERVE_CORS_ORIGINS): off by default; preflights answered before the keys and
the door, never refused or counted by them; every answer, errors included, readable by an allowed origin."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers import make_registry

APP = "https://app.example.com"
OTHER = "https://evil.example.net"


def cors_client(tmp_path, raise_server_exceptions: bool = True, **overrides) -> TestClient:
    settings = ServiceSettings(model_store=tmp_path, **overrides)
    return TestClient(create_app(settings, registry=make_registry(tmp_path, settings)),
                      raise_server_exceptions=raise_server_exceptions)


def preflight(client, path: str, origin: str = APP, method: str = "POST",
              headers: str = "authorization, content-type, x-request-timeout"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": headers})


def access_headers(resp) -> dict:
    return {k: v for k, v in resp.headers.items() if k.lower().startswith("access-control-")}


def test_off_by_default(client):
    resp = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": APP})
    assert resp.status_code == 200 and access_headers(resp) == {}
    assert access_headers(preflight(client, "/embed")) == {}  # no preflight answer either (405)


def test_preflight_is_answered_for_an_allowed_origin_only(tmp_path):
    with cors_client(tmp_path, cors_origins=f"{APP}, http://localhost:3000") as client:
        for path in ("/embed", "/v1/embeddings", "/decode", "/v2/models/minilm/infer", "/info"):
            ok = preflight(client, path)
            assert ok.status_code == 200, (path, ok.text)
            assert ok.headers["access-control-allow-origin"] == APP
            methods = {m.strip() for m in ok.headers["access-control-allow-methods"].split(",")}
            assert {"GET", "POST", "OPTIONS"} <= methods
            allowed = ok.headers["access-control-allow-headers"].lower()
            for header in ("authorization", "content-type", "x-request-id", "x-request-timeout",
                           "inference-header-content-length"):
                assert header in allowed, header
            assert "access-control-allow-credentials" not in ok.headers
        assert preflight(client, "/embed", origin="http://localhost:3000").status_code == 200
        refused = preflight(client, "/embed", origin=OTHER)
        assert "access-control-allow-origin" not in refused.headers
        assert preflight(client, "/embed", method="DELETE").status_code == 400  # a method our APIs never take


def test_preflight_needs_no_key_and_is_never_shed_or_counted(tmp_path, monkeypatch):
    settings = ServiceSettings(model_store=tmp_path, api_keys="key-one", cors_origins=APP)
    registry = make_registry(tmp_path, settings)
    with TestClient(create_app(settings, registry=registry)) as client:
        # The queue is full: a request would get 429 at the door, its preflight still 200.
        monkeypatch.setattr(registry.entries[("minilm", 1)].batcher.admission, "saturated", lambda items: True)
        for path in ("/embed", "/decode", "/tokenize", "/v2/models/minilm/infer"):
            resp = preflight(client, path)
            assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == APP, path
        shed = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": APP, "Authorization": "Bearer key-one"})
        assert shed.status_code == 429 and shed.headers["access-control-allow-origin"] == APP
        assert "retry-after" in shed.headers["access-control-expose-headers"].lower()
        monkeypatch.undo()
        metrics = client.get("/metrics", headers={"Authorization": "Bearer key-one"}).text
        assert "OPTIONS" not in metrics and 'route="unmatched"' not in metrics
        assert 'code="401"' not in metrics  # no preflight was refused by the keys
        # Without a key, the real request is refused, readably.
        refused = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": APP})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP
        ok = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": APP, "Authorization": "Bearer key-one"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP


def test_error_answers_carry_the_cors_headers(tmp_path, monkeypatch):
    with cors_client(tmp_path, raise_server_exceptions=False, cors_origins=APP) as client:
        h = {"Origin": APP}
        answers = {
            422: client.post("/embed", json={"inputs": ""}, headers=h),
            404: client.post("/embed", json={"inputs": "hi", "model": "nope"}, headers=h),
            405: client.get("/embed", headers=h),
            413: client.post("/embed", content=b"x" * 5_000_000, headers={**h, "content-type": "application/json"}),
        }
        # An unexpected bug: answered by Starlette's outermost error layer, still with the headers.
        entry = client.app.state.registry.get("minilm")

        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(entry.tokenizer, "tokenize", broken)
        answers[500] = client.post("/tokenize", json={"inputs": "hi"}, headers=h)
        for status, resp in answers.items():
            assert resp.status_code == status, (status, resp.text)
            assert resp.headers["access-control-allow-origin"] == APP, status
            assert "x-request-id" in resp.headers["access-control-expose-headers"], status
        assert answers[500].json()["error"]["type"] == "internal_error"
        # A disallowed origin gets its answer without the headers: the browser keeps it from the page.
        other = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": OTHER})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_exposed_headers_are_the_ones_clients_read(tmp_path):
    with cors_client(tmp_path, cors_origins=APP) as client:
        resp = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": APP})
        exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time",
                "retry-after", "inference-header-content-length"} <= exposed
        assert {"x-request-id", "x-total-time", "x-inference-time"} <= {k.lower() for k in resp.headers}


def test_any_origin(tmp_path):
    with cors_client(tmp_path, cors_origins="*") as client:
        ok = preflight(client, "/embed", origin=OTHER)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"
        resp = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": OTHER})
        assert resp.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in resp.headers


def test_credentials_header_only_when_set(tmp_path):
    with cors_client(tmp_path, cors_origins=APP) as client:
        assert "access-control-allow-credentials" not in preflight(client, "/embed").headers
        assert "access-control-allow-credentials" not in client.post(
            "/embed", json={"inputs": "hi"}, headers={"Origin": APP}).headers
    with cors_client(tmp_path, cors_origins=APP, cors_allow_credentials=True) as client:
        ok = preflight(client, "/embed")
        assert ok.headers["access-control-allow-credentials"] == "true"
        assert ok.headers["access-control-allow-origin"] == APP
        resp = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": APP})
        assert resp.headers["access-control-allow-credentials"] == "true"
        assert resp.headers["access-control-allow-origin"] == APP


def test_any_origin_with_credentials_is_refused_at_start_up(monkeypatch):
    with pytest.raises(ValidationError, match="BERTSERVE_CORS_ALLOW_CREDENTIALS"):
        ServiceSettings(cors_origins="https://a.example, *", cors_allow_credentials=True)
    monkeypatch.setenv("BERTSERVE_CORS_ORIGINS", "*")
    monkeypatch.setenv("BERTSERVE_CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(ValidationError, match="browsers refuse it"):
        ServiceSettings()
    monkeypatch.setenv("BERTSERVE_CORS_ALLOW_CREDENTIALS", "false")
    assert ServiceSettings().cors_origin_list == ["*"]


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "https://a.example/path"])
def test_an_origin_that_no_browser_sends_is_refused_at_start_up(origin):
    with pytest.raises(ValidationError, match="not an origin"):
        ServiceSettings(cors_origins=origin)


def test_cors_and_tracing_together(tmp_path, settings):
    pytest.importorskip("opentelemetry.instrumentation.fastapi", reason="tracing extra not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    settings = settings.model_copy(update={"cors_origins": APP})
    app = create_app(settings, registry=make_registry(tmp_path, settings), tracing_exporter=exporter)
    assert app.state.tracing
    with TestClient(app) as client:
        assert preflight(client, "/embed").status_code == 200
        resp = client.post("/embed", json={"inputs": "hi"}, headers={"Origin": APP})
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == APP
    servers = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert [dict(s.attributes)["http.route"] for s in servers] == ["/embed"]  # the preflight is no span
