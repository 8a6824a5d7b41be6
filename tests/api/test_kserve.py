"""KServe v2 / Open Inference Protocol routes, through the real app with fake backends.

Expected outputs are computed directly: the fake backend's row() of the tokenizer's own encoding, so a
test checks parsing, tokenization, batching and response layout end to end without a model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.backends.fake import FakeBackend
from service.model_entry import ModelEntry
from service.registry import Registry
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer
from tests.helpers import LABELS, LiveServer, assert_error, fake_manifest, raw_post
from tests.helpers import tokenizer_dir as copy_tokenizer

MAX_SEQ_LEN = 32


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return copy_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def make_registry(store: Path, tokenizer_dir: Path, broken_only: bool = False) -> Registry:
    """Two versions of an embedding model (8 and 16 wide), a TorchScript classifier without
    token_type_ids, and a model that failed to load."""
    settings = ServiceSettings(model_store=store, default_model="emb", max_queue_delay_ms=1)
    registry = Registry(settings)
    models = [] if broken_only else [
        ("emb", 1, fake_manifest("emb", "embedding", 8, MAX_SEQ_LEN, ranges=False), FakeBackend(dim=8)),
        ("emb", 2, fake_manifest("emb", "embedding", 16, MAX_SEQ_LEN, ranges=False, version=2), FakeBackend(dim=16)),
        ("cls", 1, fake_manifest("cls", "classification", len(LABELS), MAX_SEQ_LEN, fmt="torchscript",
                                 token_type_ids=False),
         FakeBackend(task="classification", num_labels=len(LABELS))),
    ]
    for name, version, manifest, backend in models:
        entry = ModelEntry(name=name, version=version, path=store / name / str(version), status="ready",
                           manifest=manifest, tokenizer=TextTokenizer(tokenizer_dir, MAX_SEQ_LEN),
                           backends=[backend])
        registry.add(entry)
    registry.entries[("broken", 1)] = ModelEntry(name="broken", version=1, path=store / "broken" / "1",
                                                 status="failed", reason="test")
    return registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tokenizer_dir) -> Registry:
    return make_registry(tmp_path_factory.mktemp("store"), tokenizer_dir)


@pytest.fixture(scope="module")
def client(registry):
    with TestClient(create_app(registry.settings, registry=registry)) as c:
        yield c


def expected_rows(registry: Registry, name: str, version: int, texts: list[str]) -> np.ndarray:
    entry = registry.entries[(name, version)]
    return np.stack([entry.backends[0].row(e.ids) for e in entry.tokenizer.encode_texts(texts, False)])


def text_request(texts, shape=None, name="text", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": shape or [len(texts)], "datatype": "BYTES", "data": texts}], **extra}


def output(body: dict, name: str) -> np.ndarray:
    out = next(o for o in body["outputs"] if o["name"] == name)
    assert out["datatype"] == "FP32"
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a"]


# ------------------------------------------------------------------ metadata and health


def test_server_metadata_and_health(client):
    meta = client.get("/v2").json()
    assert meta["name"] == "bertserve" and meta["version"]
    assert meta["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200


def test_not_ready_server(tmp_path, tokenizer_dir):
    registry = make_registry(tmp_path, tokenizer_dir, broken_only=True)
    with TestClient(create_app(registry.settings, registry=registry)) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert_error(c.get("/v2/health/ready"), 503, "not_ready")
        assert_error(c.get("/v2/models/broken/ready"), 503, "not_ready")


def test_model_metadata(client):
    meta = client.get("/v2/models/emb").json()
    assert meta["name"] == "emb" and meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "token_type_ids", "datatype": "INT64", "shape": [-1, -1]},
    ]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 16]}]
    v1 = client.get("/v2/models/emb/versions/1").json()
    assert v1["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 8]}]

    cls = client.get("/v2/models/cls").json()
    assert cls["platform"] == "pytorch_libtorch"
    assert [i["name"] for i in cls["inputs"]] == ["text", "input_ids", "attention_mask"]  # no token_type_ids
    assert cls["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]


def test_model_ready_and_lookup_errors(client):
    assert client.get("/v2/models/emb/ready").status_code == 200
    assert client.get("/v2/models/emb/versions/1/ready").status_code == 200
    assert_error(client.get("/v2/models/nope/ready"), 404, "model_not_found", "nope")
    assert_error(client.get("/v2/models/emb/versions/9/ready"), 404, "model_not_found", "version")
    assert_error(client.get("/v2/models/emb/versions/abc"), 404, "model_not_found")
    assert_error(client.get("/v2/models/nope"), 404, "model_not_found")
    assert_error(client.get("/v2/models/broken/versions/1/ready"), 503, "not_ready")


# ------------------------------------------------------------------ inference


def test_infer_texts_flat_and_column(client, registry):
    want = expected_rows(registry, "emb", 2, TEXTS)
    flat = client.post("/v2/models/emb/infer", json=text_request(TEXTS, id="req-1")).json()
    assert flat["model_name"] == "emb" and flat["model_version"] == "2" and flat["id"] == "req-1"
    np.testing.assert_allclose(output(flat, "embedding"), want, rtol=1e-6)

    column = client.post("/v2/models/emb/infer", json=text_request([[t] for t in TEXTS], shape=[3, 1])).json()
    assert "id" not in column
    np.testing.assert_allclose(output(column, "embedding"), want, rtol=1e-6)


def test_infer_specific_version(client, registry):
    request = text_request(TEXTS, parameters={"timeout": 5_000_000})  # Triton's microseconds
    body = client.post("/v2/models/emb/versions/1/infer", json=request).json()
    assert body["model_version"] == "1"
    assert output(body, "embedding").shape == (3, 8)
    np.testing.assert_allclose(output(body, "embedding"), expected_rows(registry, "emb", 1, TEXTS), rtol=1e-6)


def test_infer_token_ids_with_padding_matches_text(client, registry):
    tok = registry.entries[("emb", 2)].tokenizer
    encoded = tok.encode_texts(TEXTS, False)
    width = max(len(e) for e in encoded)
    ids = np.zeros((len(TEXTS), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], mask[i, : len(e)] = e.ids, 1
    request = {"inputs": [
        {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
        {"name": "attention_mask", "shape": list(ids.shape), "datatype": "INT64", "data": mask.tolist()},  # nested
        {"name": "token_type_ids", "shape": list(ids.shape), "datatype": "INT64", "data": [0] * ids.size},
    ]}
    body = client.post("/v2/models/emb/infer", json=request).json()
    np.testing.assert_allclose(output(body, "embedding"), expected_rows(registry, "emb", 2, TEXTS), rtol=1e-6)


def test_infer_token_ids_without_mask_or_special_tokens(client, registry):
    tok = registry.entries[("emb", 2)].tokenizer
    full = tok.encode_texts(["hello world"], False)[0].ids.tolist()
    for ids in (full, full[1:-1]):  # specials are added only when absent
        request = {"inputs": [{"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64", "data": ids}]}
        body = client.post("/v2/models/emb/infer", json=request).json()
        np.testing.assert_allclose(output(body, "embedding"), expected_rows(registry, "emb", 2, ["hello world"]),
                                   rtol=1e-6)


def test_classification_logits_and_probabilities(client, registry):
    body = client.post("/v2/models/cls/infer", json=text_request(TEXTS)).json()
    assert [o["name"] for o in body["outputs"]] == ["logits", "probabilities"]
    logits, probs = output(body, "logits"), output(body, "probabilities")
    np.testing.assert_allclose(logits, expected_rows(registry, "cls", 1, TEXTS), rtol=1e-6)
    assert probs.shape == (3, len(LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()

    only = client.post("/v2/models/cls/infer",
                       json=text_request(TEXTS, outputs=[{"name": "probabilities"}])).json()
    assert [o["name"] for o in only["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(output(only, "probabilities"), probs, rtol=1e-6)


def test_truncate_parameter(client):
    long = "word " * (MAX_SEQ_LEN * 2)
    assert_error(client.post("/v2/models/emb/infer", json=text_request([long])), 422, "invalid_input", "max_seq_len")
    ok = client.post("/v2/models/emb/infer", json=text_request([long], parameters={"truncate": True}))
    assert ok.status_code == 200, ok.text


def test_any_content_type_is_read_as_json(client):
    # tritonclient sends no Content-Type; `curl -d` sends form-urlencoded.
    raw = json.dumps(text_request(["hello"])).encode()
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):
        resp = client.post("/v2/models/emb/infer", content=raw, headers=headers)
        assert resp.status_code == 200, resp.text


def test_binary_request_and_response(client, registry):
    texts = ["hello", "world"]
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    head = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}]}).encode()
    resp = client.post("/v2/models/emb/infer", content=head + raw,
                       headers={"Inference-Header-Content-Length": str(len(head))})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    size = int(resp.headers["Inference-Header-Content-Length"])
    meta = json.loads(resp.content[:size])
    out = meta["outputs"][0]
    assert "data" not in out and out["parameters"]["binary_data_size"] == 2 * 16 * 4
    got = np.frombuffer(resp.content[size:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(got, expected_rows(registry, "emb", 2, texts), rtol=1e-6)


def _tensor(name="text", datatype="BYTES", shape=(1,), data=("hello",), **extra) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": list(data), **extra}


BAD_REQUESTS = {
    "wrong datatype": ({"inputs": [_tensor(datatype="FP32", data=[1.0])]}, "datatype"),
    "shape mismatch": ({"inputs": [_tensor(shape=[2])]}, "shape"),
    "empty inputs": ({"inputs": []}, "inputs is empty"),
    "empty batch": ({"inputs": [_tensor(shape=[0], data=[])]}, "empty"),
    "non-string bytes": ({"inputs": [_tensor(data=[5])]}, "must be strings"),
    "empty string": ({"inputs": [_tensor(data=["  "])]}, "empty string"),
    "bad text shape": ({"inputs": [_tensor(shape=[1, 2], data=["a", "b"])]}, "[N, 1]"),
    "text and ids": ({"inputs": [_tensor(), _tensor("input_ids", "INT64", [1, 1], [101])]}, "either"),
    "out of vocab": ({"inputs": [_tensor("input_ids", "INT64", [1, 3], [101, 10 ** 9, 102])]}, "vocabulary"),
    "negative id": ({"inputs": [_tensor("input_ids", "INT64", [1, 1], [-5])]}, "vocabulary"),
    "overflow": ({"inputs": [_tensor("input_ids", "INT64", [1, 1], [2 ** 70])]}, "INT64"),
    "float ids": ({"inputs": [_tensor("input_ids", "INT64", [1, 2], [101.0, 102])]}, "integers"),
    "bool ids": ({"inputs": [_tensor("input_ids", "INT64", [1, 1], [True])]}, "integers"),
    "ids not 2-d": ({"inputs": [_tensor("input_ids", "INT64", [2], [101, 102])]}, "[N, T]"),
    "missing input_ids": ({"inputs": [_tensor("attention_mask", "INT64", [1, 1], [1])]}, "input_ids is missing"),
    "mask shape": ({"inputs": [_tensor("input_ids", "INT64", [1, 2], [101, 102]),
                               _tensor("attention_mask", "INT64", [2, 1], [1, 1])]}, "must match"),
    "left padding": ({"inputs": [_tensor("input_ids", "INT64", [1, 3], [0, 101, 102]),
                                 _tensor("attention_mask", "INT64", [1, 3], [0, 1, 1])]}, "right padding"),
    "mask values": ({"inputs": [_tensor("input_ids", "INT64", [1, 1], [101]),
                                _tensor("attention_mask", "INT64", [1, 1], [2])]}, "0 and 1"),
    "all masked": ({"inputs": [_tensor("input_ids", "INT64", [1, 1], [101]),
                               _tensor("attention_mask", "INT64", [1, 1], [0])]}, "empty"),
    "sentence pairs": ({"inputs": [_tensor("input_ids", "INT64", [1, 1], [101]),
                                   _tensor("token_type_ids", "INT64", [1, 1], [1])]}, "sentence pairs"),
    "unknown input": ({"inputs": [_tensor("input_ids", "INT64", [1, 1], [101]),
                                  _tensor("position_ids", "INT64", [1, 1], [0])]}, "position_ids"),
    "duplicate input": ({"inputs": [_tensor(), _tensor()]}, "twice"),
    "no data": ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}, "no data"),
    "binary without header": ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"binary_data_size": 9}}]}, "binary"),
    "shared memory": ({"inputs": [_tensor(parameters={"shared_memory_region": "r"})]}, "shared memory"),
    "unknown output": ({"inputs": [_tensor()], "outputs": [{"name": "logits"}]}, "unknown output"),
    "classification ext": ({"inputs": [_tensor()], "outputs": [{"name": "embedding",
                                                                "parameters": {"classification": 2}}]}, "classification"),
    "truncate not bool": ({"inputs": [_tensor()], "parameters": {"truncate": "yes"}}, "truncate"),
    "bad timeout": ({"inputs": [_tensor()], "parameters": {"timeout": -1}}, "timeout"),
    "negative shape": ({"inputs": [_tensor(shape=[-1])]}, "shape"),
    "missing inputs field": ({"outputs": []}, "inputs"),
    "unknown field": ({"inputs": [_tensor()], "input": []}, "input"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_422(client, case):
    request, says = BAD_REQUESTS[case]
    assert_error(client.post("/v2/models/emb/infer", json=request), 422, "invalid_input", says)


def test_bad_bodies(client):
    assert_error(client.post("/v2/models/emb/infer", content=b"{not json"), 422, "invalid_input", "JSON")
    assert_error(client.post("/v2/models/emb/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}),
                 422, "invalid_input", "Inference-Header-Content-Length")
    assert_error(client.post("/v2/models/emb/infer", content=b"{}", headers={"Inference-Header-Content-Length": "²".encode("latin-1")}),
                 422, "invalid_input", "Inference-Header-Content-Length")
    head = json.dumps({"inputs": [_tensor()]}).encode()
    assert_error(client.post("/v2/models/emb/infer", content=head + b"extra",
                             headers={"Inference-Header-Content-Length": str(len(head))}),
                 422, "invalid_input", "no input claims")
    bad_utf8 = struct.pack("<I", 2) + b"\xff\xfe"
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(bad_utf8)}}]}).encode()
    assert_error(client.post("/v2/models/emb/infer", content=head + bad_utf8,
                             headers={"Inference-Header-Content-Length": str(len(head))}),
                 422, "invalid_input", "UTF-8")


# ------------------------------------------------------------------ numbers and strings JSON allows


HUGE = 10 ** 400  # valid JSON: a float overflows on it, and products of it outgrow Python's int-to-str limit


@pytest.mark.parametrize("body,says", [
    ({"inputs": [_tensor(shape=[HUGE])]}, "shape"),
    ({"inputs": [_tensor(shape=[HUGE] * 12)]}, "shape"),
    ({"inputs": [_tensor()], "parameters": {"timeout": HUGE}}, "timeout"),
    ({"inputs": [_tensor()], "parameters": {"timeout": 2 ** 64}}, "timeout"),
], ids=["huge dim", "huge dims", "huge timeout", "timeout past int64"])
def test_huge_numbers_are_422(client, body, says):
    resp = raw_post(client, "/v2/models/emb/infer", body)
    assert_error(resp, 422, "invalid_input", says)
    assert len(resp.json()["error"]["message"]) < 300  # names the problem, does not print the number


@pytest.mark.parametrize("shape,status,type_,says", [
    ([10 ** 12, 0], 413, "payload_too_large", "at most"),
    ([0, 2 ** 62], 422, "invalid_input", "empty"),
])
def test_empty_tensors_of_huge_shapes_are_refused_before_they_are_built(client, shape, status, type_, says):
    # Both hold 0 values, as many as were sent: rows and masks must be counted before they are made.
    body = {"inputs": [_tensor("input_ids", "INT64", shape, []), _tensor("attention_mask", "INT64", shape, [])]}
    assert_error(raw_post(client, "/v2/models/emb/infer", body), status, type_, says)


def test_request_id_with_a_lone_surrogate_is_422(client):
    # The id is echoed in the answer, and an unpaired surrogate has no UTF-8 encoding.
    resp = raw_post(client, "/v2/models/emb/infer", text_request(["hello"], id="req-\ud800"))
    assert_error(resp, 422, "invalid_input", "id")
    assert "surrogate" in resp.json()["error"]["message"]


def test_error_messages_are_capped(client):
    from service.api.errors import MAX_MESSAGE_CHARS

    resp = raw_post(client, "/v2/models/emb/infer", text_request(["hi"], outputs=[{"name": "o" * 50_000}]))
    assert_error(resp, 422, "invalid_input", "unknown output")
    assert len(resp.json()["error"]["message"]) <= MAX_MESSAGE_CHARS


def test_texts_with_lone_surrogates_are_422(client):
    resp = raw_post(client, "/v2/models/emb/infer", text_request(["fine", "bad \ud800"]))
    assert_error(resp, 422, "invalid_input", "text[1]")
    assert "surrogate" in resp.json()["error"]["message"]


def test_unknown_model_and_version_on_infer(client):
    assert_error(client.post("/v2/models/nope/infer", json=text_request(["hi"])), 404, "model_not_found")
    assert_error(client.post("/v2/models/emb/versions/7/infer", json=text_request(["hi"])), 404, "model_not_found")
    assert_error(client.post("/v2/models/broken/infer", json=text_request(["hi"])), 503, "not_ready")


def test_openapi_describes_infer(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        post = schema["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferenceRequest")
        assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferenceResponse")
    components = schema["components"]["schemas"]
    assert {"inputs", "outputs", "parameters", "id"} <= set(components["InferenceRequest"]["properties"])
    assert {"name", "shape", "datatype", "data"} <= set(components["RequestInput"]["properties"])
    assert "/v2/models/{model}" in schema["paths"] and "/v2/health/ready" in schema["paths"]


# ------------------------------------------------------------------ tritonclient against a live server


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, tokenizer_dir):
    registry = make_registry(tmp_path_factory.mktemp("live-store"), tokenizer_dir)
    with LiveServer(create_app(registry.settings, registry=registry)) as live:
        yield f"127.0.0.1:{live.port}", registry


def test_tritonclient_live(live_server):
    import tritonclient.http as httpclient

    url, registry = live_server
    texts = [b"hello", b"world"]
    want = expected_rows(registry, "emb", 2, [t.decode() for t in texts])
    client = httpclient.InferenceServerClient(url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("emb") and not client.is_model_ready("nope")
        meta = client.get_model_metadata("emb")
        assert meta["name"] == "emb" and meta["versions"] == ["1", "2"]
        assert client.get_server_metadata()["name"] == "bertserve"

        for binary in (False, True):
            text = httpclient.InferInput("text", [2], "BYTES")
            text.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
            result = client.infer("emb", [text], outputs=[httpclient.InferRequestedOutput("embedding",
                                                                                          binary_data=binary)],
                                  request_id="r1")
            np.testing.assert_allclose(result.as_numpy("embedding"), want, rtol=1e-6)
            assert result.get_response()["id"] == "r1"

        # No outputs named: tritonclient asks for all of them in binary (binary_data_output).
        text = httpclient.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array(texts, dtype=object).reshape(2, 1))
        result = client.infer("emb", [text], model_version="1")
        np.testing.assert_allclose(result.as_numpy("embedding"),
                                   expected_rows(registry, "emb", 1, ["hello", "world"]), rtol=1e-6)

        # Binary INT64 token ids with right padding, against a classifier.
        tok = registry.entries[("cls", 1)].tokenizer
        encoded = tok.encode_texts(["hello", "hello world"], False)
        ids = np.zeros((2, max(len(e) for e in encoded)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, : len(e)], mask[i, : len(e)] = e.ids, 1
        inputs = [httpclient.InferInput("input_ids", list(ids.shape), "INT64"),
                  httpclient.InferInput("attention_mask", list(ids.shape), "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(mask)
        result = client.infer("cls", inputs)
        np.testing.assert_allclose(result.as_numpy("logits"),
                                   expected_rows(registry, "cls", 1, ["hello", "hello world"]), rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, rtol=1e-5)
    finally:
        client.close()
