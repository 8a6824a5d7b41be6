"""Dynamic batcher: an asyncio front that queues request items, worker threads that run batches.

Requests arrive on the event loop; inference is synchronous and long (ONNX Runtime releases the GIL), so
it runs in one thread per backend instance. The queue is shared under a ``threading.Condition``; which
items go together is decided by the pure ``choose_batch`` policy. Per-request bookkeeping (results,
futures) is touched only on the event loop, so it needs no lock: workers hand results back with
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from service import errors
from service.batching.policy import BatchLimits, WorkItem, choose_batch

logger = logging.getLogger(__name__)

InferFn = Callable[[list[WorkItem]], list[Any]]
EventHook = Callable[[str, dict], None]

# After the grace period, how long stop() still waits for a batch already inside a backend; a hung
# backend must not hang shutdown (the threads are daemons).
_JOIN_AFTER_GRACE_S = 5.0
# Weight of the newest batch in the running means of inference time per token and tokens per item.
_EWMA_ALPHA = 0.2
# The watchdog's automatic limit for one batch: this many times what recent batches say it should take,
# and never less than the floor (a cold cache, a GC pause or a busy neighbour must not look like a hang).
STALL_FACTOR = 20.0
STALL_FLOOR_S = 5.0


class _Request:
    """One client request: its items, the future its caller awaits, and the results gathered so far."""

    __slots__ = ("future", "items", "results", "remaining", "timing")

    def __init__(self, future: asyncio.Future, size: int, timing: dict | None):
        self.future = future
        self.items: list[WorkItem] = []
        self.results: list[Any] = [None] * size
        self.remaining = size
        self.timing = timing


class _Running:
    """A batch inside a backend, as the watchdog sees it."""

    __slots__ = ("started", "tokens", "stalled")

    def __init__(self, started: float, tokens: int):
        self.started, self.tokens, self.stalled = started, tokens, False


class Reservation:
    """Room in a batcher's queue held for a request between the door and its ``submit``."""

    __slots__ = ("batcher", "items", "active")

    def __init__(self, batcher: "Batcher", items: int):
        self.batcher, self.items, self.active = batcher, items, True

    def release(self) -> None:
        """Give the room back if ``submit`` has not taken it (idempotent)."""
        if self.active:
            self.batcher._release(self)


