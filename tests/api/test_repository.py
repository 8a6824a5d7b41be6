"""Hot reload and the model repository routes, through the real app over a store of fake variants: real
files, manifests and sha256 checks, with a fake backend whose answers depend on the version."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.backends.fake import FakeBackend
from service.errors import ModelNotFound
from service.manifest import hash_tree
from service.registry import Registry
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer
from tests.helpers import ClientLoad, LiveServer, fake_manifest, scrape, tokenizer_dir, value

ADMIN_KEY = "admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXT = "oil prices rose"


def publish(store: Path, name: str, version: int, corrupt: bool = False) -> Path:
    """A version as build_models/publish.py leaves it: staged, hashed, renamed into place. ``corrupt``
    edits a byte of the model file after hashing."""
    staging = store / ".staging" / f"{name}-{version}"
    staging.mkdir(parents=True)
    tokenizer_dir(staging)
    (staging / "model.onnx").write_bytes(f"fake model {name} v{version}".encode())
    manifest = fake_manifest(name, "embedding", 8, 32).model_copy(
        update={"version": version, "files": hash_tree(staging)})
    (staging / "manifest.json").write_text(manifest.to_json())
    if corrupt:
        model = staging / "model.onnx"
        data = bytearray(model.read_bytes())
        data[0] ^= 0xFF
        model.write_bytes(bytes(data))
    (store / name).mkdir(parents=True, exist_ok=True)
    os.rename(staging, store / name / str(version))
    return store / name / str(version)


def fake_loader(path: Path, manifest, settings, delay_s: float = 0.0) -> FakeBackend:
    return FakeBackend(dim=8, salt=manifest.version, delay_s=delay_s)


@functools.cache
def _tokenizer() -> TextTokenizer:
    return TextTokenizer(tokenizer_dir(Path(tempfile.mkdtemp(prefix="bertserve-tok-"))), 32)


def answer_of(version: int, text: str = TEXT) -> np.ndarray:
    """What version ``version`` answers for ``text``: the fake backend's row of its token ids."""
    return FakeBackend(dim=8, salt=version).row(_tokenizer().encode_texts([text], False)[0].ids)


def make_app(store: Path, delay_s: float = 0.0, **overrides):
    """The app over ``store``, whose versions load as fake backends taking ``delay_s`` per batch."""
    settings = ServiceSettings(model_store=store, default_model="m", access_log=False, **overrides)
    loader = functools.partial(fake_loader, delay_s=delay_s)
    return create_app(settings, registry=Registry(settings, backend_loader=loader))


def infer(client, model: str = "m", version: int | None = None):
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/infer"
    return client.post(path, json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [TEXT]}]})


def served(client, model: str = "m", version: int | None = None) -> tuple[str, np.ndarray]:
    r = infer(client, model, version)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return r.json()["model_version"], np.asarray(out["data"], dtype=np.float32)


def index(client, **body) -> dict[tuple[str, str], tuple[str, str]]:
    r = client.post("/v2/repository/index", json=body or None, headers=AUTH)
    assert r.status_code == 200, r.text
    return {(m["name"], m["version"]): (m["state"], m["reason"]) for m in r.json()}


@pytest.fixture
def store(tmp_path) -> Path:
    store = tmp_path / "store"
    publish(store, "m", 1)
    return store


# ------------------------------------------------------------------ load, unload, index


def test_load_route_switches_to_a_published_version_and_drains_the_old(store):
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client:
        registry = client.app.state.registry
        version, row = served(client)
        assert version == "1"
        np.testing.assert_allclose(row, answer_of(1), rtol=1e-6)
        old = registry.get("m")
        publish(store, "m", 2)
        assert served(client)[0] == "1"  # polling is off: published is not served until loaded
        assert index(client)[("m", "2")] == ("UNAVAILABLE", "not loaded yet")

        r = client.post("/v2/repository/models/m/load", headers=AUTH)
        assert r.status_code == 200 and r.json() == {}
        version, row = served(client)
        assert version == "2"
        np.testing.assert_allclose(row, answer_of(2), rtol=1e-6)
        assert old.status == "unloaded" and old.backends[0].closed and old.leases == 0
        assert index(client) == {("m", "1"): ("UNAVAILABLE", "not selected by the version policy 'latest'"),
                                 ("m", "2"): ("READY", "")}
        assert index(client, ready=True) == {("m", "2"): ("READY", "")}
        assert client.get("/v2/models/m").json()["versions"] == ["2"]
        assert infer(client, version=1).status_code == 404


