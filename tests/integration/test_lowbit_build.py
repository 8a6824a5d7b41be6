"""The build records calibration ranges from the train split and the cost table of every embedding type,
on the tiny store the real pipeline built (tests/conftest.py)."""

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

from build_models.corpora import load_split, stratified_sample
from service.manifest import load_verified

# build_tiny_store's evaluation: 40 train and 40 test texts, reuters-r8, default seed 0, 128 tokens.
SAMPLES, SEED, MAX_LEN = 40, 0, 128


def outputs(variant_dir, texts: list[str]) -> np.ndarray:
    """The variant's own outputs, computed here with ORT and the variant's tokenizer, one text at a time."""
    tok = AutoTokenizer.from_pretrained(variant_dir / "tokenizer")
    session = ort.InferenceSession(str(variant_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    rows = []
    for text in texts:
        enc = tok([text], truncation=True, max_length=MAX_LEN, return_tensors="np")
        rows.append(session.run(None, {n: enc[n].astype(np.int64) for n in names})[0][0])
    return np.stack(rows)


def test_ranges_are_the_variants_own_train_outputs(tiny_store):
    variant = tiny_store / "tiny" / "1"
    manifest = load_verified(variant)
    ranges = manifest.embedding_ranges
    assert ranges is not None and ranges.split == "train" and ranges.dataset == "reuters-r8"
    assert ranges.samples == SAMPLES and len(ranges.min) == len(ranges.max) == manifest.embedding_dim == 32
    assert all(lo < hi for lo, hi in zip(ranges.min, ranges.max))
    train = outputs(variant, stratified_sample(load_split("reuters-r8", "train"), SAMPLES, SEED).texts)
    np.testing.assert_allclose(ranges.min, train.min(0), atol=1e-5)
    np.testing.assert_allclose(ranges.max, train.max(0), atol=1e-5)
    # Not the evaluation texts: the test sample (what the build scores on) has other extremes.
    test = outputs(variant, stratified_sample(load_split("reuters-r8", "test"), SAMPLES, SEED + 1).texts)
    assert np.abs(test.max(0) - np.asarray(ranges.max)).max() > 1e-3


def test_cost_table_has_every_type_with_sane_values(tiny_store):
    quality = load_verified(tiny_store / "tiny" / "1").quality
    table = quality.embedding_types
    assert table is not None and table.k == 10 and table.rescore_candidates == 40
    assert table.queries == SAMPLES and table.corpus == 2 * SAMPLES
    rows = {r.type: r for r in table.rows}
    assert list(rows) == ["float32", "int8", "uint8", "binary"]
    assert [rows[t].bytes_per_vector for t in rows] == [128, 32, 32, 4]
    for row in rows.values():
        assert 0 <= row.recall_at_k <= 1 and 0 <= row.probe_accuracy <= 1 and row.probe_retention > 0
        assert row.probe_retention == row.probe_accuracy / quality.reference_value
    # An fp32 ONNX export of the reference: its float vectors rank the corpus as the reference does,
    # its float probe is the variant's headline probe, and rescoring by float can only help binary.
    assert rows["float32"].recall_at_k >= 0.95
    assert rows["float32"].probe_accuracy == quality.value
    for kind in ("int8", "uint8", "binary"):
        assert rows[kind].recall_at_k_rescored >= rows[kind].recall_at_k, kind
    assert rows["float32"].recall_at_k_rescored is None
