"""Inputs longer than max_seq_len on every API: refused, truncated, or split into position windows whose
rows are averaged by new tokens; and sentence-transformers prompts. Fake models of max_seq_len 32."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from service.settings import ServiceSettings
from tests.helpers import assert_error, expected_row

MAX_SEQ_LEN = 32  # make_registry's
ROOM = MAX_SEQ_LEN - 2  # [CLS] and [SEP]
LONG = " ".join(f"word{i} of the report" for i in range(40))  # about 200 tokens: 9 windows of 30 at overlap 8


def raw_ids(client, text: str) -> list[int]:
    """The text's token ids without special tokens, straight from the tokenizer file."""
    entry = client.registry.get("minilm")
    tok = Tokenizer.from_file(str(entry.path / "tokenizer" / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok.encode(text, add_special_tokens=False).ids


def windowed_row(client, ids: list[int], overlap: int, model: str = "minilm", normalize: bool = True):
    """The expected answer, computed here without service/long_input.py: windows of ROOM tokens that
    start every ROOM - overlap tokens until one reaches the end, each embedded alone with [CLS] and [SEP],
    averaged with weights of the tokens no earlier window held. Also the windows and their tokens."""
    backend = client.registry.get(model).backends[0]
    rows, weights, start, covered, tokens = [], [], 0, 0, 0
    while True:
        end = min(start + ROOM, len(ids))
        rows.append(backend.row(np.asarray([101, *ids[start:end], 102])))
        tokens += end - start + 2
        weights.append(end - covered)
        covered = end
        if end == len(ids):
            break
        start += ROOM - overlap
    mean = np.average(np.stack(rows).astype(np.float64), axis=0, weights=weights)
    return (mean / np.linalg.norm(mean) if normalize else mean), len(rows), tokens


@pytest.fixture
def settings() -> ServiceSettings:
    return ServiceSettings(max_queue_delay_ms=5, max_batch_size=32, window_overlap=8, max_windows_per_input=16)


def test_long_text_is_refused_by_default_and_the_message_names_the_ways_out(client):
    response = client.post("/v1/embeddings", json={"input": ["short", LONG]})
    assert_error(response, 422, "invalid_input", "input[1]", "max_seq_len of 32", "long_input")


def test_window_is_the_weighted_mean_of_windows_embedded_alone(client):
    ids = raw_ids(client, LONG)
    expected, windows, tokens = windowed_row(client, ids, overlap=8)
    assert windows == 9
    body = client.post("/v1/embeddings", json={"input": ["short", LONG], "long_input": "window"}).json()
    got = np.asarray(body["data"][1]["embedding"])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(body["data"][0]["embedding"], expected_row(client, "short")[0], atol=1e-6)
    # usage counts what reached the model: every window with its special tokens, overlaps included
    assert body["usage"]["prompt_tokens"] == expected_row(client, "short")[1] + tokens


def test_windows_of_one_document_batch_together(client):
    backend = client.registry.get("minilm").backends[0]
    backend.batches.clear()
    assert client.post("/embed", json={"inputs": LONG, "long_input": "window"}).status_code == 200
    assert sum(size for size, _ in backend.batches) == 9
    assert len(backend.batches) < 9  # windows share batches; they are not run one by one


def test_truncate_keeps_either_end(client):
    for direction in ("right", "left"):
        answer = client.post("/embed", json={"inputs": LONG, "long_input": "truncate",
                                             "truncation_direction": direction})
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()[0], expected_row(client, LONG, truncate=True, direction=direction)[0],
                                   atol=1e-6)


def test_server_default_applies_and_an_explicit_tei_truncate_false_still_refuses(tmp_path, settings):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.helpers import make_registry

    settings = settings.model_copy(update={"long_input": "window"})
    registry = make_registry(tmp_path, settings)
    with TestClient(create_app(settings, registry=registry)) as client:
        client.registry = registry
        expected, *_ = windowed_row(client, raw_ids(client, LONG), overlap=8)
        np.testing.assert_allclose(client.post("/embed", json={"inputs": LONG}).json()[0], expected, atol=1e-6)
        assert client.get("/info").json()["long_input"] == "window"
        assert_error(client.post("/embed", json={"inputs": LONG, "truncate": False}), 422, "invalid_input", "inputs[0]")
        # long_input wins over truncate
        answer = client.post("/embed", json={"inputs": LONG, "truncate": False, "long_input": "window"})
        np.testing.assert_allclose(answer.json()[0], expected, atol=1e-6)


def test_a_models_own_policy_beats_the_server_and_a_request_beats_both(client):
    entry = client.registry.get("minilm")
    entry.manifest = entry.manifest.model_copy(update={"long_input": "window", "window_overlap": 4})
    expected, *_ = windowed_row(client, raw_ids(client, LONG), overlap=4)
    np.testing.assert_allclose(client.post("/embed", json={"inputs": LONG}).json()[0], expected, atol=1e-6)
    assert_error(client.post("/embed", json={"inputs": LONG, "long_input": "error"}), 422, "invalid_input")


def test_too_many_windows_is_413_naming_the_limit(client):
    huge = " ".join(f"token{i}" for i in range(400))  # far more than 16 windows of 30
    response = client.post("/v1/embeddings", json={"input": huge, "long_input": "window"})
    assert_error(response, 413, "payload_too_large", "input[0]", "windows", "BERTSERVE_MAX_WINDOWS_PER_INPUT")


def test_token_ids_are_windowed_too(client):
    ids = raw_ids(client, LONG)
    expected, *_ = windowed_row(client, ids, overlap=8)
    body = client.post("/v1/embeddings", json={"input": [ids], "long_input": "window"}).json()
    np.testing.assert_allclose(body["data"][0]["embedding"], expected, atol=1e-6)


def test_a_classifier_averages_its_windows_logits(client):
    ids = raw_ids(client, LONG)
    expected, *_ = windowed_row(client, ids, overlap=8, model="clf", normalize=False)
    scores = client.post("/predict", json={"inputs": LONG, "long_input": "window", "raw_scores": True, "model": "clf"})
    assert scores.status_code == 200, scores.text
    labels = client.registry.get("clf").manifest.labels
    got = {s["label"]: s["score"] for s in scores.json()}
    np.testing.assert_allclose([got[label] for label in labels], expected, atol=1e-5)


def test_kserve_takes_the_policy_as_a_parameter(client):
    expected, *_ = windowed_row(client, raw_ids(client, LONG), overlap=8)
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [LONG]}],
            "parameters": {"long_input": "window"}}
    answer = client.post("/v2/models/minilm/infer", json=body)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["outputs"][0]["data"], expected, atol=1e-6)
    body["parameters"] = {"long_input": "windows"}
    assert_error(client.post("/v2/models/minilm/infer", json=body), 422, "invalid_input",
                 "parameters.long_input", "error, truncate, window")


