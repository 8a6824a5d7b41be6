"""OpenAI and TEI routes through the real app (fake backends): answers, encodings and every bad input."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.helpers import LABELS, LiveServer, assert_error, expected_row, make_registry, raw_post


# ------------------------------------------------------------------ OpenAI


def test_single_string(client):
    r = client.post("/v1/embeddings", json={"input": "Oil prices rose.", "model": "minilm"})
    assert r.status_code == 200, r.text
    body = r.json()
    want, tokens = expected_row(client, "Oil prices rose.")
    assert body["object"] == "list" and body["model"] == "minilm"
    assert body["data"][0]["index"] == 0 and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(body["data"][0]["embedding"], want, atol=1e-6)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_list_of_strings_keeps_order_and_default_model(client):
    texts = ["a much longer sentence about grain exports and shipping", "short", "medium length text here"]
    body = client.post("/v1/embeddings", json={"input": texts}).json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for text, item in zip(texts, body["data"]):
        np.testing.assert_allclose(item["embedding"], expected_row(client, text)[0], atol=1e-6)


def test_token_id_inputs_match_text(client):
    entry = client.registry.get("minilm")
    enc = entry.tokenizer.encode_texts(["wheat exports fell"], False)[0]
    raw = [int(t) for t in enc.ids[1:-1]]  # without [CLS]/[SEP]: the server adds them
    one = client.post("/v1/embeddings", json={"input": raw}).json()
    many = client.post("/v1/embeddings", json={"input": [raw, enc.ids.tolist()]}).json()
    want = expected_row(client, "wheat exports fell")[0]
    for item in [one["data"][0], *many["data"]]:
        np.testing.assert_allclose(item["embedding"], want, atol=1e-6)


def test_base64_and_dimensions(client):
    plain = client.post("/v1/embeddings", json={"input": ["x y z"]}).json()["data"][0]["embedding"]
    b64 = client.post("/v1/embeddings", json={"input": ["x y z"], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, plain, atol=1e-7)
    cut = client.post("/v1/embeddings", json={"input": "x y z", "dimensions": 4}).json()["data"][0]["embedding"]
    assert len(cut) == 4
    np.testing.assert_allclose(cut, np.array(plain[:4]) / np.linalg.norm(plain[:4]), atol=1e-6)
    assert_error(client.post("/v1/embeddings", json={"input": "x", "dimensions": 9}), 422, "invalid_input", "dimensions")


@pytest.mark.parametrize("dimensions", [9, 10 ** 400], ids=["past the model's 8", "10**400"])
def test_dimensions_are_checked_before_inference(client, dimensions):
    backend = client.registry.get("minilm").backends[0]
    r = raw_post(client, "/v1/embeddings", {"input": "x y z", "dimensions": dimensions})
    assert_error(r, 422, "invalid_input", "dimensions", "between 1 and 8")
    assert len(r.json()["error"]["message"]) < 200  # names the limit, does not print a 400-digit number
    assert backend.batches == []  # refused before tokenizing and inference, which it could only waste


def test_models_list(client):
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert ids == {"minilm", "clf"}


@pytest.mark.parametrize("payload,status,type_,needle", [
    ({"input": []}, 422, "invalid_input", "empty"),
    ({"input": ""}, 422, "invalid_input", "empty string"),
    ({"input": ["fine", "   "]}, 422, "invalid_input", "input[1]"),
    ({"input": ["t"] * 17}, 413, "payload_too_large", "at most 16"),
    ({"input": "word " * 40}, 422, "invalid_input", "max_seq_len of 32"),
    ({"input": [[101, 99999999, 102]]}, 422, "invalid_input", "outside this model's vocabulary"),
    ({"input": [-1]}, 422, "invalid_input", "vocabulary"),
    ({"input": [[True, False]]}, 422, "invalid_input", "input"),  # JSON booleans are not token ids
    ({"input": [101, 2.5, 102]}, 422, "invalid_input", "input"),
    ({"input": 5}, 422, "invalid_input", "input"),
    ({"input": "x", "dimensions": True}, 422, "invalid_input", "dimensions"),  # a JSON boolean is no count
    ({"input": "x", "encoding_format": "hex"}, 422, "invalid_input", "encoding_format"),
    ({"input": "x", "model": "nope"}, 404, "model_not_found", "nope"),
    ({"input": "x", "model": "clf"}, 422, "invalid_input", "classification"),
    ({}, 422, "invalid_input", "input"),
])
def test_bad_openai_requests(client, payload, status, type_, needle):
    assert_error(client.post("/v1/embeddings", json=payload), status, type_, needle)


def test_body_limits_and_broken_bodies(client):
    assert_error(client.post("/v1/embeddings", json={"input": "x" * 30_000}), 413, "payload_too_large", "20000 bytes")

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"input": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}'

    assert_error(client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}),
                 413, "payload_too_large")
    r = client.post("/v1/embeddings", content=b'{"input": "unclosed', headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json()
    r = client.post("/v1/embeddings", content=b'{"input": "\xff\xfe bad utf8"}', headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json()
    # A method a route does not take: 405 with the Allow header RFC 9110 requires.
    r = client.delete("/v1/embeddings")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["type"] == "method_not_allowed"
    # The server is still fine afterwards.
    assert client.post("/v1/embeddings", json={"input": "still alive"}).status_code == 200


@pytest.mark.parametrize("path,body,field", [
    ("/v1/embeddings", {"input": "bad \ud800 text"}, "input[0]"),
    ("/v1/embeddings", {"input": ["fine", "\udfff"]}, "input[1]"),
    ("/embed", {"inputs": "bad \ud800"}, "inputs[0]"),
    ("/predict", {"inputs": ["fine", "\udc00\ud800"], "model": "clf"}, "inputs[1]"),
    ("/tokenize", {"inputs": ["\ud800"]}, "inputs[0]"),
])
def test_texts_with_lone_surrogates_are_422(client, path, body, field):
    # JSON may escape half a UTF-16 pair; such a text has no UTF-8 encoding, so no tokenizer can take it.
    r = raw_post(client, path, body)
    assert_error(r, 422, "invalid_input", field, "surrogate")
    assert client.registry.get(body.get("model", "minilm")).backends[0].batches == []


def test_a_non_ascii_request_id_is_echoed_as_sent(tmp_path, settings):
    # HTTP header values are bytes; the id goes back byte for byte, on answers and refusals alike.
    # (A live server: the test client cannot carry a non-ASCII response header.)
    import http.client

    from service.app import create_app

    with LiveServer(create_app(settings, registry=make_registry(tmp_path, settings))) as live:
        for body, status in ((b'{"input": "hi"}', 200), (b'{"input": " "}', 422)):
            conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
            try:
                conn.request("POST", "/v1/embeddings", body=body,
                             headers={"content-type": "application/json", "x-request-id": b"r\xe9q-1"})
                resp = conn.getresponse()
                resp.read()
            finally:
                conn.close()
            assert resp.status == status
            assert resp.getheader("x-request-id").encode("latin-1") == b"r\xe9q-1"


def test_concurrent_mixed_lengths_are_each_answered_correctly(client):
    words = "market oil grain bank shares profit trade ship rates talks".split()
    requests = [[" ".join(words[: 1 + (i * 7 + j * 3) % 10]) for j in range(1 + i % 5)] for i in range(48)]

    def call(texts):
        return texts, client.post("/v1/embeddings", json={"input": texts}).json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, requests))
    for texts, body in results:
        assert len(body["data"]) == len(texts)
        for text, item in zip(texts, body["data"]):
            np.testing.assert_allclose(item["embedding"], expected_row(client, text)[0], atol=1e-6)
    sizes = [shape[0] for shape in client.registry.get("minilm").backends[0].batches]
    assert max(sizes) > 1, "concurrent requests should have been batched together"
    assert max(sizes) <= 8  # max_batch_size


# ------------------------------------------------------------------ TEI


def test_embed(client):
    r = client.post("/embed", json={"inputs": "hello world"})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()[0], expected_row(client, "hello world")[0], atol=1e-6)
    assert len(client.post("/embed", json={"inputs": ["a", "b c"]}).json()) == 2


def test_embed_truncation(client):
    long_text = " ".join(f"w{i}" for i in range(60))
    assert_error(client.post("/embed", json={"inputs": long_text}), 422, "invalid_input", "max_seq_len")
    right = client.post("/embed", json={"inputs": long_text, "truncate": True}).json()[0]
    left = client.post("/embed", json={"inputs": long_text, "truncate": True, "truncation_direction": "Left"}).json()[0]
    np.testing.assert_allclose(right, expected_row(client, long_text, truncate=True)[0], atol=1e-6)
    np.testing.assert_allclose(left, expected_row(client, long_text, truncate=True, direction="left")[0], atol=1e-6)
    assert not np.allclose(left, right)


def test_predict_single_and_batch(client):
    single = client.post("/predict", json={"inputs": "great results", "model": "clf"}).json()
    assert [s["label"] for s in single] and {s["label"] for s in single} == set(LABELS)
    assert abs(sum(s["score"] for s in single) - 1) < 1e-5
    assert single == sorted(single, key=lambda s: -s["score"])
    batch = client.post("/predict", json={"inputs": ["a", "b b"], "model": "clf"}).json()
    assert len(batch) == 2 and all(len(row) == 3 for row in batch)
    raw = client.post("/predict", json={"inputs": "great results", "model": "clf", "raw_scores": True}).json()
    logits = client.registry.get("clf").backends[0].row(
        client.registry.get("clf").tokenizer.encode_texts(["great results"], False)[0].ids)
    assert sorted(s["score"] for s in raw) == pytest.approx(sorted(logits.tolist()), abs=1e-5)
    assert_error(client.post("/predict", json={"inputs": "x"}), 422, "invalid_input", "/embed")


def test_tokenize_info_health(client):
    tokens = client.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["text"] for t in tokens[0]] == ["[CLS]", "hello", "world", "[SEP]"]
    assert tokens[0][1]["start"] == 0 and tokens[0][1]["stop"] == 5 and tokens[0][0]["special"] is True
    info = client.get("/info").json()
    assert info["model_id"] == "minilm" and info["max_input_length"] == 32
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert client.get("/info", params={"model": "clf"}).json()["model_type"]["classifier"]["id2label"]["2"] == "positive"
    assert client.get("/health").json()["status"] == "ok"


def test_openapi_describes_routes(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/embeddings", "/v1/models", "/embed", "/predict", "/tokenize", "/decode", "/info", "/health"):
        assert path in schema["paths"], path
    body = schema["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("EmbeddingRequest")
