"""The build's low-bit measurements (build_models/lowbit.py) on synthetic vectors, without torch."""

import numpy as np

from build_models.lowbit import calibration_ranges, embedding_type_table, hamming, recall, rescored, top_k

RNG = np.random.default_rng(3)


def test_hamming_counts_differing_bits():
    a = np.packbits(RNG.integers(0, 2, size=(6, 20)).astype(bool), axis=-1)
    b = np.packbits(RNG.integers(0, 2, size=(9, 20)).astype(bool), axis=-1)
    want = [[int(np.unpackbits(x ^ y).sum()) for y in b] for x in a]
    assert hamming(a, b, chunk=4).tolist() == want


def test_top_k_leaves_the_query_out_and_breaks_ties_by_index():
    scores = np.array([[9.0, 5.0, 5.0, 1.0], [5.0, 9.0, 1.0, 5.0]])
    assert top_k(scores, 2).tolist() == [[1, 2], [0, 3]]
    assert recall(np.array([[1, 2], [0, 3]]), np.array([[2, 1], [3, 2]])) == 0.75


def test_rescoring_every_candidate_is_the_float_ranking():
    q, docs = RNG.normal(size=(3, 8)), RNG.normal(size=(20, 8))
    cand = np.tile(np.arange(20), (3, 1))
    unit = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    assert rescored(cand, q, docs, 5).tolist() == np.argsort(-(q @ unit.T), axis=1)[:, :5].tolist()


def clustered(n: int, centers: np.ndarray, noise: float) -> tuple[np.ndarray, list[int]]:
    labels = RNG.integers(0, len(centers), size=n)
    rows = centers[labels] + noise * RNG.normal(size=(n, centers.shape[1]))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32), labels.tolist()


def test_table_of_a_variant_equal_to_its_reference():
    centers = RNG.normal(size=(4, 64))
    train, train_y = clustered(120, centers, 0.8)
    test, test_y = clustered(60, centers, 0.8)
    ranges = calibration_ranges(train, "synthetic", 128)
    assert ranges["split"] == "train" and ranges["samples"] == 120
    assert ranges["min"] == train.min(0).tolist() and all(lo <= hi for lo, hi in zip(ranges["min"], ranges["max"]))

    def probe(tx, ty, vx, vy):  # nearest class mean: enough to see features carry the labels
        means = np.stack([tx[np.asarray(ty) == c].mean(0) for c in range(4)])
        return float((np.argmin(((vx[:, None] - means[None]) ** 2).sum(-1), 1) == np.asarray(vy)).mean())

    table = embedding_type_table(test, train, test, train, ranges, train_y, test_y, reference_accuracy=0.8,
                                 float_accuracy=0.8, probe=probe)
    rows = {r["type"]: r for r in table["rows"]}
    assert list(rows) == ["float32", "int8", "uint8", "binary"]
    assert [rows[t]["bytes_per_vector"] for t in rows] == [256, 64, 64, 8]
    assert table["queries"] == 60 and table["corpus"] == 180 and table["k"] == 10
    assert rows["float32"]["recall_at_k"] == 1.0 and rows["float32"]["probe_retention"] == 1.0
    for row in rows.values():
        assert 0 <= row["recall_at_k"] <= 1 and 0 <= row["probe_accuracy"] <= 1
        assert row["probe_retention"] == row["probe_accuracy"] / 0.8
    # The same floats as the reference: rescoring Hamming's top 40 can only find more of the true top 10.
    for kind in ("int8", "uint8", "binary"):
        assert rows[kind]["recall_at_k_rescored"] >= rows[kind]["recall_at_k"], kind
    assert rows["float32"]["recall_at_k_rescored"] is None
    assert rows["binary"]["recall_at_k"] < 1.0  # 64 bits lose something