@pytest.mark.parametrize("route,body", [
    ("/v1/embeddings", {"input": "x", "long_input": "chunk"}),
    ("/embed", {"inputs": "x", "long_input": 3}),
    ("/embed", {"inputs": "x", "truncation_direction": "up"}),
])
def test_bad_policy_values_are_422(client, route, body):
    assert client.post(route, json=body).status_code == 422


# ------------------------------------------------------------------ prompts


def with_prompts(client, default: str | None = None):
    entry = client.registry.get("minilm")
    entry.manifest = entry.manifest.model_copy(
        update={"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": default})
    return entry


def test_prompt_is_put_before_the_text(client):
    with_prompts(client)
    expected, tokens = expected_row(client, "query: wheat exports fell")
    for route, body in (("/embed", {"inputs": "wheat exports fell", "prompt_name": "query"}),
                        ("/v1/embeddings", {"input": "wheat exports fell", "prompt_name": "query"})):
        answer = client.post(route, json=body).json()
        vector = answer[0] if route == "/embed" else answer["data"][0]["embedding"]
        np.testing.assert_allclose(vector, expected, atol=1e-6)
    assert answer["usage"]["prompt_tokens"] == tokens  # the prompt's tokens are counted


def test_default_prompt_applies_when_none_is_named(client):
    with_prompts(client, default="passage")
    np.testing.assert_allclose(client.post("/embed", json={"inputs": "oil"}).json()[0],
                               expected_row(client, "passage: oil")[0], atol=1e-6)


def test_prompt_tokens_count_toward_the_length_limit_and_ride_in_every_window(client):
    with_prompts(client)
    text = " ".join(["grain"] * 29)  # 29 tokens fit alone, not after "query :" (3 tokens)
    assert client.post("/embed", json={"inputs": text}).status_code == 200
    assert_error(client.post("/embed", json={"inputs": text, "prompt_name": "query"}), 422, "invalid_input",
                 "max_seq_len of 32")
    backend = client.registry.get("minilm").backends[0]
    backend.seen_ids.clear()
    assert client.post("/embed", json={"inputs": LONG, "prompt_name": "query", "long_input": "window"}).status_code == 200
    prompt = raw_ids(client, "query: ")
    assert len(backend.seen_ids) > 1 and all(row[1:1 + len(prompt)] == prompt for row in backend.seen_ids)
    assert max(len(row) for row in backend.seen_ids) == MAX_SEQ_LEN


def test_prompt_errors(client):
    assert_error(client.post("/embed", json={"inputs": "x", "prompt_name": "query"}), 422, "invalid_input",
                 "has no prompts")
    with_prompts(client)
    assert_error(client.post("/embed", json={"inputs": "x", "prompt_name": "search"}), 422, "invalid_input",
                 "'search'", "passage, query")
    assert_error(client.post("/v1/embeddings", json={"input": [101, 2000, 102], "prompt_name": "query"}), 422,
                 "invalid_input", "token ids")
    assert client.get("/info").json()["prompts"] == {"query": "query: ", "passage": "passage: "}
