"""A long document through the server with position windows, on the real MiniLM (fused fp32 ONNX,
max_seq_len 64): its vector is the weighted mean of its windows embedded one by one in this process."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from build_models.corpora import load_split
from service.manifest import load_verified
from service.settings import ServiceSettings

OVERLAP = 16


@pytest.fixture(scope="module")
def variant(minilm_fp32_store):
    return minilm_fp32_store / "minilm-fp32" / "1"


def one_by_one(variant, text: str) -> np.ndarray:
    """Windows made here (not by service/long_input.py), each run alone through onnxruntime, then the
    mean weighted by new tokens, renormalised as the model normalises."""
    manifest = load_verified(variant)
    tok = Tokenizer.from_file(str(variant / "tokenizer" / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    ids = tok.encode(text, add_special_tokens=False).ids
    session = ort.InferenceSession(str(variant / manifest.model_file), providers=["CPUExecutionProvider"])
    room, rows, weights, start, covered = manifest.max_seq_len - 2, [], [], 0, 0
    while True:
        end = min(start + room, len(ids))
        window = np.asarray([[101, *ids[start:end], 102]], dtype=np.int64)
        feeds = {"input_ids": window, "attention_mask": np.ones_like(window), "token_type_ids": np.zeros_like(window)}
        rows.append(session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0][0])
        weights.append(end - covered)
        covered = end
        if end == len(ids):
            break
        start += room - OVERLAP
    assert len(rows) > 3  # a real long document, not one that fits
    mean = np.average(np.stack(rows).astype(np.float64), axis=0, weights=weights)
    return mean / np.linalg.norm(mean)


def test_long_news_story_equals_its_windows_embedded_alone(variant, minilm_fp32_store):
    from fastapi.testclient import TestClient

    from service.app import create_app

    texts = load_split("reuters-r8", "test").texts
    story = max(texts[:300], key=len)
    settings = ServiceSettings(model_store=minilm_fp32_store, default_model="minilm-fp32", long_input="window",
                               window_overlap=OVERLAP, max_windows_per_input=64, access_log=False)
    with TestClient(create_app(settings)) as client:
        # A short text in the same request shares batches with the windows and must not change them.
        answer = client.post("/v1/embeddings", json={"input": ["Oil prices rose.", story]})
        truncated = client.post("/v1/embeddings", json={"input": story, "long_input": "truncate"})
    assert answer.status_code == 200, answer.text
    got = np.asarray(answer.json()["data"][1]["embedding"])
    np.testing.assert_allclose(got, one_by_one(variant, story), atol=1e-5)
    # and windows say something truncation does not: the vector differs from the first window's
    assert float(got @ np.asarray(truncated.json()["data"][0]["embedding"])) < 0.999
