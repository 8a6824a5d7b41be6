"""API keys on the inference routes, the admin key on the repository routes, open health and metrics."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers import make_registry


def keyed_client(tmp_path, **overrides) -> TestClient:
    settings = ServiceSettings(model_store=tmp_path, api_keys="key-one, key-two", **overrides)
    return TestClient(create_app(settings, registry=make_registry(tmp_path, settings)))


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_inference_routes_need_one_of_the_keys(tmp_path):
    with keyed_client(tmp_path) as client:
        for path, body in (("/v1/embeddings", {"input": "hi"}), ("/embed", {"inputs": "hi"}),
                           ("/v2/models/minilm/infer", {"inputs": [{"name": "text", "shape": [1],
                                                                     "datatype": "BYTES", "data": ["hi"]}]})):
            refused = client.post(path, json=body)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["type"] == "unauthorized" and refused.headers["x-request-id"]
            assert client.post(path, json=body, headers=bearer("wrong")).status_code == 401
            assert client.post(path, json=body, headers={"Authorization": "Basic key-one"}).status_code == 401
            for key in ("key-one", "key-two"):
                assert client.post(path, json=body, headers=bearer(key)).status_code == 200, path
        assert client.get("/v1/models").status_code == 401  # metadata is behind the key too
        assert client.get("/v1/models", headers=bearer("key-two")).status_code == 200


def test_health_and_metrics_are_open_by_default_and_closable(tmp_path):
    with keyed_client(tmp_path) as client:
        for path in ("/health", "/v2/health/ready", "/v2/health/live", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200, path
    with keyed_client(tmp_path, open_health_and_metrics=False) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("key-one")).status_code == 200


def test_no_keys_means_open(client):
    assert client.post("/v1/embeddings", json={"input": "hi"}).status_code == 200


def test_repository_routes_are_disabled_without_an_admin_key(tmp_path):
    with keyed_client(tmp_path) as client:
        r = client.post("/v2/repository/index", headers=bearer("key-one"))
        assert r.status_code == 403 and "BERTSERVE_ADMIN_KEY" in r.json()["error"]["message"]


def test_repository_routes_need_the_admin_key_not_an_api_key(tmp_path):
    with keyed_client(tmp_path, admin_key="root-key") as client:
        assert client.post("/v2/repository/index", headers=bearer("key-one")).status_code == 401
        assert client.post("/v2/repository/index", headers=bearer("root-key")).status_code != 401


def test_keys_never_reach_the_logs_or_the_metrics(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        with keyed_client(tmp_path, admin_key="root-key") as client:
            client.post("/v1/embeddings", json={"input": "hi"}, headers=bearer("key-one"))
            client.post("/v1/embeddings", json={"input": "hi"}, headers=bearer("not-a-key"))
            metrics = client.get("/metrics").text
    text = caplog.text + metrics + repr(ServiceSettings(api_keys="key-one", admin_key="root-key"))
    for secret in ("key-one", "not-a-key", "root-key"):
        assert secret not in text
    assert 'bertserve_rejections_total{model="none",reason="unauthorized"} 1.0' in metrics
