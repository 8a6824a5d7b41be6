"""Integer and 1-bit encodings of embedding vectors, for vector databases that store them.

Semantics follow sentence-transformers' ``quantize_embeddings`` (5.x) exactly, so vectors from this
server and from ``model.encode(..., precision=...)`` with the same ranges are interchangeable:

- ``int8`` / ``uint8``: each dimension's calibration range [min, max] is cut into 256 equal buckets;
  a value maps to ``floor((x - min) / step)`` clipped to [0, 255] (``step = (max - min) / 255``, or 1
  for a constant dimension), minus 128 for ``int8``. Values outside the calibration range saturate.
- ``binary`` / ``ubinary``: one bit per dimension, 1 where ``x > 0``, packed 8 to a byte big-end first
  (``numpy.packbits``); ``ubinary`` is the bytes as uint8, ``binary`` the same bytes minus 128 as int8.
  N dimensions take ceil(N / 8) bytes; when N is not a multiple of 8 the last byte's low bits are
  zero padding.

Arithmetic is float64, as sentence-transformers does given ``ranges`` as Python floats (the manifest's
JSON numbers); given float32 ranges it computes in float32, and a value right on a bucket edge can then
land one bucket away (about 1 value in 100,000).

Shared by the build (which measures what each type costs) and the server (which returns it): both
must use the same arithmetic, so it lives here, with numpy as its only dependency.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
INTEGER_TYPES = ("int8", "uint8")  # need the model's calibration ranges
BIT_TYPES = ("binary", "ubinary")  # need nothing but the sign


def bucket_codes(rows: np.ndarray, minimum: Sequence[float], maximum: Sequence[float]) -> np.ndarray:
    """Bucket index 0..255 of every value (float64), per dimension, from the calibration ranges.

    ``minimum``/``maximum`` may be longer than a row: a truncated vector uses its first N ranges.
    """
    width = rows.shape[1]
    starts = np.asarray(minimum, dtype=np.float64)[:width]
    steps = (np.asarray(maximum, dtype=np.float64)[:width] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    return np.clip(np.floor((rows - starts) / steps), 0, 255)


def to_int8(rows: np.ndarray, minimum: Sequence[float], maximum: Sequence[float]) -> np.ndarray:
    return (bucket_codes(rows, minimum, maximum) - 128).astype(np.int8)


def to_uint8(rows: np.ndarray, minimum: Sequence[float], maximum: Sequence[float]) -> np.ndarray:
    return bucket_codes(rows, minimum, maximum).astype(np.uint8)


def to_ubinary(rows: np.ndarray) -> np.ndarray:
    return np.packbits(rows > 0, axis=-1).reshape(rows.shape[0], -1)


def to_binary(rows: np.ndarray) -> np.ndarray:
    # Same bits as ubinary with the byte shifted into int8's range (sentence-transformers' "binary").
    return (to_ubinary(rows).astype(np.int16) - 128).astype(np.int8)


def quantize(rows: np.ndarray, kind: str, minimum: Sequence[float] | None = None,
             maximum: Sequence[float] | None = None) -> np.ndarray:
    """``rows`` [B, N] float -> [B, N] int8/uint8 or [B, ceil(N/8)] packed bits; float rows unchanged."""
    if kind == "float":
        return rows
    if kind in BIT_TYPES:
        return to_binary(rows) if kind == "binary" else to_ubinary(rows)
    if kind not in INTEGER_TYPES:
        raise ValueError(f"unknown embedding type {kind!r}")
    if minimum is None or maximum is None:
        raise ValueError(f"{kind} needs calibration ranges")
    if len(minimum) < rows.shape[1] or len(maximum) < rows.shape[1]:
        raise ValueError(f"calibration ranges cover {min(len(minimum), len(maximum))} dimensions, rows have {rows.shape[1]}")
    return to_int8(rows, minimum, maximum) if kind == "int8" else to_uint8(rows, minimum, maximum)


def packed_width(dimensions: int) -> int:
    """Bytes of one binary/ubinary vector of ``dimensions`` bits."""
    return (dimensions + 7) // 8
