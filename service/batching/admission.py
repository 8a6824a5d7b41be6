"""Admission: whether one model's queue takes a request, decided once, and the ticket that holds its room.

A request is admitted once, before any work is spent on it: at the door (service/shedding.py) when the
door can read its model from the body, else by the model entry before tokenizing. Admission hands out a
``Ticket``: room for that many items, counted as if queued from that moment, so a burst that the door
reads in one go is admitted only as far as the queue has room. ``Batcher.submit`` turns the ticket into
queued items (``enqueue``); a request that ends before that (bad input, a disconnect) gives its ticket
back (``Ticket.release``). Either happens once.

The rule (``saturated``): refuse when the items would not fit in ``max_queue_items``, or when the queue
is ``max_queue_wait_s`` deep in time: its oldest item has waited that long already, or the work queued
and admitted would take the workers longer than that (tokens times the recent inference time per token,
shared by the workers). So a client that sends its next request only after the answer to the last is
never refused while all such clients' requests together are under ``max_queue_wait_s`` of work.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from service import errors
from service.batching.policy import WorkItem

# Weight of the newest batch in the running means of inference time per token and tokens per item.
_EWMA_ALPHA = 0.2


class Ticket:
    """Room for ``items`` in one model's queue, from admission until ``submit`` queues them or the
    request gives it back."""

    __slots__ = ("admission", "items", "held")

    def __init__(self, admission: "Admission", items: int):
        self.admission, self.items, self.held = admission, items, True

    def release(self) -> None:
        """Give the room back, if ``submit`` has not taken it; a second call does nothing."""
        if self.held:
            self.admission.release(self)


class Admission:
    """One model's admission rule and its accounting: tickets held, the queue as its batcher last
    reported it, and the recent cost of a token.

    Its batcher reports every change of its queue (``queue_changed``) and every batch it runs
    (``record_batch``); ``admit`` and ``release`` run on the event loop. A lock of its own keeps the
    counts whole between the two sides.
    """

    def __init__(self, name: str, max_queue_items: int, max_queue_wait_s: float | None, workers: int,
                 queue_delay_s: float = 0.0, on_refused: Callable[[int], None] | None = None):
        if max_queue_items < 1:
            raise ValueError(f"max_queue_items must be >= 1, got {max_queue_items}")
        self.name = name
        self.max_queue_items = max_queue_items
        # Admission by time, not only by count: refuse while the queued work alone would take longer
        # than this to reach, so an overloaded model answers 429 at once instead of 503 after the
        # request timeout, and the queue never holds more than the workers can clear in that time.
        self.max_queue_wait_s = max_queue_wait_s or None
        self.workers = workers
        self.queue_delay_s = queue_delay_s
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self.held = 0  # items of tickets not queued yet
        self.queued = 0  # items in the queue
        self._queued_tokens = 0
        self._oldest: WorkItem | None = None  # the oldest queued item (the queue keeps arrival order)
        # Recent inference seconds per real token. Per token, not per batch or per item: length bucketing
        # and the token budget make batches of long texts far smaller than batches of tweets, and a queue
        # of news costs several times a queue of as many tweets.
        self.seconds_per_token: float | None = None
        self._tokens_per_item: float | None = None  # what a ticket's items will bring once tokenized

    # ----------------------------------------------------------------- event-loop side

    def admit(self, items: int, ticket: Ticket | None = None) -> Ticket:
        """A ticket for ``items``, or Overloaded (with Retry-After) when the queue has no room for them;
        PayloadTooLarge when the request alone exceeds the queue.

        ``ticket``, when one of this model's, is the request's own from the door: it is returned as it
        is when it already covers ``items``, else grown by the difference under the same rule (the door
        counts a KServe request as one item before its tensors are read)."""
        if items > self.max_queue_items:
            raise errors.PayloadTooLarge(
                f"request has {items} inputs; at most {self.max_queue_items} fit in the queue")
        own = ticket if ticket is not None and ticket.admission is self and ticket.held else None
        if own is not None and own.items >= items:
            return own
        more = items - (own.items if own is not None else 0)
        with self._lock:
            if not self.saturated(more):
                self.held += more
                if own is None:
                    return Ticket(self, items)
                own.items = items
                return own
            retry_after_s = self._retry_after_s()
        if self._on_refused is not None:
            self._on_refused(more)
        raise errors.Overloaded(f"model {self.name!r} is overloaded; retry later", retry_after_s)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self._drop(ticket)

    # ----------------------------------------------------------------- batcher side (its queue lock held)

    def enqueue(self, ticket: Ticket, items: Sequence[WorkItem]) -> None:
        """``submit`` appended ``items`` to the queue for ``ticket``: they count as queued from now on,
        no longer as held."""
        with self._lock:
            self._drop(ticket)
            if items and self._oldest is None:
                self._oldest = items[0]
            self.queued += len(items)
            self._queued_tokens += sum(item.length for item in items)

    def queue_changed(self, queue: Sequence[WorkItem]) -> None:
        """The queue as it is now (items taken, expired or withdrawn)."""
        with self._lock:
            self._observe(queue)

    def record_batch(self, tokens: int, items: int, infer_s: float) -> None:
        """A batch of ``items`` holding ``tokens`` real tokens took ``infer_s`` in its backend."""
        with self._lock:
            self.seconds_per_token = _ewma(self.seconds_per_token, infer_s / tokens)
            self._tokens_per_item = _ewma(self._tokens_per_item, tokens / items)

    # ----------------------------------------------------------------- the rule

    def saturated(self, items: int) -> bool:
        """No room for ``items`` more: the count limit, or the queue's wait limit; lock held. Held
        tickets count as queued."""
        waiting = self.queued + self.held
        if waiting + items > self.max_queue_items:
            return True
        if not self.max_queue_wait_s or not waiting:
            return False
        # Measured, then predicted: the oldest queued item has already waited too long, or the queued
        # work would take too long. The measure catches what the prediction misses, e.g. the workers'
        # share of the cores falling as refusals take the loop's.
        if self._oldest is not None and time.monotonic() - self._oldest.enqueued_at > self.max_queue_wait_s:
            return True
        return self.wait_s() > self.max_queue_wait_s

    def wait_s(self) -> float:
        """Estimated time until the queue as it stands is taken by the workers. Held tickets are not
        tokenized yet: each of their items counts as a recent item's tokens."""
        if self.seconds_per_token is None:
            return 0.0
        tokens = self._queued_tokens + self.held * (self._tokens_per_item or 0.0)
        return tokens * self.seconds_per_token / self.workers

    def _retry_after_s(self) -> int:
        """Whole seconds until the current queue is likely worked off; lock held."""
        return max(1, math.ceil(self.wait_s() + self.queue_delay_s))

    def _drop(self, ticket: Ticket) -> None:
        if ticket.held:
            ticket.held = False
            self.held -= ticket.items

    def _observe(self, queue: Sequence[WorkItem]) -> None:
        self.queued = len(queue)
        self._queued_tokens = sum(item.length for item in queue)
        self._oldest = queue[0] if queue else None


def _ewma(previous: float | None, value: float) -> float:
    return value if previous is None else previous + _EWMA_ALPHA * (value - previous)
