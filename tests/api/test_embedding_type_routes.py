"""`embedding_type` on /v1/embeddings and /embed through the real app: int8/uint8 from the manifest's
calibration ranges, binary/ubinary packed bits, base64 bytes, `dimensions`, and the 422s.

Expected values are computed here from the fake backend's row and the ranges, independently of
service/embedding_types.py."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.backends.fake import FakeBackend
from tests.helpers import assert_error, expected_row, fake_ranges, make_registry

TEXT = "Oil prices rose on Monday."


@pytest.fixture
def client(tmp_path, settings):
    from service.app import create_app

    backends = {"minilm": FakeBackend(dim=8), "odd": FakeBackend(dim=12), "old": FakeBackend(dim=8),
                "clf": FakeBackend(task="classification", num_labels=3)}
    registry = make_registry(tmp_path, settings, backends, without_ranges=frozenset({"old"}))
    with TestClient(create_app(settings, registry=registry)) as test_client:
        test_client.registry = registry
        yield test_client


def want_codes(row: np.ndarray, kind: str) -> list[int]:
    ranges = fake_ranges(len(row))
    out = []
    for x, lo, hi in zip(row.tolist(), ranges["min"], ranges["max"]):
        bucket = min(255, max(0, math.floor((x - lo) / ((hi - lo) / 255))))
        out.append(bucket - 128 if kind == "int8" else bucket)
    return out


def want_bits(row: np.ndarray, kind: str) -> list[int]:
    bits = [1 if x > 0 else 0 for x in row.tolist()]
    bits += [0] * (-len(bits) % 8)  # zero padding up to whole bytes
    out = [sum(bit << (7 - j) for j, bit in enumerate(bits[i:i + 8])) for i in range(0, len(bits), 8)]
    return [b - 128 for b in out] if kind == "binary" else out


def embedding(client, **body) -> list:
    r = client.post("/v1/embeddings", json={"input": TEXT, **body})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["embedding"]


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_integer_types_use_the_manifest_ranges(client, kind):
    row = expected_row(client, TEXT)[0]
    got = embedding(client, embedding_type=kind)
    assert all(type(v) is int for v in got)
    assert got == want_codes(row, kind)
    low, high = (-128, 127) if kind == "int8" else (0, 255)
    assert all(low <= v <= high for v in got)
    # The fake's unit vectors leave the narrow fake ranges on some dimension: those saturate, not wrap.
    ranges = fake_ranges(8)
    outside = [i for i, x in enumerate(row) if x < ranges["min"][i] or x >= ranges["max"][i]]
    assert outside and all(got[i] in (low, high) for i in outside)


@pytest.mark.parametrize("model,dim", [("minilm", 8), ("odd", 12)])
@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_bit_types_pack_signs_eight_to_a_byte(client, kind, model, dim):
    row = expected_row(client, TEXT, model)[0]
    got = embedding(client, model=model, embedding_type=kind)
    assert len(got) == math.ceil(dim / 8)
    assert got == want_bits(row, kind)
    if dim % 8:
        last = got[-1] + (128 if kind == "binary" else 0)
        assert last & (0xFF >> (dim % 8)) == 0, "padding bits must be zero"


@pytest.mark.parametrize("kind,dtype", [("int8", np.int8), ("uint8", np.uint8), ("binary", np.int8),
                                        ("ubinary", np.uint8)])
def test_base64_is_the_raw_bytes(client, kind, dtype):
    listed = embedding(client, embedding_type=kind)
    encoded = embedding(client, embedding_type=kind, encoding_format="base64")
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype=dtype)
    assert decoded.tolist() == listed


def test_dimensions_take_a_prefix_without_renormalizing(client):
    full = embedding(client, embedding_type="int8")
    assert embedding(client, embedding_type="int8", dimensions=5) == full[:5]
    row = expected_row(client, TEXT)[0]
    assert embedding(client, embedding_type="ubinary", dimensions=5) == want_bits(row[:5], "ubinary")
    # float keeps OpenAI's behaviour: the prefix renormalized.
    floats = embedding(client, dimensions=5)
    np.testing.assert_allclose(floats, row[:5] / np.linalg.norm(row[:5]), atol=1e-6)
    assert_error(client.post("/v1/embeddings", json={"input": TEXT, "embedding_type": "int8", "dimensions": 9}),
                 422, "invalid_input", "dimensions")


def test_several_inputs_keep_order(client):
    texts = ["grain exports fell sharply", "short", TEXT]
    data = client.post("/v1/embeddings", json={"input": texts, "embedding_type": "uint8"}).json()["data"]
    assert [d["embedding"] for d in data] == [want_codes(expected_row(client, t)[0], "uint8") for t in texts]


def test_tei_embed(client):
    row = expected_row(client, TEXT)[0]
    for kind in ("int8", "uint8"):
        r = client.post("/embed", json={"inputs": [TEXT, TEXT], "embedding_type": kind})
        assert r.status_code == 200, r.text
        assert r.json() == [want_codes(row, kind)] * 2
    bits = client.post("/embed", json={"inputs": TEXT, "embedding_type": "binary", "normalize": False}).json()
    assert bits == [want_bits(row, "binary")]
    # normalize does not apply to integer types: the ranges describe the model's own output.
    loose = client.post("/embed", json={"inputs": TEXT, "embedding_type": "int8", "normalize": False}).json()
    assert loose == [want_codes(row, "int8")]
    floats = client.post("/embed", json={"inputs": TEXT, "embedding_type": "float"}).json()
    np.testing.assert_allclose(floats[0], row, atol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_integer_types_without_ranges_are_refused_by_name(client, kind):
    backend = client.registry.get("old").backends[0]
    before = len(backend.batches)
    for route, body in (("/v1/embeddings", {"input": TEXT}), ("/embed", {"inputs": TEXT})):
        r = client.post(route, json={**body, "model": "old", "embedding_type": kind})
        assert_error(r, 422, "invalid_input", "'old'", "no calibration ranges", "rebuild", kind)
    assert len(backend.batches) == before, "refused before any inference"


def test_bit_types_need_no_ranges(client):
    row = expected_row(client, TEXT, "old")[0]
    assert embedding(client, model="old", embedding_type="ubinary") == want_bits(row, "ubinary")
    assert client.post("/embed", json={"inputs": TEXT, "model": "old", "embedding_type": "binary"}).json() == [
        want_bits(row, "binary")]


def test_bad_types_and_classifiers(client):
    assert_error(client.post("/v1/embeddings", json={"input": TEXT, "embedding_type": "int4"}), 422,
                 "invalid_input", "embedding_type")
    assert_error(client.post("/embed", json={"inputs": TEXT, "embedding_type": "bits"}), 422,
                 "invalid_input", "embedding_type")
    assert_error(client.post("/v1/embeddings", json={"input": TEXT, "model": "clf", "embedding_type": "binary"}),
                 422, "invalid_input", "classification")
    assert_error(client.post("/embed", json={"inputs": TEXT, "model": "clf", "embedding_type": "int8"}),
                 422, "invalid_input", "classification")


def test_info_and_openapi_say_what_is_supported(client):
    assert client.get("/info").json()["embedding_types"] == ["float", "int8", "uint8", "binary", "ubinary"]
    assert client.get("/info", params={"model": "old"}).json()["embedding_types"] == ["float", "binary", "ubinary"]
    assert client.get("/info", params={"model": "clf"}).json()["embedding_types"] == []
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("EmbeddingRequest", "EmbedRequest"):
        field = schemas[name]["properties"]["embedding_type"]
        assert field["enum"] == ["float", "int8", "uint8", "binary", "ubinary"] and field["default"] == "float"
        assert "bertserve extension" in field["description"]