class Batcher:
    """Queues items of many requests and runs them in batches on one worker thread per infer fn.

    ``infer_fns``: one callable per backend instance; each gets a formed batch (list of WorkItem) and must
    return one result per item, in the same order. ``solo_infer_fns`` (optional, one per instance): used
    instead when a batch would run alone, with every other worker idle and nothing else queued, e.g. a
    session with more threads: on CPU the cores the idle workers would use are free, and a lone short
    text is the case where latency is all that matters. ``on_event(kind, data)`` is a metrics hook called from
    the event loop or from worker threads; its exceptions are logged and swallowed. Kinds:
    ``"batch"`` {size, padded_tokens, real_tokens, queue_wait_s (list), infer_s, worker},
    ``"rejected"`` {reason: overloaded|timeout|cancelled|shutdown, items} (once per request),
    ``"error"`` {size, exception_type, worker} (once per failed batch),
    ``"stalled"`` {worker, running_s, limit_s} (a batch ran past its limit; ``check_stalls``) and
    ``"recovered"`` {worker, running_s} (that batch ended).

    Admission: a request is refused (Overloaded) when its items would not fit in ``max_queue_items``, or
    when the queue is ``max_queue_wait_s`` deep in time: the work already queued would take the workers
    longer than that (estimated from the queued tokens and the recent inference time per token), or its
    oldest item has already waited that long (``_saturated``). So a client that sends its next request
    only after the answer to the last is never refused while all such clients' requests together are
    under ``max_queue_wait_s`` of work and ``max_queue_items`` items.
    """

    def __init__(
        self,
        name: str,
        infer_fns: list[InferFn],
        limits: BatchLimits,
        max_queue_items: int,
        on_event: EventHook | None = None,
        solo_infer_fns: list[InferFn] | None = None,
        max_queue_wait_s: float | None = None,
        stall_after_s: float | None = None,
    ):
        if not infer_fns:
            raise ValueError("a batcher needs at least one infer fn")
        if solo_infer_fns is not None and len(solo_infer_fns) != len(infer_fns):
            raise ValueError(f"{len(solo_infer_fns)} solo infer fns for {len(infer_fns)} workers")
        if max_queue_items < 1:
            raise ValueError(f"max_queue_items must be >= 1, got {max_queue_items}")
        self.name = name
        self.limits = limits
        self.max_queue_items = max_queue_items
        # Admission by time, not only by count: refuse while the queued work alone would take longer
        # than this to reach, so an overloaded model answers 429 at once instead of 503 after the
        # request timeout, and the queue never holds more than the workers can clear in that time.
        self.max_queue_wait_s = max_queue_wait_s or None
        self._infer_fns = list(infer_fns)
        self._solo_infer_fns = list(solo_infer_fns) if solo_infer_fns else None
        self._on_event = on_event
        # While draining nobody else will join, so waiting for companions would only delay shutdown.
        self._drain_limits = dataclasses.replace(limits, max_queue_delay_s=0.0)

        self._cond = threading.Condition()
        self._queue: list[WorkItem] = []  # arrival order; guarded by _cond
        self._closing = False  # no new submits; workers exit once the queue is empty
        self._halted = False  # workers exit now, queue or not
        # Recent inference seconds per real token (batch time / the batch's tokens). Per token, not per
        # batch or per item: length bucketing and the token budget make batches of long texts far smaller
        # than batches of tweets, and a queue of news costs several times a queue of as many tweets.
        self._token_ewma_s: float | None = None
        self._item_tokens_ewma: float | None = None  # recent tokens per item: what a reservation will bring
        self._queued_tokens = 0  # sum of the queued items' lengths; guarded by _cond
        self._reserved = 0  # items admitted at the door, not queued yet (reserve); guarded by _cond
        self._busy = 0  # workers inside inference; guarded by _cond
        # A batch running longer than this is stalled (the watchdog's check_stalls); None = automatic.
        self.stall_after_s = stall_after_s or None
        self._running: dict[int, _Running] = {}  # worker -> its batch inside the backend; guarded by _cond

        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._pending: set[_Request] = set()  # event-loop only

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Spawn the worker threads; call from inside the running event loop, which results go back to."""
        if self._loop is not None:
            raise RuntimeError(f"batcher {self.name!r} already started")
        self._loop = asyncio.get_running_loop()
        for i, fn in enumerate(self._infer_fns):
            solo = self._solo_infer_fns[i] if self._solo_infer_fns else None
            thread = threading.Thread(
                target=self._worker, args=(i, fn, solo), name=f"batcher-{self.name}-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    @property
    def started(self) -> bool:
        return self._loop is not None

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, let queued work finish for up to ``grace_s``, then fail the rest (503).

        Safe to call more than once and without ``start()``.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        await self._wait_for_workers(grace_s)

        with self._cond:
            leftover = self._queue
            self._set_queue([])
            self._halted = True
            self._cond.notify_all()
        self._fail_requests(leftover, lambda: errors.NotReady("server is shutting down"), "shutdown")

        await self._wait_for_workers(_JOIN_AFTER_GRACE_S)
        await asyncio.sleep(0)  # run the deliveries the last workers posted just before they exited
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("batcher %s: workers still inside inference at shutdown: %s", self.name, alive)
        # Anything still unanswered belongs to a batch stuck in a backend; its caller should not hang.
        stuck = [r.items[0] for r in list(self._pending) if r.items]
        self._fail_requests(stuck, lambda: errors.NotReady("server is shutting down"), "shutdown")

    async def _wait_for_workers(self, timeout_s: float) -> None:
        # Polling keeps the event loop free to deliver the results the draining workers post to it.
        end = time.monotonic() + max(0.0, timeout_s)
        while any(t.is_alive() for t in self._threads) and time.monotonic() < end:
            await asyncio.sleep(0.005)

    @property
    def queue_depth(self) -> int:
        """Items waiting in the queue (not counting batches already inside a backend)."""
        with self._cond:
            return len(self._queue)

    # ----------------------------------------------------------------- event-loop side

    async def submit(self, payloads: Sequence[tuple[Any, int]], deadline: float | None = None,
                     timing: dict | None = None, reservation: "Reservation | None" = None) -> list[Any]:
        """Run the ``(payload, length)`` items of one request; return their results in the same order.

        ``timing``, when given, is filled with ``queue_s`` (the longest wait of its items before their
        batch started) and ``infer_s`` (backend time of the batches that carried its items, summed).

        ``deadline`` is in ``time.monotonic()`` seconds: an item not started by then fails the request
        with DeadlineExceeded. Raises Overloaded (nothing enqueued) when the queue has no room,
        PayloadTooLarge when the request alone exceeds the queue, NotReady when not started or stopping,
        InferenceFailed when a batch holding one of its items failed. Cancelling the caller drops its
        still-queued items. A ``reservation`` from ``reserve`` (taken at the door) turns into these
        queued items: it stops counting at the moment they start to.
        """
        if not payloads:
            return []
        if self._loop is None:
            raise errors.NotReady(f"model {self.name!r} is not ready")
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), len(payloads), timing)
        if timing is not None:
            timing.setdefault("queue_s", 0.0)
            timing.setdefault("infer_s", 0.0)
        now = time.monotonic()
        for index, (payload, length) in enumerate(payloads):
            if length < 1:
                raise ValueError(f"item {index} has length {length}; every item has at least one token")
            request.items.append(WorkItem(length, now, deadline, request, index, payload))

        if len(payloads) > self.max_queue_items:
            raise errors.PayloadTooLarge(
                f"request has {len(payloads)} inputs; at most {self.max_queue_items} fit in the queue"
            )
        retry_after_s = None
        with self._cond:
            if reservation is not None and reservation.batcher is self:
                self._unreserve(reservation)
            if self._closing:
                raise errors.NotReady(f"model {self.name!r} is shutting down")
            if self._saturated(len(payloads)):
                retry_after_s = self._retry_after_s()
            else:
                self._queue.extend(request.items)
                self._queued_tokens += sum(item.length for item in request.items)
                self._cond.notify()
        if retry_after_s is not None:
            self._reject_overloaded(len(payloads), retry_after_s)

        # The deadline fires on the event loop at its time, whatever the workers are doing: a worker
        # only looks at the queue between batches, and all of them may be inside long or hung ones.
        timer = None if deadline is None else loop.call_later(
            max(0.0, deadline - time.monotonic()), self._deadline_passed, request)
        self._pending.add(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            if self._withdraw(request):
                self._emit("rejected", {"reason": "cancelled", "items": len(payloads)})
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.discard(request)

    def admit(self, items: int) -> None:
        """Raise Overloaded now if ``items`` more would be refused: lets a route turn a request away
        before it spends time tokenizing it. ``submit`` checks again under the same rule."""
        with self._cond:
            retry_after_s = self._retry_after_s() if self._saturated(items) else None
        if retry_after_s is not None:
            self._reject_overloaded(items, retry_after_s)

    def reserve(self, items: int) -> "Reservation":
        """Admit a request at the door: raise Overloaded now if ``items`` more would be refused, else
        count them as if queued until the request submits them (or gives up: ``release``).

        The door admits a whole burst of requests before any of them has tokenized and submitted; without
        reservations each saw the same short queue, and most of the burst was refused at ``submit``,
        after the routes had validated and tokenized it for nothing."""
        with self._cond:
            if not self._saturated(items):
                self._reserved += items
                return Reservation(self, items)
            retry_after_s = self._retry_after_s()
        self._reject_overloaded(items, retry_after_s)

    def _release(self, reservation: "Reservation") -> None:
        with self._cond:
            self._unreserve(reservation)

    def _unreserve(self, reservation: "Reservation") -> None:
        """Stop counting a reservation (once); lock held."""
        if reservation.active:
            reservation.active = False
            self._reserved -= reservation.items

    def _saturated(self, items: int) -> bool:
        """No room for ``items`` more: the count limit, or the queue's wait limit; lock held. Items
        reserved at the door count as queued."""
        queued = len(self._queue) + self._reserved
        if queued + items > self.max_queue_items:
            return True
        if not self.max_queue_wait_s or not queued:
            return False
        # Measured, then predicted: the oldest queued item (the queue keeps arrival order) has already
        # waited too long, or the queued work would take too long. The measure catches what the
        # prediction misses, e.g. the workers' share of the cores falling as refusals take the loop's.
        if self._queue and time.monotonic() - self._queue[0].enqueued_at > self.max_queue_wait_s:
            return True
        return self._queue_wait_s() > self.max_queue_wait_s

    def _reject_overloaded(self, items: int, retry_after_s: int):
        self._emit("rejected", {"reason": "overloaded", "items": items})
        raise errors.Overloaded(f"model {self.name!r} is overloaded; retry later", retry_after_s)

    def _queue_wait_s(self) -> float:
        """Estimated time until the queue as it stands is taken by the workers; lock held. Reserved
        requests are not tokenized yet: each of their items counts as a recent item's tokens."""
        if self._token_ewma_s is None:
            return 0.0
        tokens = self._queued_tokens + self._reserved * (self._item_tokens_ewma or 0.0)
        return tokens * self._token_ewma_s / len(self._infer_fns)

    def _retry_after_s(self) -> int:
        """Whole seconds until the current queue is likely worked off; called with the lock held."""
        return max(1, math.ceil(self._queue_wait_s() + self.limits.max_queue_delay_s))

    def _set_queue(self, items: list[WorkItem]) -> None:
        """Replace the queue, keeping its token count; lock held."""
        self._queue = items
        self._queued_tokens = sum(item.length for item in items)

    def _withdraw(self, request: _Request) -> bool:
        """Mark a request's items cancelled and take those still queued out; True if any were queued."""
        with self._cond:
            for item in request.items:
                item.cancelled = True
            before = len(self._queue)
            self._set_queue([item for item in self._queue if not item.cancelled])
            return len(self._queue) < before

    def _deadline_passed(self, request: _Request) -> None:
        """Event loop, at a request's deadline: if any of its items has not reached inference, withdraw
        them all and fail the request (503 timeout). Items already inside a batch go on; one that a
        worker takes at the same moment is either taken (the request goes on) or withdrawn, never both."""
        if request.future.done():
            return
        with self._cond:
            queued = set(self._queue)  # WorkItem compares by identity
            waiting = [item for item in request.items if item in queued]
        if waiting:
            self._expire(waiting[:1], time.monotonic())

    def _deliver(self, batch: list[WorkItem], results: list[Any], taken_at: float, infer_s: float) -> None:
        """Event loop: file each result under its request; complete requests whose items are all back."""
        timed: set[int] = set()
        for item, result in zip(batch, results):
            request: _Request = item.request
            if request.future.done():  # failed or cancelled meanwhile
                continue
            if request.timing is not None:
                request.timing["queue_s"] = max(request.timing["queue_s"], taken_at - item.enqueued_at)
                if id(request) not in timed:
                    timed.add(id(request))
                    request.timing["infer_s"] += infer_s
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)

    def _fail_requests(self, items: list[WorkItem], make_error: Callable[[], Exception], reason: str) -> None:
        """Event loop: fail each distinct request owning one of ``items`` and withdraw its other items."""
        seen: set[int] = set()
        for item in items:
            request: _Request = item.request
            if id(request) in seen or request.future.done():
                continue
            seen.add(id(request))
            request.future.set_exception(make_error())
            self._withdraw(request)
            if reason != "error":  # a failed batch is reported once, as an "error" event, by its worker
                self._emit("rejected", {"reason": reason, "items": len(request.items)})

    def _expire(self, items: list[WorkItem], now: float) -> None:
        """Event loop: fail the requests of items whose deadline passed while queued."""
        for item in items:
            waited = now - item.enqueued_at
            self._fail_requests(
                [item],
                lambda w=waited: errors.DeadlineExceeded(
                    f"request timed out after {w:.3f}s in the queue of model {self.name!r}"
                ),
                "timeout",
            )

    # ----------------------------------------------------------------- watchdog

    def check_stalls(self, now: float | None = None) -> int:
        """Mark batches that have run past their limit as stalled (an ``"stalled"`` event and a log line
        each, once per batch); return how many are stalled now. Called periodically by the watchdog
        (service/watchdog.py), from the event loop. A stalled batch clears itself when it ends."""
        now = time.monotonic() if now is None else now
        fresh, stalled = [], 0
        with self._cond:
            for worker, running in self._running.items():
                limit = self._stall_limit_s(running)
                if not running.stalled and now - running.started > limit:
                    running.stalled = True
                    fresh.append((worker, now - running.started, limit))
                stalled += running.stalled
        for worker, elapsed, limit in fresh:
            logger.error("batcher %s: worker %d has been inside one batch for %.1f s (limit %.1f s); the model "
                         "reports not ready until it ends", self.name, worker, elapsed, limit)
            self._emit("stalled", {"worker": worker, "running_s": elapsed, "limit_s": limit})
        return stalled

    @property
    def stalled(self) -> bool:
        """A batch of this model is inside a backend far past its expected time (see ``check_stalls``)."""
        with self._cond:
            return any(running.stalled for running in self._running.values())

    def _stall_limit_s(self, running: _Running) -> float:
        """How long this batch may run before it counts as stalled; lock held."""
        if self.stall_after_s is not None:
            return self.stall_after_s
        expected = running.tokens * self._token_ewma_s if self._token_ewma_s is not None else 0.0
        return max(STALL_FLOOR_S, STALL_FACTOR * expected)

    def _post(self, callback: Callable, *args: Any) -> None:
        """Worker thread: run ``callback(*args)`` on the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed: nobody is left waiting for the answer
            logger.debug("batcher %s: event loop closed, dropping a delivery", self.name)

    def _emit(self, kind: str, data: dict) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, data)
        except Exception:
            logger.exception("batcher %s: on_event hook failed for %r", self.name, kind)

    # ----------------------------------------------------------------- worker side

    def _worker(self, worker: int, infer_fn: InferFn, solo_fn: InferFn | None) -> None:
        """Worker thread: take batches until stopped; inference happens outside the lock."""
        while True:
            taken = self._take(worker)
            if taken is None:
                return
            batch, expired, now, alone = taken
            if expired:
                self._post(self._expire, expired, now)
            if batch:
                self._run(worker, solo_fn if alone and solo_fn is not None else infer_fn, batch, now)

    def _take(self, worker: int) -> tuple[list[WorkItem], list[WorkItem], float, bool] | None:
        """Block until there is a batch or expired items to hand out; None when the worker should exit.

        The flag says whether the batch runs alone: no other worker busy and nothing left queued.
        """
        with self._cond:
            while True:
                if self._halted:
                    return None
                now = time.monotonic()
                decision = choose_batch(
                    self._queue, self._drain_limits if self._closing else self.limits, now
                )
                gone = set(decision.batch) | set(decision.expired) | set(decision.cancelled)
                if gone:
                    self._set_queue([item for item in self._queue if item not in gone])
                if decision.batch or decision.expired:
                    if self._queue:  # another idle worker may be able to form the next batch
                        self._cond.notify()
                    alone = self._busy == 0 and not self._queue
                    if decision.batch:
                        self._busy += 1
                        self._running[worker] = _Running(now, sum(item.length for item in decision.batch))
                    return decision.batch, decision.expired, now, alone
                if self._closing and not self._queue:
                    return None
                self._cond.wait(decision.wait_s)

    def _run(self, worker: int, infer_fn: InferFn, batch: list[WorkItem], taken_at: float) -> None:
        """Worker thread: run one batch and post its results, or its failure, back to the event loop."""
        started = time.monotonic()
        try:
            try:
                results = list(infer_fn(batch))
            finally:
                # Out of inference before any answer goes back, so that the request a client sends next
                # finds this worker idle (and may run alone).
                with self._cond:
                    self._busy -= 1
                    running = self._running.pop(worker, None)
                if running is not None and running.stalled:
                    elapsed = time.monotonic() - running.started
                    logger.warning("batcher %s: worker %d's batch ended after %.1f s; the model is ready again",
                                   self.name, worker, elapsed)
                    self._emit("recovered", {"worker": worker, "running_s": elapsed})
            if len(results) != len(batch):
                raise RuntimeError(f"infer fn returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            logger.exception(
                "batcher %s: inference failed on worker %d for %d items", self.name, worker, len(batch)
            )
            self._emit("error", {"size": len(batch), "exception_type": type(exc).__name__, "worker": worker})
            self._post(
                self._fail_requests,
                batch,
                lambda: errors.InferenceFailed(f"inference failed in model {self.name!r}"),
                "error",
            )
            return
        infer_s = time.monotonic() - started
        tokens = sum(item.length for item in batch)
        with self._cond:
            self._token_ewma_s = _ewma(self._token_ewma_s, infer_s / tokens)
            self._item_tokens_ewma = _ewma(self._item_tokens_ewma, tokens / len(batch))
        self._post(self._deliver, batch, results, taken_at, infer_s)
        self._emit(
            "batch",
            {
                "size": len(batch),
                "padded_tokens": len(batch) * max(item.length for item in batch),
                "real_tokens": tokens,
                "queue_wait_s": [taken_at - item.enqueued_at for item in batch],
                "infer_s": infer_s,
                "worker": worker,
            },
        )


def _ewma(previous: float | None, value: float) -> float:
    return value if previous is None else previous + _EWMA_ALPHA * (value - previous)
