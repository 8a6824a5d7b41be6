"""Pure batch policy: from the queue's contents, its limits and the clock, pick the next batch.

No threads, no clock reads, no numpy or torch: the batcher owns the queue and the time, this module
only decides, so every rule here is unit-testable with plain numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


# How far past the oldest item the policy looks for companions, in batches of max_batch_size.
LOOKAHEAD_BATCHES = 4


@dataclass(frozen=True)
class BatchLimits:
    """How big a batch may get and how long the oldest item may wait for companions."""

    max_batch_size: int
    """Items per batch."""
    max_batch_tokens: int
    """Padded tokens per batch: ``len(batch) * longest item length in the batch``."""
    max_queue_delay_s: float
    """How long the oldest item may wait for companions before a partial batch goes; 0 = never wait."""
    max_padding_ratio: float | None = None
    """Padded tokens / real tokens a batch may reach; a companion that would pass it waits for the next
    batch instead. Running 8 tweets and 8 long news texts as two batches costs far less than one batch
    padded to the longest text. None = no limit."""

    def __post_init__(self) -> None:
        if self.max_padding_ratio is not None and self.max_padding_ratio < 1:
            raise ValueError(f"max_padding_ratio must be >= 1, got {self.max_padding_ratio}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")


@dataclass(eq=False)  # identity semantics: two items with equal fields are still two pieces of work
class WorkItem:
    """One sequence waiting for inference; one client request contributes one item per input."""

    length: int
    """Token count of this item (>= 1)."""
    enqueued_at: float
    """Monotonic seconds."""
    deadline: float | None
    """Monotonic seconds by which inference must have started; None = no deadline."""
    request: Any
    """Opaque owner handle (the batcher's per-request handle)."""
    index: int
    """Position of this item inside its request."""
    payload: Any = None
    """Token ids etc., opaque to the policy."""
    cancelled: bool = False
    """Set when the client went away."""


@dataclass
class Decision:
    """What the caller should do now; it must remove every returned item from its queue."""

    batch: list[WorkItem]
    """Items to run now (may be empty)."""
    expired: list[WorkItem]
    """Dropped: deadline passed before inference."""
    cancelled: list[WorkItem]
    """Dropped: client gone."""
    wait_s: float | None
    """When ``batch`` is empty: seconds to wait before asking again (None = queue empty: wait for items)."""


def choose_batch(waiting: Sequence[WorkItem], limits: BatchLimits, now: float) -> Decision:
    """Pick the next batch from ``waiting`` (in arrival order) at monotonic time ``now``.

    Dead items (cancelled, or deadline <= now) are dropped first. A partial batch is held back until the
    oldest item has waited ``max_queue_delay_s``, so that companions can join it; a full one goes at once.
    The batch always contains the oldest live item, so nothing starves however unlucky its length, and is
    grown from it over length-sorted neighbours among the ``LOOKAHEAD_BATCHES * max_batch_size`` oldest
    live items, choosing the least added padding at each step. O(n log n) in the queue length.
    """
    cancelled: list[WorkItem] = []
    expired: list[WorkItem] = []
    live: list[WorkItem] = []
    for item in waiting:
        if item.cancelled:
            cancelled.append(item)
        elif item.deadline is not None and item.deadline <= now:
            expired.append(item)
        else:
            live.append(item)
    if not live:
        return Decision([], expired, cancelled, None)
    # Companions are chosen by length among the oldest few batches' worth of items only. Over a deep
    # queue (overload), choosing among everything served items of common lengths first and let those of
    # uncommon lengths wait about twice the queue's drain time; a bounded look-ahead keeps the queue
    # close to arrival order and still finds similar lengths.
    lookahead = LOOKAHEAD_BATCHES * limits.max_batch_size
    if len(live) > lookahead:
        oldest_first = sorted(range(len(live)), key=lambda i: (live[i].enqueued_at, i))[:lookahead]
        live = [live[i] for i in sorted(oldest_first)]  # still in arrival order

    # Ties on enqueued_at (items of one request) are broken by arrival position, which keeps this
    # deterministic and serves a request's items in their own order.
    oldest_pos = min(range(len(live)), key=lambda i: (live[i].enqueued_at, i))
    oldest = live[oldest_pos]

    wait_s = _hold_back_s(live, oldest, limits, now)
    if wait_s is not None:
        return Decision([], expired, cancelled, wait_s)

    return Decision(_grow_batch(live, oldest_pos, limits), expired, cancelled, None)


def _hold_back_s(live: list[WorkItem], oldest: WorkItem, limits: BatchLimits, now: float) -> float | None:
    """Seconds to wait for companions, or None to dispatch now."""
    longest = max(item.length for item in live)
    could_fill = len(live) >= limits.max_batch_size or len(live) * longest >= limits.max_batch_tokens
    if could_fill or limits.max_queue_delay_s <= 0:
        return None
    wait_until = oldest.enqueued_at + limits.max_queue_delay_s
    deadlines = [item.deadline for item in live if item.deadline is not None]
    # Waiting until a deadline would only wake us to expire that item: when a deadline falls inside the
    # wait window, give up on companions and go now.
    if deadlines and min(deadlines) <= wait_until:
        return None
    wait_s = wait_until - now
    return wait_s if wait_s > 0 else None


def _grow_batch(live: list[WorkItem], oldest_pos: int, limits: BatchLimits) -> list[WorkItem]:
    """Grow a window over the length-sorted items around the oldest one, least added padding first."""
    order = sorted(range(len(live)), key=lambda i: (live[i].length, live[i].enqueued_at, i))
    by_length = [live[i] for i in order]
    lo = hi = order.index(oldest_pos)
    count = 1
    longest = by_length[hi].length  # the window is sorted, so its longest item is always at hi
    real = longest
    ratio = limits.max_padding_ratio

    def age(pos: int) -> tuple[float, int]:
        return (by_length[pos].enqueued_at, order[pos])

    while count < limits.max_batch_size:
        # Each candidate: (added padding, age for ties, position, new longest). An item shorter than the
        # window's longest pads itself up; a longer one pads every item already in the window.
        candidates = []
        if lo > 0:
            candidates.append((longest - by_length[lo - 1].length, age(lo - 1), lo - 1, longest))
        if hi + 1 < len(by_length):
            new_longest = by_length[hi + 1].length
            candidates.append((count * (new_longest - longest), age(hi + 1), hi + 1, new_longest))
        fitting = [c for c in candidates if (count + 1) * c[3] <= limits.max_batch_tokens]
        if ratio is not None:
            fitting = [c for c in fitting if (count + 1) * c[3] <= ratio * (real + by_length[c[2]].length)]
        if not fitting:
            break
        _, _, pos, longest = min(fitting)
        real += by_length[pos].length
        if pos < lo:
            lo = pos
        else:
            hi = pos
        count += 1

    # Arrival order inside the batch: it does not change padding and keeps results easy to follow.
    return [live[i] for i in sorted(order[lo : hi + 1])]