def test_unload_route_then_load_again(store):
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client:
        entry = client.app.state.registry.get("m")
        r = client.post("/v2/repository/models/m/unload", headers=AUTH,
                        json={"parameters": {"unload_dependents": True}})
        assert r.status_code == 200 and r.json() == {}
        assert entry.status == "unloaded" and entry.backends[0].closed
        gone = infer(client)
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "model_not_found"
        assert client.post("/v1/embeddings", json={"input": TEXT, "model": "m"}).status_code == 404
        assert client.get("/v2/models/m/ready").status_code == 404
        assert index(client) == {("m", "1"): ("UNAVAILABLE", "unloaded")}
        assert client.post("/v2/repository/models/m/unload", headers=AUTH).status_code == 200  # idempotent
        assert client.post("/v2/repository/models/m/load", headers=AUTH).status_code == 200
        assert served(client)[0] == "1"


def test_unknown_models_are_404_on_the_repository_routes(store):
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client:
        for action in ("load", "unload"):
            r = client.post(f"/v2/repository/models/nope/{action}", headers=AUTH)
            assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found", r.text
        # The client's name is only compared with the store's, never joined to a path.
        assert client.post("/v2/repository/models/..%2F..%2Fetc/load", headers=AUTH).status_code == 404


BAD_BODIES = {
    "index": [(b"{not json", "JSON"), (b'{"ready": "yes"}', "ready"), (b'{"ready": true, "extra": 1}', "extra"),
              (b"[]", "object")],
    "models/m/load": [(b'{"parameters": {"config": "{}"}}', "config"), (b'{"parameters": {"file:1/model.onnx": "AA=="}}',
                                                                      "file:"),
                      (b'{"parameters": {"speed": 3}}', "unknown load parameter"), (b'{"parameters": 5}', "parameters")],
    "models/m/unload": [(b'{"parameters": {"unload_dependents": "no"}}', "unload_dependents"),
                        (b'{"parameters": {"force": true}}', "force"), (b"\xff\xfe", "JSON")],
}


@pytest.mark.parametrize("route", sorted(BAD_BODIES))
def test_bad_repository_bodies_are_422_naming_the_problem(store, route):
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client:
        for body, says in BAD_BODIES[route]:
            r = client.post(f"/v2/repository/{route}", content=body, headers=AUTH)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["type"] == "invalid_input" and says in r.json()["error"]["message"], r.text
        assert served(client)[0] == "1"  # a refused request changed nothing
        # No body, an empty object, and any Content-Type (curl -d sends form-urlencoded) are fine.
        for body, headers in ((b"", {}), (b"{}", {"content-type": "application/x-www-form-urlencoded"})):
            assert client.post(f"/v2/repository/{route}", content=body, headers={**AUTH, **headers}).status_code == 200


