"""Response encodings of embeddings: float lists, base64, truncated dimensions, int8/uint8/binary/ubinary."""

from __future__ import annotations

import base64

import numpy as np

from service.embedding_types import INTEGER_TYPES, quantize
from service.errors import InvalidInput, shown
from service.manifest import Manifest


def _check_dimensions(dimensions: int, width: int) -> None:
    if not 1 <= dimensions <= width:
        # shown(): JSON allows dimensions of 10**400, and the message should name the limit, not echo that.
        raise InvalidInput(f"dimensions must be between 1 and {width} for this model, got {shown(dimensions)}")


def check_dimensions(manifest: Manifest, dimensions: int | None) -> None:
    """Refuse `dimensions` the model cannot give, before any tokenizing or inference is spent on it."""
    if dimensions is not None and manifest.embedding_dim is not None:
        _check_dimensions(dimensions, manifest.embedding_dim)


def truncate_dimensions(rows: np.ndarray, dimensions: int | None, renormalize: bool = True) -> np.ndarray:
    """Matryoshka-style truncation (OpenAI's `dimensions`): keep the first N and renormalize."""
    if dimensions is None:
        return rows
    _check_dimensions(dimensions, rows.shape[1])  # check_dimensions has passed; a manifest may lack the width
    cut = rows[:, :dimensions]
    return l2_normalize(cut) if renormalize else cut


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)


def check_embedding_type(manifest: Manifest, kind: str) -> None:
    """Refuse an integer type for a variant built without calibration ranges; checked before inference."""
    if kind in INTEGER_TYPES and manifest.embedding_ranges is None:
        raise InvalidInput(
            f"model {manifest.name!r} (version {manifest.version}) has no calibration ranges, so it cannot "
            f"return embedding_type {kind!r}; rebuild it with this version of build-models, which records "
            f"them in the manifest, or ask for 'binary' / 'ubinary', which need none")


def supported_embedding_types(manifest: Manifest) -> list[str]:
    if manifest.task != "embedding":
        return []
    ranged = ["int8", "uint8"] if manifest.embedding_ranges is not None else []
    return ["float", *ranged, "binary", "ubinary"]


def quantize_rows(rows: np.ndarray, kind: str, manifest: Manifest) -> np.ndarray:
    """The model's own output rows (truncated, never renormalized: the ranges describe the model's
    values) in the requested type; ``check_embedding_type`` has passed."""
    ranges = manifest.embedding_ranges
    if kind in INTEGER_TYPES:
        return quantize(rows, kind, ranges.min, ranges.max)
    return quantize(rows, kind)


def encode_base64(row: np.ndarray) -> str:
    """Little-endian float32 bytes, as the openai client decodes them; int8/uint8 rows as their raw bytes."""
    if row.dtype in (np.int8, np.uint8):
        return base64.b64encode(np.ascontiguousarray(row).tobytes()).decode("ascii")
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
