"""Response encodings of embeddings: float lists, base64, truncated dimensions."""

from __future__ import annotations

import base64

import numpy as np

from service.errors import InvalidInput


def truncate_dimensions(rows: np.ndarray, dimensions: int | None, renormalize: bool = True) -> np.ndarray:
    """Matryoshka-style truncation (OpenAI's `dimensions`): keep the first N and renormalize."""
    if dimensions is None:
        return rows
    if dimensions < 1 or dimensions > rows.shape[1]:
        raise InvalidInput(f"dimensions must be between 1 and {rows.shape[1]} for this model, got {dimensions}")
    cut = rows[:, :dimensions]
    return l2_normalize(cut) if renormalize else cut


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)


def encode_base64(row: np.ndarray) -> str:
    """Little-endian float32 bytes, as the openai client decodes them."""
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
