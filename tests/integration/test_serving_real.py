"""The server over real variants: every API returns what the backend returns in-process for that text
alone, whether the request arrives alone or batched with others of different lengths."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.backends.base import load_backend
from service.manifest import load_verified
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer, pad_batch
from tests.helpers import LiveServer, build_tiny_store

TEXTS = [
    "Oil prices rose sharply on Monday.",
    "ok",
    "The company said quarterly profit doubled, beating forecasts, and it raised its dividend again.",
    "Wheat exports fell for a third month as shipping costs climbed and demand from importers weakened.",
    "Rates unchanged.",
    "Shares of the bank jumped after regulators approved the merger with its smaller rival on Friday.",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_embedding_dir):
    return build_tiny_store(tmp_path_factory.mktemp("serving-store"), tiny_embedding_dir, [
        {"name": "tiny", "steps": [{"export_onnx": {}}, {"optimize": {}}]},
        {"name": "tiny-ts", "steps": ["export_torchscript"]},
        {"name": "tiny-int8", "steps": [{"export_onnx": {}}, {"quantize": {}}]},
    ])


def solo_outputs(store: Path, name: str, texts: list[str]) -> np.ndarray:
    """What the backend returns for each text run on its own, in this process."""
    path = store / name / "1"
    manifest = load_verified(path)
    backend = load_backend(path, manifest, ServiceSettings(intra_op_threads=1))
    tok = TextTokenizer(path / "tokenizer", manifest.max_seq_len)
    names = [i.name for i in manifest.inputs]
    rows = []
    for text in texts:
        enc = tok.encode_texts([text], truncate=True)
        rows.append(backend.infer(pad_batch(enc, names, tok.pad_id))[manifest.outputs[0].name][0])
    return np.stack(rows)


@pytest.fixture(scope="module")
def client(store):
    from fastapi.testclient import TestClient

    from service.app import create_app

    # Two single-threaded instances, so ONNX variants also get their wider solo sessions (2 threads).
    settings = ServiceSettings(model_store=store, default_model="tiny", max_queue_delay_ms=20, max_batch_size=16,
                               instances_per_model=2, intra_op_threads=1)
    with TestClient(create_app(settings)) as c:
        yield c


# Dynamic int8 quantizes activations with one scale per batch tensor, so an int8 answer moves slightly
# with its batch-mates (about 6e-5 here); fp32 answers must not move at all.
@pytest.mark.parametrize("name,atol", [("tiny", 1e-5), ("tiny-ts", 1e-5), ("tiny-int8", 1e-3)])
def test_every_api_matches_solo_backend_output_under_concurrency(client, store, name, atol):
    want = solo_outputs(store, name, TEXTS)

    def openai(i):
        r = client.post("/v1/embeddings", json={"input": TEXTS[i], "model": name})
        return i, r.json()["data"][0]["embedding"]

    def tei(i):
        r = client.post("/embed", json={"inputs": [TEXTS[i]], "model": name, "truncate": True})
        return i, r.json()[0]

    def openai_batch(_i):
        r = client.post("/v1/embeddings", json={"input": TEXTS, "model": name})
        return None, [d["embedding"] for d in r.json()["data"]]

    jobs = [(fn, i) for _ in range(4) for i in range(len(TEXTS)) for fn in (openai, tei)] + \
           [(openai_batch, 0)] * 6
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda job: job[0](job[1]), jobs))
    for index, got in results:
        if index is None:
            np.testing.assert_allclose(np.array(got), want, atol=atol)
        else:
            np.testing.assert_allclose(np.array(got), want[index], atol=atol)


@pytest.mark.parametrize("name,atol", [("tiny", 1e-5), ("tiny-int8", 1e-3)])
def test_requests_one_at_a_time_run_on_the_solo_session_and_match(client, store, name, atol):
    # Sequential requests find every worker idle: each batch runs on the 2-thread solo session.
    want = solo_outputs(store, name, TEXTS)
    entry = client.app.state.registry.get(name)
    calls = []
    solo = entry.solo_backends
    originals = [b.infer for b in solo]
    for backend, infer in zip(solo, originals):
        backend.infer = lambda batch, infer=infer: calls.append(1) or infer(batch)
    try:
        for i, text in enumerate(TEXTS):
            r = client.post("/v1/embeddings", json={"input": text, "model": name})
            np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"]), want[i], atol=atol)
    finally:
        for backend, infer in zip(solo, originals):
            del backend.infer
    assert len(calls) == len(TEXTS)


@pytest.mark.parametrize("name", ["tiny", "tiny-ts"])
def test_low_bit_types_equal_sentence_transformers_on_the_served_floats(client, store, name):
    from sentence_transformers import quantize_embeddings

    ranges = load_verified(store / name / "1").embedding_ranges
    floats = np.array([d["embedding"] for d in client.post(
        "/v1/embeddings", json={"input": TEXTS, "model": name}).json()["data"]], dtype=np.float32)
    for kind in ("int8", "uint8", "binary", "ubinary"):
        want = quantize_embeddings(floats, kind, ranges=np.array([ranges.min, ranges.max]))
        r = client.post("/v1/embeddings", json={"input": TEXTS, "model": name, "embedding_type": kind})
        assert r.status_code == 200, r.text
        assert [d["embedding"] for d in r.json()["data"]] == want.tolist(), kind
        tei = client.post("/embed", json={"inputs": TEXTS, "model": name, "embedding_type": kind}).json()
        assert tei == want.tolist(), kind


def test_kserve_text_infer_matches(client, store):
    want = solo_outputs(store, "tiny", TEXTS[:2])
    r = client.post("/v2/models/tiny/infer", json={
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, atol=1e-5)


def test_loading_report(client):
    registry = client.app.state.registry
    assert {e.name for e in registry.entries.values() if e.ready} == {"tiny", "tiny-ts", "tiny-int8"}
    solo = {e.name: len(e.solo_backends) for e in registry.entries.values()}
    # ONNX on CPU gets one solo session per instance; TorchScript's thread count is process-wide: none.
    assert solo == {"tiny": 2, "tiny-int8": 2, "tiny-ts": 0}


@pytest.fixture(scope="module")
def live_server(store):
    from service.app import create_app

    settings = ServiceSettings(model_store=store, default_model="tiny")
    with LiveServer(create_app(settings)) as live:
        yield live.url


def test_official_openai_client(live_server, store):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)
    want = solo_outputs(store, "tiny", TEXTS)
    # The client asks for base64 by default and decodes it itself.
    response = client.embeddings.create(model="tiny", input=TEXTS)
    np.testing.assert_allclose(np.array([d.embedding for d in response.data]), want, atol=1e-5)
    assert response.usage.prompt_tokens > len(TEXTS)
    floats = client.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], atol=1e-5)
    short = client.embeddings.create(model="tiny", input=TEXTS[0], dimensions=8)
    assert len(short.data[0].embedding) == 8
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-int8", "tiny-ts"]
    # Our embedding_type extension through the client: base64 asked for explicitly comes back undecoded.
    packed = client.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="base64",
                                      extra_body={"embedding_type": "ubinary"})
    bits = np.frombuffer(base64.b64decode(packed.data[0].embedding), dtype=np.uint8)
    assert bits.tolist() == np.packbits(want[0] > 0).tolist() and len(bits) == 32 // 8
    from openai import NotFoundError, UnprocessableEntityError

    with pytest.raises(NotFoundError):
        client.embeddings.create(model="missing", input="x")
    # A document past max_seq_len: refused by default, windowed when asked through extra_body.
    story = " ".join(TEXTS * 4)  # a few windows of 64 tokens
    with pytest.raises(UnprocessableEntityError, match="long_input"):
        client.embeddings.create(model="tiny", input=story)
    windowed = client.embeddings.create(model="tiny", input=story, encoding_format="float",
                                        extra_body={"long_input": "window"})
    cut = client.embeddings.create(model="tiny", input=story, encoding_format="float",
                                   extra_body={"long_input": "truncate"})
    assert windowed.usage.prompt_tokens > cut.usage.prompt_tokens
    assert not np.allclose(windowed.data[0].embedding, cut.data[0].embedding, atol=1e-3)


def test_a_tampered_variant_is_refused_and_the_others_serve(store, tmp_path, caplog):
    import shutil

    from fastapi.testclient import TestClient

    from service.app import create_app

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    model = copy / "tiny-ts" / "1" / "model.pt"
    model.write_bytes(model.read_bytes()[:-10])  # truncated
    settings = ServiceSettings(model_store=copy, default_model="tiny")
    with caplog.at_level("ERROR", logger="bertserve.registry"), TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/tiny-ts/ready").status_code == 503
        assert client.get("/v2/models/tiny/ready").status_code == 200
        r = client.post("/v1/embeddings", json={"input": "still served", "model": "tiny-int8"})
        assert r.status_code == 200
        refused = client.post("/v1/embeddings", json={"input": "x", "model": "tiny-ts"})
        assert refused.status_code == 503 and "model.pt" not in refused.text
    assert any("tiny-ts" in rec.getMessage() and "model.pt" in rec.getMessage() for rec in caplog.records)
