"""What happens to an input longer than the model's learned positions (``max_seq_len``).

Three policies, one per request (the request's own, else the model's from its manifest, else the
server's ``BERTSERVE_LONG_INPUT``):

- ``error``: refused with 422 naming the input (the default).
- ``truncate``: cut to fit, from the right (keep the beginning) or the left (keep the end).
- ``window``: split into windows of at most ``max_seq_len`` tokens that overlap by ``overlap`` tokens.
  Each window is a sequence of its own (its own special tokens, positions from 0) and an ordinary item
  for the batcher, so the windows of one document batch with each other and with other traffic. The
  input's output is the mean of its windows' outputs weighted by each window's count of new tokens
  (the tokens no earlier window held), so overlapped text is not counted twice; an embedding is
  renormalised when the model normalises. A classifier's logits are averaged the same way.

The window arithmetic and the weighted mean live here; tokenization.py cuts the token ids with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np

Policy = Literal["error", "truncate", "window"]
Direction = Literal["right", "left"]
POLICIES: tuple[str, ...] = get_args(Policy)


@dataclass(frozen=True, slots=True)
class LongInput:
    """How one request treats inputs longer than the model's ``max_seq_len``."""

    policy: Policy = "error"
    direction: Direction = "right"  # which end ``truncate`` cuts
    overlap: int = 32  # tokens each window shares with the one before it (``window``)
    max_windows: int = 16  # windows per input; 413 beyond (``window``)


def window_spans(length: int, room: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of each window over ``length`` tokens, at most ``room`` tokens each, each sharing
    ``overlap`` tokens with the one before. The overlap is capped at half a window, so no token is in
    more than two windows and every window brings new text."""
    if room < 1:
        raise ValueError("a window must hold at least one token")
    overlap = max(0, min(overlap, room // 2))
    step = room - overlap
    spans, start = [], 0
    while True:
        end = min(start + room, length)
        spans.append((start, end))
        if end >= length:
            return spans
        start += step


def window_count(length: int, room: int, overlap: int) -> int:
    """len(window_spans(...)) without building them: checked before the windows are made."""
    if length <= room:
        return 1
    step = room - max(0, min(overlap, room // 2))
    return 1 + -(-(length - room) // step)


def new_tokens(spans: Sequence[tuple[int, int]]) -> list[int]:
    """Per window, the tokens no earlier window held: they add up to the input's length."""
    out, seen = [], 0
    for start, end in spans:
        out.append(end - max(start, seen))
        seen = end
    return out


@dataclass(frozen=True, slots=True)
class Layout:
    """Which items belong to which input when some input was split into windows: ``counts[i]`` items
    for input i, in order, weighted by ``weights`` (new tokens per item)."""

    counts: list[int]
    weights: np.ndarray  # float64 [items]

    def combine(self, rows: np.ndarray, normalize: bool) -> np.ndarray:
        """One row per input: the weighted mean of its items' rows (renormalised when ``normalize``)."""
        out = np.empty((len(self.counts), rows.shape[1]), dtype=rows.dtype)
        at = 0
        for i, n in enumerate(self.counts):
            w = self.weights[at: at + n]
            out[i] = (rows[at: at + n].astype(np.float64) * w[:, None]).sum(axis=0) / w.sum()
            at += n
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.clip(norms, 1e-12, None)
        return out
