"""Hot reload under load, on a real uvicorn server over a tiny real ONNX model: publishing v2 (by store
polling, or by Triton's load route) moves traffic to it with no failed request, and unloading lets every
accepted request finish before the model answers 404.

v1 and v2 are built alike from two tiny checkpoints with different weights, so their answers differ: a
test checks each answer against the version that claims it, not only the version label.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers import ClientLoad, LiveServer, build_tiny_store

ADMIN_KEY = "reload-admin-key"
TEXTS = [f"text number {i} about oil prices, wheat exports and quarterly profits" for i in range(8)]


@pytest.fixture(scope="module")
def retrained_dir(tmp_path_factory, tiny_embedding_dir) -> Path:
    """The tiny checkpoint with every weight moved a little: a "new training" of the same model."""
    import torch
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-embedding-retrained")
    shutil.copytree(tiny_embedding_dir, path, dirs_exist_ok=True)
    torch.manual_seed(7)
    model = BertModel.from_pretrained(path, add_pooling_layer=False)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_store, retrained_dir) -> tuple[Path, Path]:
    """A store with tiny v1 (the session's tiny store), and tiny v2 built alike from the retrained
    weights, parked outside it, ready to publish."""
    root = tmp_path_factory.mktemp("reload-store")
    shutil.copytree(tiny_store, root / "store")
    store = build_tiny_store(root, retrained_dir, [{"name": "tiny", "steps": [{"export_onnx": {}}, {"optimize": {}}]}])
    parked = root / "parked-tiny-2"
    os.rename(store / "tiny" / "2", parked)
    return store, parked


@pytest.fixture
def store(built, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(built[0], copy)
    return copy


def publish_v2(built, store: Path) -> None:
    """As build_models/publish.py does: stage beside the store (polling must ignore .staging), rename in."""
    staging = store / ".staging" / "tiny-2"
    shutil.copytree(built[1], staging)
    os.rename(staging, store / "tiny" / "2")


def serve(store: Path, **overrides) -> LiveServer:
    # One request per batch (8 texts) and one worker: under the load most requests wait in the queue,
    # where a version retired without draining would fail them.
    settings = ServiceSettings(model_store=store, default_model="tiny", instances_per_model=1, intra_op_threads=1,
                               max_batch_size=len(TEXTS), access_log=False, **overrides)
    return LiveServer(create_app(settings))


def assert_switched(load: ClientLoad, switch_done: float) -> None:
    """No failure; both versions answered, each with its own model's output; and every request sent
    after ``switch_done`` was answered by v2."""
    outcomes = load.outcomes
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:5]
    by_version = {v: [o.vector for o in outcomes if o.version == v] for v in ("1", "2")}
    assert by_version["1"] and by_version["2"], load.summary()
    for vectors in by_version.values():  # fp32: the same answer whatever the batch-mates
        np.testing.assert_allclose(np.stack(vectors), np.broadcast_to(vectors[0], (len(vectors),) + vectors[0].shape),
                                   atol=1e-5)
    assert np.abs(by_version["1"][0] - by_version["2"][0]).max() > 0.05, "v1 and v2 answer alike"
    late = [o for o in outcomes if o.sent > switch_done]
    assert late and all(o.version == "2" for o in late), load.summary()


def test_publishing_v2_under_load_by_polling_fails_no_request(built, store):
    with serve(store, store_poll_interval_s=0.2) as live, ClientLoad(live.url, "tiny", TEXTS) as load:
        load.wait_for(lambda o: o.version == "1", 30)
        time.sleep(1.0)  # steady load on v1
        published = time.monotonic()
        publish_v2(built, store)
        # The first v2 answer: v2 was installed before it, so every request sent after it resolves v2.
        switched = load.wait_for(lambda o: o.version == "2", 30)
        time.sleep(1.0)
    assert_switched(load, switched)
    around = [o for o in load.outcomes if published - 1 <= o.sent <= switched + 1]
    print(f"\npolling: {load.summary()} in all; {len(around)} requests from 1 s before publishing to 1 s after "
          f"the first v2 answer ({switched - published:.2f} s after publishing), 0 failed")


def test_publishing_v2_under_load_by_the_load_route_fails_no_request(built, store):
    import tritonclient.http as httpclient

    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with serve(store, admin_key=ADMIN_KEY) as live, ClientLoad(live.url, "tiny", TEXTS) as load:
        triton = httpclient.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=60)
        load.wait_for(lambda o: o.version == "1", 30)
        time.sleep(1.0)
        publish_v2(built, store)
        time.sleep(0.5)  # polling is off: v2 is in the store but does not serve
        asked = time.monotonic()
        triton.load_model("tiny", headers=auth)
        loaded = time.monotonic()
        time.sleep(1.0)
        index = triton.get_model_repository_index(headers=auth)
        triton.close()
    # load_model answers once v2 serves and v1 is drained: every request sent after it is v2's.
    assert_switched(load, loaded)
    # v1 went on answering while v2 loaded and warmed up.
    assert [o for o in load.outcomes if asked <= o.done <= loaded and o.version == "1"], load.summary()
    assert {(m["version"], m["state"]) for m in index} == {("1", "UNAVAILABLE"), ("2", "READY")}
    during = [o for o in load.outcomes if asked <= o.done <= loaded]
    print(f"\nload route: {load.summary()} in all; {len(during)} answered while load_model ran "
          f"({loaded - asked:.2f} s), 0 failed")


def test_unloading_under_load_answers_every_accepted_request(store):
    import tritonclient.http as httpclient

    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with serve(store, admin_key=ADMIN_KEY) as live, ClientLoad(live.url, "tiny", TEXTS) as load:
        triton = httpclient.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=60)
        load.wait_for(lambda o: o.version == "1", 30)
        time.sleep(2.0)
        asked = time.monotonic()
        triton.unload_model("tiny", headers=auth, unload_dependents=False)
        unloaded = time.monotonic()
        time.sleep(0.5)
        assert not triton.is_model_ready("tiny")
        triton.close()
    outcomes = load.outcomes
    # Only right answers and 404s: nothing cut short, no 5xx.
    assert all(o.status == 200 or (o.status == 404 and o.error_type == "model_not_found") for o in outcomes), \
        load.summary()
    # Sent before the unload (with a margin: on this loaded machine the server may read a request a while
    # after it was sent, and then after the unload): accepted, so answered.
    early = [o for o in outcomes if o.sent < asked - 1.0]
    assert early and all(o.status == 200 for o in early), load.summary()
    # Some of those were still running when the unload began: drained, not failed.
    assert any(o.status == 200 and o.done > asked for o in outcomes), load.summary()
    # Sent after the unload answered: the model is gone.
    late = [o for o in outcomes if o.sent > unloaded]
    assert late and all(o.status == 404 for o in late), load.summary()
    drained = [o for o in outcomes if o.status == 200 and o.done > asked]
    print(f"\nunload: {load.summary()} in all; {len(drained)} answered with 200 after unload_model was called "
          f"(it took {unloaded - asked:.2f} s), then 404s only")


def test_a_version_whose_tokenizer_is_not_listed_is_refused_and_v1_serves(built, store):
    """The server reads the tokenizer at load: one changed after publishing and left out of the manifest
    is refused, named in the index, and v1 goes on serving."""
    import httpx

    publish_v2(built, store)
    v2 = store / "tiny" / "2"
    manifest = json.loads((v2 / "manifest.json").read_text())
    del manifest["files"]["tokenizer/tokenizer.json"]
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    tokenizer = v2 / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))  # still loads; other bytes
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": TEXTS[:1]}]}
    with serve(store, admin_key=ADMIN_KEY) as live:
        index = httpx.post(f"{live.url}/v2/repository/index", headers=auth, timeout=30).json()
        answer = httpx.post(f"{live.url}/v2/models/tiny/infer", json=body, timeout=30)
    states = {m["version"]: (m["state"], m["reason"]) for m in index}
    assert states["1"] == ("READY", "")
    assert states["2"][0] == "UNAVAILABLE" and "tokenizer/tokenizer.json is not listed" in states["2"][1], states
    assert answer.status_code == 200 and answer.json()["model_version"] == "1", answer.text
