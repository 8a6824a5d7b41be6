"""Large requests never run on the event loop, /tokenize is admitted and shed like inference, and one
request's tokens are capped (413 naming the limit)."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.backends.fake import FakeBackend
from service.settings import ServiceSettings
from tests.helpers import make_registry

NEWS = ("Oil prices rose sharply on Monday after the cartel agreed to cut output, traders said, while wheat "
        "exports fell for a third week. ")


@pytest.fixture
def app_parts(tmp_path):
    settings = ServiceSettings(model_store=tmp_path, max_tokens_per_request=3_000, max_body_bytes=400_000,
                               max_chars_per_text=100_000, access_log=False)
    backend = FakeBackend(dim=8)
    registry = make_registry(tmp_path, settings, {"minilm": backend}, max_seq_len=64)
    return settings, registry, backend


def threads_used(monkeypatch, obj, name: str) -> list[str]:
    """Record the thread each call of ``obj.name`` runs on."""
    seen, original = [], getattr(obj, name)

    def recording(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, recording)
    return seen


def test_large_tokenize_and_token_id_requests_run_in_the_tokenizer_pool(app_parts, monkeypatch):
    settings, registry, _ = app_parts
    tok = registry.get("minilm").tokenizer
    tokenize_threads = threads_used(monkeypatch, tok, "tokenize")
    ids_threads = threads_used(monkeypatch, tok, "encode_token_ids")
    with TestClient(create_app(settings, registry=registry)) as client:
        assert client.post("/tokenize", json={"inputs": [NEWS * 4] * 4}).status_code == 200
        assert client.post("/tokenize", json={"inputs": "short"}).status_code == 200
        rows = [[101] + [2000 + i for i in range(40)] + [102]] * 60  # 2,520 ids: too many for the loop
        assert client.post("/v1/embeddings", json={"input": rows}).status_code == 200
    assert tokenize_threads[0].startswith("tokenize") and ids_threads[0].startswith("tokenize")
    assert not tokenize_threads[1].startswith("tokenize")  # a short one stays on the loop: cheaper


@pytest.mark.parametrize("form", ["tokens", "compact"])
def test_tokens_per_request_are_capped_with_a_413_naming_the_limit(app_parts, form):
    settings, registry, backend = app_parts
    with TestClient(create_app(settings, registry=registry)) as client:
        r = client.post("/tokenize", json={"inputs": [NEWS * 40] * 4, "format": form})
        assert r.status_code == 413, r.text
        message = r.json()["error"]["message"]
        assert "tokens" in message and "3000" in message and "BERTSERVE_MAX_TOKENS_PER_REQUEST" in message
        # The embedding routes count what reaches inference (after truncation) under the same cap.
        r = client.post("/embed", json={"inputs": [NEWS * 4] * 50, "truncate": True})
        assert r.status_code == 413 and "BERTSERVE_MAX_TOKENS_PER_REQUEST" in r.text
        assert backend.seen_ids == []
        assert client.post("/embed", json={"inputs": [NEWS] * 4, "truncate": True}).status_code == 200


def test_compact_tokenize_holds_what_the_tei_form_holds(app_parts):
    settings, registry, _ = app_parts
    texts = ["Oil prices rose.", "Wheat exports fell sharply"]
    with TestClient(create_app(settings, registry=registry)) as client:
        tei = client.post("/tokenize", json={"inputs": texts}).json()
        compact = client.post("/tokenize", json={"inputs": texts, "format": "compact"}).json()
    assert len(tei) == len(compact) == 2
    for tokens, packed in zip(tei, compact):
        assert [t["id"] for t in tokens] == packed["ids"]
        assert [t["text"] for t in tokens] == packed["tokens"]
        assert [int(t["special"]) for t in tokens] == packed["special"]
        assert [[t["start"], t["stop"]] for t in tokens if not t["special"]] == \
            [list(o) for o, s in zip(packed["offsets"], packed["special"]) if not s]
    assert tei[0][0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}


def test_a_large_kserve_tensor_is_parsed_and_decoded_in_the_tokenizer_pool(app_parts, monkeypatch):
    from service.api import kserve

    settings, registry, _ = app_parts
    decode_threads = threads_used(monkeypatch, kserve, "_read_inputs")
    parse_threads = threads_used(monkeypatch, kserve.json, "loads")
    rows = [[101] + [2000 + i for i in range(40)] + [102]] * 50
    body = {"inputs": [{"name": "input_ids", "shape": [50, 42], "datatype": "INT64", "data": rows}]}
    with TestClient(create_app(settings, registry=registry)) as client:
        r = client.post("/v2/models/minilm/infer", json=body)
        assert r.status_code == 200, r.text
    assert decode_threads and all(name.startswith("tokenize") for name in decode_threads)
    assert parse_threads and all(name.startswith("tokenize") for name in parse_threads)
