"""What int8, uint8 and binary embeddings cost: calibration ranges, probe retention and recall@k.

The encodings are the server's own (service/embedding_types.py), so the build measures exactly the
vectors a client would store. Retrieval: every test-split text is a query over a corpus of the test
and train probe texts (the query itself left out); the ground truth is the top k by cosine of the
fp32 reference's float vectors. Each type ranks as a vector database storing it would: float32 by
cosine, int8/uint8 by the dot product of the integer codes, binary by Hamming distance. "Rescored"
takes the top ``rescore_candidates`` by a type's own similarity and reorders them by the cosine of
the variant's float vectors (query and documents, the documents' floats fetched for the candidates
only), as a database keeping low-bit vectors in memory and floats on disk does. Ties (frequent with
Hamming distances) go to the lower corpus index.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from service.embedding_types import packed_width, to_int8, to_ubinary, to_uint8

K = 10
RESCORE_CANDIDATES = 40
Probe = Callable[[np.ndarray, list, np.ndarray, list], float]

SIMILARITY = {
    "float32": "cosine of the float vectors",
    "int8": "dot product of the int8 codes",
    "uint8": "dot product of the uint8 codes",
    "binary": "Hamming distance of the packed bits (ubinary: the same bits, the same numbers)",
}

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def calibration_ranges(train_rows: np.ndarray, dataset: str, max_seq_len: int) -> dict:
    """Manifest ``embedding_ranges`` from the variant's own outputs on train-split text."""
    return {"min": train_rows.min(axis=0).astype(float).tolist(), "max": train_rows.max(axis=0).astype(float).tolist(),
            "samples": int(train_rows.shape[0]), "dataset": dataset, "split": "train", "max_seq_len": max_seq_len}


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)


def hamming(queries: np.ndarray, docs: np.ndarray, chunk: int = 64) -> np.ndarray:
    """[Q, D] bit distances between packed uint8 rows (XOR, then a popcount table)."""
    out = np.empty((queries.shape[0], docs.shape[0]), dtype=np.int32)
    for start in range(0, queries.shape[0], chunk):
        xor = np.bitwise_xor(queries[start:start + chunk, None, :], docs[None, :, :])
        out[start:start + chunk] = _POPCOUNT[xor].sum(axis=-1)
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row; the query's own row (column i of row i) is left out."""
    scores = scores.astype(np.float64, copy=True)
    n = min(scores.shape)
    scores[np.arange(n), np.arange(n)] = -np.inf  # queries are the first rows of the corpus
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def rescored(candidates: np.ndarray, query_float: np.ndarray, doc_float: np.ndarray, k: int) -> np.ndarray:
    """The candidates of each query reordered by float cosine, first k kept."""
    q, d = _unit(query_float), _unit(doc_float)
    out = np.empty((candidates.shape[0], k), dtype=np.int64)
    for i, cand in enumerate(candidates):
        scores = d[cand] @ q[i]
        out[i] = cand[np.argsort(-scores, kind="stable")[:k]]
    return out


def embedding_type_table(test: np.ndarray, train: np.ndarray, ref_test: np.ndarray, ref_train: np.ndarray,
                         ranges: dict, train_labels: list, test_labels: list,
                         reference_accuracy: float | None, float_accuracy: float | None, probe: Probe,
                         k: int = K, rescore_candidates: int = RESCORE_CANDIDATES) -> dict:
    """Manifest ``quality.embedding_types`` for one variant: float32, int8, uint8, binary rows.

    ``test``/``train`` are the variant's float outputs on the probe texts, ``ref_*`` the reference's.
    The probe features are the integer codes divided by 128 and the bits as +-1, so one regularization
    setting suits every type; ``float_accuracy`` is the variant's float probe, already measured.
    """
    corpus = np.concatenate([test, train])
    truth = top_k(_unit(ref_test) @ _unit(np.concatenate([ref_test, ref_train])).T, k)
    lo, hi = ranges["min"], ranges["max"]
    dim = test.shape[1]

    def retention(acc):
        return None if acc is None or not reference_accuracy else acc / reference_accuracy

    def row(kind: str, size: int, acc: float | None, scores: np.ndarray, rescore: bool = True) -> dict:
        again = recall(rescored(top_k(scores, rescore_candidates), test, corpus, k), truth) if rescore else None
        return {"type": kind, "bytes_per_vector": size, "probe_accuracy": acc, "probe_retention": retention(acc),
                "recall_at_k": recall(top_k(scores, k), truth), "recall_at_k_rescored": again}

    rows = [row("float32", 4 * dim, float_accuracy, _unit(test) @ _unit(corpus).T, rescore=False)]
    for kind, encode in (("int8", to_int8), ("uint8", to_uint8)):
        q, d = encode(test, lo, hi), encode(corpus, lo, hi)
        acc = probe(encode(train, lo, hi) / 128.0, train_labels, q / 128.0, test_labels)
        rows.append(row(kind, dim, acc, q.astype(np.int64) @ d.astype(np.int64).T))
    acc = probe(np.where(train > 0, 1.0, -1.0), train_labels, np.where(test > 0, 1.0, -1.0), test_labels)
    rows.append(row("binary", packed_width(dim), acc, -hamming(to_ubinary(test), to_ubinary(corpus))))
    return {"k": k, "rescore_candidates": rescore_candidates, "queries": int(test.shape[0]),
            "corpus": int(corpus.shape[0]), "similarity": SIMILARITY, "rows": rows,
            "note": f"ground truth: top {k} by cosine of the fp32 reference's float vectors; "
                    f"rescored: a type's own top {rescore_candidates}, reordered by float cosine"}


def format_table(table: dict) -> list[str]:
    """Lines for the build log."""
    def num(value):
        return "     -" if value is None else f"{value:6.4f}"

    lines = [f"  type     bytes  probe retention  recall@{table['k']}  rescored"]
    for row in table["rows"]:
        lines.append(f"  {row['type']:<7} {row['bytes_per_vector']:>6}  {num(row['probe_retention']):>15}  "
                     f"{num(row['recall_at_k']):>9}  {num(row.get('recall_at_k_rescored')):>8}")
    return lines