def test_admin_routes_need_the_admin_key(store):
    routes = ("/v2/repository/index", "/v2/repository/models/m/load", "/v2/repository/models/m/unload")
    with TestClient(make_app(store)) as client:  # no admin key configured: disabled
        for path in routes:
            r = client.post(path, headers=AUTH)
            assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden", path
        assert "model_repository" not in client.get("/v2").json()["extensions"]
    with TestClient(make_app(store, admin_key=ADMIN_KEY, api_keys="user-key")) as client:
        for path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer user-key"}):
                r = client.post(path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
        assert client.post(routes[0], headers=AUTH).status_code == 200
        assert client.get("/v2", headers={"Authorization": "Bearer user-key"}).json()["extensions"] == \
            ["binary_tensor_data", "model_repository"]


def test_openapi_documents_the_repository_routes(store):
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client:
        schema = client.get("/openapi.json").json()
    index_op = schema["paths"]["/v2/repository/index"]["post"]
    assert index_op["responses"]["200"]["content"]["application/json"]["schema"]["items"]["$ref"].endswith(
        "/RepositoryModel")
    for action in ("load", "unload"):
        op = schema["paths"][f"/v2/repository/models/{{model}}/{action}"]["post"]
        assert {"200", "401", "403", "404", "422"} <= set(op["responses"]), action
        assert op["responses"]["403"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert set(schema["components"]["schemas"]["RepositoryModel"]["properties"]) == {"name", "version", "state",
                                                                                    "reason"}


# ------------------------------------------------------------------ failures


def test_a_corrupted_new_version_is_refused_logged_counted_and_the_old_one_serves(store, caplog):
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client, \
            caplog.at_level(logging.ERROR, logger="bertserve.registry"):
        publish(store, "m", 2, corrupt=True)
        r = client.post("/v2/repository/models/m/load", headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["type"] == "model_load_failed", r.text
        message = r.json()["error"]["message"]
        assert "v2" in message and "sha256" in message and "still serving v1" in message
        assert str(store) not in message  # the store's path is the server's business
        version, row = served(client)
        assert version == "1"
        np.testing.assert_allclose(row, answer_of(1), rtol=1e-6)
        assert infer(client, version=2).status_code == 503  # listed, not ready
        state, reason = index(client)[("m", "2")]
        assert state == "UNAVAILABLE" and "sha256" in reason
        s = scrape(client)
        assert value(s, "bertserve_model_load_failures_total", model="m") == 1
        assert value(s, "bertserve_model_ready", model="m", version="2") == 0
        assert value(s, "bertserve_model_ready", model="m", version="1") == 1
    assert any("m v2" in rec.getMessage() and "sha256" in rec.getMessage() for rec in caplog.records)


def test_a_broken_newest_version_at_start_up_leaves_the_one_before_serving(store):
    publish(store, "m", 2, corrupt=True)
    with TestClient(make_app(store)) as client:
        assert served(client)[0] == "1"
        assert value(scrape(client), "bertserve_model_load_failures_total", model="m") == 1


def test_a_file_added_to_a_published_version_is_refused_naming_it(store):
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client:
        (publish(store, "m", 2) / "tokenizer" / "added.json").write_text("{}")
        r = client.post("/v2/repository/models/m/load", headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["type"] == "model_load_failed", r.text
        message = r.json()["error"]["message"]
        assert "m/2: file tokenizer/added.json is not listed" in message and "still serving v1" in message
        assert str(store) not in message
        assert served(client)[0] == "1"
        state, reason = index(client)[("m", "2")]
        assert state == "UNAVAILABLE" and "tokenizer/added.json" in reason


def test_an_untidy_store_starts_and_answers_the_repository_routes(store):
    (store / "lost+found").mkdir()
    (store / "README.md").write_text("models live here\n")
    for name in ("²", "١", "01"):
        (store / "m" / name).mkdir()
    (store / "m" / "notes.txt").write_text("")
    with TestClient(make_app(store, admin_key=ADMIN_KEY)) as client:
        assert served(client)[0] == "1"
        assert index(client) == {("m", "1"): ("READY", "")}
        assert client.post("/v2/repository/models/m/load", headers=AUTH).status_code == 200
        assert client.post("/v2/repository/models/m/unload", headers=AUTH).status_code == 200


# ------------------------------------------------------------------ version policy


@pytest.mark.parametrize("policy,serving", [("latest:2", [2, 3]), ("specific:1,3", [1, 3]),
                                            ("specific:m=2;other=1", [2]), ("all", [1, 2, 3])])
def test_version_policy_and_versioned_routes(store, policy, serving):
    publish(store, "m", 2)
    publish(store, "m", 3)
    with TestClient(make_app(store, version_policy=policy, admin_key=ADMIN_KEY)) as client:
        for version in (1, 2, 3):
            if version in serving:
                got, row = served(client, version=version)
                assert got == str(version)
                np.testing.assert_allclose(row, answer_of(version), rtol=1e-6)
                assert client.get(f"/v2/models/m/versions/{version}/ready").status_code == 200
            else:
                r = infer(client, version=version)
                assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found", r.text
        # Unversioned routes (KServe, OpenAI, TEI) serve the newest loaded version.
        assert served(client)[0] == str(max(serving))
        np.testing.assert_allclose(client.post("/embed", json={"inputs": TEXT, "model": "m"}).json()[0],
                                   answer_of(max(serving)), rtol=1e-6)
        assert client.get("/v2/models/m").json()["versions"] == [str(v) for v in serving]
        assert {k[1] for k, (state, _) in index(client).items() if state == "READY"} == {str(v) for v in serving}


def test_a_bad_version_policy_fails_at_start_naming_it(tmp_path):
    for policy in ("latest:0", "newest", "specific:a,b", "specific:=1"):
        with pytest.raises(ValueError, match="policy"):
            Registry(ServiceSettings(model_store=tmp_path, version_policy=policy))


# ------------------------------------------------------------------ polling


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_polling_loads_published_versions_and_unloads_removed_ones(store):
    with TestClient(make_app(store, store_poll_interval_s=0.05, version_policy="latest:1")) as client:
        registry = client.app.state.registry
        # Half-published folders are left alone: a version without its manifest, and staging.
        (store / "m" / "7").mkdir()
        (store / "m" / "7" / "model.onnx").write_bytes(b"half copied")
        (store / ".staging" / "m-8").mkdir(parents=True)
        publish(store, "m", 2)
        # v1 is drained after v2 takes traffic: wait for both before reading the series.
        wait_until(lambda: served(client)[0] == "2" and not registry.transitions)
        assert sorted(registry.entries) == [("m", 2)]
        s = scrape(client)
        assert value(s, "bertserve_model_ready", model="m", version="2") == 1
        assert ("bertserve_model_ready", (("model", "m"), ("version", "1"))) not in s
        assert value(s, "bertserve_model_load_failures_total", model="m") == 0

        # A new model appears with its series; a corrupted version is tried once, not at every poll.
        publish(store, "n", 1)
        publish(store, "m", 3, corrupt=True)
        wait_until(lambda: ("n", 1) in registry.entries and ("m", 3) in registry.entries)
        time.sleep(0.3)
        s = scrape(client)
        assert value(s, "bertserve_model_load_failures_total", model="m") == 1
        assert value(s, "bertserve_requests_total", model="n", route="/v2/models/{model}/infer", code="200",
                     protocol="http") == 0
        assert served(client)[0] == "2" and served(client, "n")[0] == "1"

        # Unpublishing the serving version: the policy falls back to what is left on disk.
        shutil.rmtree(store / "m" / "3")
        shutil.rmtree(store / "m" / "2")
        wait_until(lambda: sorted(k for k in registry.entries if k[0] == "m") == [("m", 1)])
        assert served(client)[0] == "1"
        shutil.rmtree(store / "n")
        wait_until(lambda: infer(client, "n").status_code == 404)


def test_polling_leaves_an_unloaded_model_alone_and_an_empty_store_changes_nothing(store, tmp_path):
    with TestClient(make_app(store, store_poll_interval_s=0.05, admin_key=ADMIN_KEY)) as client:
        assert client.post("/v2/repository/models/m/unload", headers=AUTH).status_code == 200
        publish(store, "m", 2)
        time.sleep(0.3)
        assert infer(client).status_code == 404
        assert client.post("/v2/repository/models/m/load", headers=AUTH).status_code == 200
        assert served(client)[0] == "2"
        # An unmounted volume looks empty: that must not unload every model.
        store.rename(tmp_path / "elsewhere")
        store.mkdir()
        time.sleep(0.3)
        assert served(client)[0] == "2"


# ------------------------------------------------------------------ draining


def test_a_request_that_resolved_a_version_is_answered_while_it_drains(store):
    async def scenario():
        settings = ServiceSettings(model_store=store, default_model="m")
        registry = Registry(settings, backend_loader=fake_loader)
        from service.reloader import Reloader

        reloader = Reloader(registry, settings)
        await reloader.load_store()
        entry = registry.get("m")
        entry.acquire()  # as model_entry() does for a request that is still tokenizing
        retiring = asyncio.create_task(registry.retire([entry], grace_s=10))
        await asyncio.sleep(0.05)
        with pytest.raises(ModelNotFound):
            registry.get("m")  # a new request no longer finds it
        assert not retiring.done() and entry.status == "unloading"
        encoded = entry.tokenizer.encode_texts([TEXT], False)
        rows = (await entry.batcher.submit([(e, len(e)) for e in encoded])).results  # the held one still runs
        np.testing.assert_allclose(rows[0], answer_of(1), rtol=1e-6)
        entry.release()
        await asyncio.wait_for(retiring, 5)
        assert entry.status == "unloaded" and entry.backends[0].closed
        reloader.close()

    asyncio.run(scenario())


# Under load, one text per request and per batch, 20 ms a batch, one worker: with 6 clients about 5
# requests wait in the queue at any moment, and a version retired without draining would fail them.
SLOW = dict(delay_s=0.02, max_batch_size=1, instances_per_model=1, admin_key=ADMIN_KEY)


def test_switching_versions_under_load_fails_no_request(store):
    with LiveServer(make_app(store, **SLOW)) as live, ClientLoad(live.url, "m", [TEXT], clients=6) as load:
        load.wait_for(lambda o: o.version == "1", 10)
        time.sleep(0.5)
        publish(store, "m", 2)
        asked = time.monotonic()
        assert httpx.post(f"{live.url}/v2/repository/models/m/load", headers=AUTH, timeout=30).status_code == 200
        loaded = time.monotonic()
        time.sleep(0.5)
    outcomes = load.outcomes
    assert all(o.status == 200 for o in outcomes), load.summary()
    for o in outcomes:
        np.testing.assert_allclose(o.vector[0], answer_of(int(o.version)), rtol=1e-6)
    # v1 drained its queue while the load ran; once it answered, everything is v2's.
    assert any(o.version == "1" and asked < o.done for o in outcomes), load.summary()
    late = [o for o in outcomes if o.sent > loaded]
    assert late and all(o.version == "2" for o in late), load.summary()


def test_unloading_under_load_answers_every_accepted_request(store):
    with LiveServer(make_app(store, **SLOW)) as live, ClientLoad(live.url, "m", [TEXT], clients=6) as load:
        load.wait_for(lambda o: o.version == "1", 10)
        time.sleep(0.5)
        asked = time.monotonic()
        assert httpx.post(f"{live.url}/v2/repository/models/m/unload", headers=AUTH, timeout=30).status_code == 200
        unloaded = time.monotonic()
        time.sleep(0.3)
    outcomes = load.outcomes
    assert all(o.status == 200 or (o.status == 404 and o.error_type == "model_not_found") for o in outcomes), \
        load.summary()
    # The queue at the unload was worked off (200s answered after it began), not failed.
    assert sum(1 for o in outcomes if o.status == 200 and o.done > asked) >= 2, load.summary()
    assert all(o.status == 200 for o in outcomes if o.sent < asked - 0.3), load.summary()
    late = [o for o in outcomes if o.sent > unloaded]
    assert late and all(o.status == 404 for o in late), load.summary()


def test_tritonclient_repository_calls(store):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with LiveServer(make_app(store, admin_key=ADMIN_KEY)) as live:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{live.port}")
        try:
            assert client.get_model_repository_index(headers=AUTH) == [
                {"name": "m", "version": "1", "state": "READY", "reason": ""}]
            publish(store, "m", 2)
            client.load_model("m", headers=AUTH)
            assert client.is_model_ready("m", "2") and not client.is_model_ready("m", "1")
            client.unload_model("m", headers=AUTH, unload_dependents=True)
            assert not client.is_model_ready("m")
            # (This server's error body is an object, not Triton's string: read it with message().)
            with pytest.raises(InferenceServerException) as missing:
                client.load_model("missing", headers=AUTH)
            assert missing.value.status() == "404" and "not in the model store" in missing.value.message()["message"]
            with pytest.raises(InferenceServerException) as refused:
                client.get_model_repository_index(headers={"Authorization": "Bearer wrong"})
            assert refused.value.status() == "401" and "admin key" in refused.value.message()["message"]
            assert "model_repository" in client.get_server_metadata()["extensions"]
        finally:
            client.close()
