"""Our int8/uint8/binary/ubinary encodings equal sentence-transformers' quantize_embeddings given the
same ranges (sentence-transformers imports torch, hence integration)."""

import numpy as np
import pytest
from sentence_transformers import quantize_embeddings

from service.embedding_types import quantize


@pytest.mark.parametrize("dim", [384, 13])
@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_same_as_sentence_transformers(kind, dim):
    rng = np.random.default_rng(dim)
    calibration = rng.normal(size=(200, dim)).astype(np.float32)
    rows = (1.3 * rng.normal(size=(64, dim))).astype(np.float32)  # wider: some values leave the ranges
    rows[0, :5] = 0.0  # exact zeros: not positive for the bit types
    lo, hi = calibration.min(0).astype(float).tolist(), calibration.max(0).astype(float).tolist()
    ours = quantize(rows, kind, lo, hi)
    theirs = quantize_embeddings(rows, kind, ranges=np.vstack([lo, hi]))
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    if kind.endswith("int8"):
        # From the calibration rows themselves sentence-transformers keeps float32 ranges and computes in
        # float32: a value right on a bucket edge can land one bucket away (about 1 in 100,000), never more.
        float32_path = quantize_embeddings(rows, kind, calibration_embeddings=calibration)
        assert np.abs(ours.astype(np.int16) - float32_path.astype(np.int16)).max() <= 1
