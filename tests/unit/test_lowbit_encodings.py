"""The low-bit encodings (service/embedding_types.py) and the manifest's calibration ranges, without torch.

The comparison with sentence-transformers' own quantize_embeddings needs torch: it is in
tests/integration/test_embedding_types_st.py."""

import numpy as np
import pytest

from service.embedding_types import packed_width, quantize, to_binary, to_int8, to_ubinary, to_uint8
from service.manifest import ManifestError, load_manifest
from tests.helpers import make_variant

RNG = np.random.default_rng(7)


def test_int8_and_uint8_are_the_same_buckets_128_apart():
    rows = RNG.normal(size=(50, 16)).astype(np.float32)
    lo, hi = rows[:30].min(0), rows[:30].max(0)  # the last 20 rows fall partly outside
    u, i = to_uint8(rows, lo, hi), to_int8(rows, lo, hi)
    assert u.dtype == np.uint8 and i.dtype == np.int8 and u.shape == i.shape == rows.shape
    np.testing.assert_array_equal(u.astype(np.int16) - 128, i)
    # Inside the range, a value lands in the bucket that contains it; outside, it saturates.
    step = (hi - lo) / 255
    inside = (rows >= lo) & (rows < hi)
    assert np.all((lo + u * step <= rows + 1e-6)[inside]) and np.all((rows < lo + (u.astype(float) + 1) * step + 1e-6)[inside])
    assert np.all(u[rows < lo] == 0) and np.all(u[rows > hi] == 255)
    assert u[:30].min() == 0 and np.all(u[:30].max(0) >= 254)  # the calibration rows span the whole scale


def test_hand_computed_buckets_and_a_constant_dimension():
    lo, hi = [0.0, -1.0, 0.5], [2.55, 1.55, 0.5]  # steps 0.01 and 0.01; the third dimension is constant
    rows = np.array([[0.0, -1.0, 0.5], [1.005, 0.0, 0.7], [9.0, -9.0, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(rows, lo, hi), [[0, 0, 0], [100, 100, 0], [255, 0, 0]])
    np.testing.assert_array_equal(to_int8(rows, lo, hi), [[-128, -128, -128], [-28, -28, -128], [127, -128, -128]])


def test_bits_are_signs_packed_big_end_first_with_zero_padding():
    rows = np.array([[1, -1, 1, 0, 0.5, -2, 0, 3, -1, 2, 0.1]], dtype=np.float32)  # 11 dimensions
    ub = to_ubinary(rows)
    assert ub.dtype == np.uint8 and ub.shape == (1, packed_width(11)) == (1, 2)
    assert ub.tolist() == [[0b10101001, 0b01100000]]  # 0 counts as not positive; 5 padding bits of zero
    b = to_binary(rows)
    assert b.dtype == np.int8 and b.tolist() == [[0b10101001 - 128, 0b01100000 - 128]]
    assert packed_width(8) == 1 and packed_width(384) == 48 and packed_width(1) == 1


def test_truncated_rows_use_the_first_ranges():
    rows = RNG.normal(size=(5, 10)).astype(np.float32)
    lo, hi = rows.min(0) - 0.1, rows.max(0) + 0.1
    np.testing.assert_array_equal(quantize(rows[:, :4], "int8", lo, hi), quantize(rows, "int8", lo, hi)[:, :4])


def test_quantize_refuses_what_it_cannot_do():
    rows = np.zeros((1, 4), dtype=np.float32)
    assert quantize(rows, "float") is rows
    with pytest.raises(ValueError, match="needs calibration ranges"):
        quantize(rows, "uint8")
    with pytest.raises(ValueError, match="cover 3 dimensions"):
        quantize(rows, "int8", [0] * 3, [1] * 3)
    with pytest.raises(ValueError, match="unknown embedding type"):
        quantize(rows, "int4")


# ------------------------------------------------------------------ manifest


def with_ranges(tmp_path, **ranges):
    import json

    make_variant(tmp_path / "v")
    path = tmp_path / "v" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["embedding_ranges"] = {"min": [-1.0] * 8, "max": [1.0] * 8, "samples": 800, "dataset": "reuters-r8",
                               "split": "train", **ranges}
    path.write_text(json.dumps(raw))
    return raw


def test_manifest_ranges_load_and_old_manifests_still_do(tmp_path):
    make_variant(tmp_path / "old")
    assert load_manifest(tmp_path / "old").embedding_ranges is None
    with_ranges(tmp_path)
    ranges = load_manifest(tmp_path / "v").embedding_ranges
    assert ranges.samples == 800 and ranges.split == "train" and len(ranges.min) == 8


@pytest.mark.parametrize("change,needle", [
    ({"min": [-1.0] * 7, "max": [1.0] * 7}, "7 dimensions, embedding_dim is 8"),
    ({"max": [1.0] * 7}, "min has 8 values and max 7"),
    ({"min": [-1.0] * 7 + [2.0]}, "dimension 7: min 2.0 is above max 1.0"),
    ({"split": "test"}, "embedding_ranges.split"),
    ({"samples": 0}, "embedding_ranges.samples"),
])
def test_manifest_refuses_ranges_that_do_not_fit(tmp_path, change, needle):
    with_ranges(tmp_path, **change)
    with pytest.raises(ManifestError, match=needle):
        load_manifest(tmp_path / "v")
