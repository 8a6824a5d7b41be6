"""TEI's POST /decode: token ids back to text, one string per id sequence; every id checked against the
vocabulary, limits as on the other routes, errors in the one error shape, keys as on inference routes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers import make_registry

TEXTS = ["Hello World, how ARE you?", "Tokens go back to text."]


def token_ids(client, texts, add_special_tokens: bool = True) -> list[list[int]]:
    answer = client.post("/tokenize", json={"inputs": texts, "format": "compact",
                                            "add_special_tokens": add_special_tokens})
    assert answer.status_code == 200, answer.text
    return [row["ids"] for row in answer.json()]


def assert_refused(resp, status: int, type_: str, *says: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == type_, error
    for text in says:
        assert text in error["message"], error["message"]


def test_tokenize_then_decode_gives_the_text_back_lower_cased(client):
    ids = token_ids(client, TEXTS)
    assert ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] ... [SEP]
    decoded = client.post("/decode", json={"ids": ids})
    assert decoded.status_code == 200, decoded.text
    # MiniLM's vocabulary is uncased: the text comes back lower-cased; special tokens are skipped by default.
    assert decoded.json() == ["hello world, how are you?", "tokens go back to text."]


def test_a_bare_list_of_ids_is_one_sequence_and_gets_a_list_of_one(client):
    ids = token_ids(client, [TEXTS[0]])[0]
    assert client.post("/decode", json={"ids": ids}).json() == ["hello world, how are you?"]
    assert client.post("/decode", json={"ids": [ids]}).json() == ["hello world, how are you?"]


def test_skip_special_tokens_true_and_false(client):
    ids = token_ids(client, ["Hello world"])
    kept = client.post("/decode", json={"ids": ids, "skip_special_tokens": False})
    assert kept.status_code == 200 and kept.json() == ["[CLS] hello world [SEP]"]
    assert client.post("/decode", json={"ids": ids, "skip_special_tokens": True}).json() == ["hello world"]
    # Without special tokens to skip, both give the same.
    plain = token_ids(client, ["Hello world"], add_special_tokens=False)
    assert client.post("/decode", json={"ids": plain, "skip_special_tokens": False}).json() == ["hello world"]


def test_model_names_the_tokenizer(client):
    ids = token_ids(client, ["great results"])
    assert client.post("/decode", json={"ids": ids, "model": "clf"}).json() == ["great results"]
    assert_refused(client.post("/decode", json={"ids": ids, "model": "nope"}), 404, "model_not_found")


@pytest.mark.parametrize("body,says", [
    ({"ids": [101, -1, 102]}, ["ids[1]", "-1", "vocabulary"]),
    ({"ids": [[101, 102], [7592, 10 ** 30]]}, ["ids[1][1]", "vocabulary of 30522"]),
    ({"ids": [30522]}, ["ids[0]", "30522", "vocabulary"]),
    ({"ids": [101, True, 102]}, ["ids[1] is true", "not a token id"]),
    ({"ids": [[101], [False]]}, ["ids[1][0] is false", "not a token id"]),
    ({"ids": [101, 7592.0]}, ["ids[1] is 7592.0", "not a token id"]),
    ({"ids": [[101], [0.5]]}, ["ids[1][0] is 0.5", "not a token id"]),
    ({"ids": [101, None]}, ["ids[1] is null"]),
    ({"ids": [101, "7592"]}, ["ids[1] is '7592'", "not a token id"]),
    ({"ids": [101, [7592]]}, ["ids[1] is [7592]", "not a token id"]),
    ({"ids": [[101], 7592]}, ["ids[1] is 7592", "not a list of token ids"]),
    ({"ids": [[[101]]]}, ["ids[0][0] is [101]", "not a token id"]),
    ({"ids": []}, ["ids is an empty list"]),
    ({"ids": [[101], []]}, ["ids[1] is an empty list"]),
    ({"ids": "hello"}, ["ids"]),
    ({"ids": [101], "skip_special_tokens": "maybe"}, ["skip_special_tokens"]),
    ({"ids": [101], "inputs": "x"}, ["inputs", "not permitted"]),
    ({}, ["ids", "Field required"]),
], ids=["negative", "huge", "vocab size", "true", "false", "float", "fraction", "null", "string", "mixed list",
        "mixed id", "nested", "empty", "empty inner", "text", "bad flag", "unknown field", "missing"])
def test_every_bad_id_is_422_naming_its_position(client, body, says):
    assert_refused(client.post("/decode", json=body), 422, "invalid_input", *says)


def test_sequences_and_ids_per_request_are_capped_with_413(tmp_path):
    settings = ServiceSettings(model_store=tmp_path, max_inputs_per_request=4, max_tokens_per_request=50)
    with TestClient(create_app(settings, registry=make_registry(tmp_path, settings))) as client:
        assert client.post("/decode", json={"ids": [[101, 102]] * 4}).status_code == 200
        assert_refused(client.post("/decode", json={"ids": [[101, 102]] * 5}), 413, "payload_too_large",
                       "ids has 5 items", "at most 4")
        assert client.post("/decode", json={"ids": [7592] * 50}).status_code == 200
        assert_refused(client.post("/decode", json={"ids": [7592] * 51}), 413, "payload_too_large",
                       "51 tokens", "BERTSERVE_MAX_TOKENS_PER_REQUEST")
        assert_refused(client.post("/decode", json={"ids": [[7592] * 30, [7592] * 21]}), 413, "payload_too_large",
                       "51 tokens")
        # The caps are decided before any id is looked at: a bad id past them is not what is reported.
        assert client.post("/decode", json={"ids": [-1] * 51}).status_code == 413


def test_large_requests_decode_in_the_tokenizer_pool(tmp_path, monkeypatch):
    import threading

    settings = ServiceSettings(model_store=tmp_path)
    registry = make_registry(tmp_path, settings)
    tok = registry.get("minilm").tokenizer
    seen, original = [], tok.decode

    def recording(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(tok, "decode", recording)
    with TestClient(create_app(settings, registry=registry)) as client:
        assert client.post("/decode", json={"ids": [[7592] * 500] * 5}).status_code == 200  # 2,500 ids
        assert client.post("/decode", json={"ids": [7592, 2088]}).json() == ["hello world"]
    assert seen[0].startswith("tokenize") and not seen[1].startswith("tokenize")


def test_decode_is_shed_at_the_door_like_tokenize(tmp_path, monkeypatch):
    settings = ServiceSettings(model_store=tmp_path)
    registry = make_registry(tmp_path, settings)
    batcher = registry.entries[("minilm", 1)].batcher
    with TestClient(create_app(settings, registry=registry)) as client:
        monkeypatch.setattr(batcher.admission, "saturated", lambda items: True)
        r = client.post("/decode", json={"ids": [[101, 102]] * 3})
        assert_refused(r, 429, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        monkeypatch.undo()
        assert client.post("/decode", json={"ids": [101, 7592, 102]}).json() == ["hello"]
        metrics = client.get("/metrics").text
        assert 'bertserve_requests_total{code="429",model="minilm",protocol="http",route="/decode"} 1.0' in metrics
        assert 'bertserve_requests_total{code="200",model="minilm",protocol="http",route="/decode"} 1.0' in metrics
    assert batcher.admission.held == 0


def test_decode_needs_a_key_like_the_other_inference_routes(tmp_path):
    settings = ServiceSettings(model_store=tmp_path, api_keys="key-one")
    with TestClient(create_app(settings, registry=make_registry(tmp_path, settings))) as client:
        refused = client.post("/decode", json={"ids": [101, 7592, 102]})
        assert_refused(refused, 401, "unauthorized")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert client.post("/decode", json={"ids": [101, 7592, 102]},
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.post("/decode", json={"ids": [101, 7592, 102]}, headers={"Authorization": "Bearer key-one"})
        assert ok.status_code == 200 and ok.json() == ["hello"]


def test_openapi_describes_decode(client):
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/decode"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("DecodeRequest")
    body = schema["components"]["schemas"]["DecodeRequest"]
    assert set(body["properties"]) == {"ids", "skip_special_tokens", "model"} and body["required"] == ["ids"]
    answer = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array" and answer["items"] == {"type": "string"}
