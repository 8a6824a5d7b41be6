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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service import errors
from service.batching.admission import Admission, Ticket
from service.batching.policy import BatchLimits, WorkItem, choose_batch

logger = logging.getLogger(__name__)

InferFn = Callable[[list[WorkItem]], list[Any]]
EventHook = Callable[[str, dict], None]

# After the grace period, how long stop() still waits for a batch already inside a backend; a hung
# backend must not hang shutdown (the threads are daemons).
_JOIN_AFTER_GRACE_S = 5.0
# The watchdog's automatic limit for one batch: this many times what recent batches say it should take,
# and never less than the floor (a cold cache, a GC pause or a busy neighbour must not look like a hang).
STALL_FACTOR = 20.0
STALL_FLOOR_S = 5.0


@dataclass(frozen=True, slots=True)
class Batched:
    """What ``submit`` returns: one result per item, in order, and where the request's time went."""

    results: list[Any]
    queue_s: float  # the longest wait of its items before their batch started
    infer_s: float  # backend time of the batches that carried its items, summed


class _Request:
    """One client request: its items, the future its caller awaits, and the results gathered so far."""

    __slots__ = ("future", "items", "results", "remaining", "queue_s", "infer_s")

    def __init__(self, future: asyncio.Future, size: int):
        self.future = future
        self.items: list[WorkItem] = []
        self.results: list[Any] = [None] * size
        self.remaining = size
        self.queue_s = self.infer_s = 0.0


class _Running:
    """A batch inside a backend, as the watchdog sees it."""

    __slots__ = ("started", "tokens", "stalled")

    def __init__(self, started: float, tokens: int):
        self.started, self.tokens, self.stalled = started, tokens, False


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

    Whether a request may queue is its ``admission``'s decision (service/batching/admission.py): a
    ticket taken before the request's work began, which ``submit`` turns into queued items. The batcher
    reports its queue and its batches' cost there.
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
        self.name = name
        self.limits = limits
        self.admission = Admission(name, max_queue_items, max_queue_wait_s, len(infer_fns),
                                   limits.max_queue_delay_s, on_refused=self._refused)
        self._infer_fns = list(infer_fns)
        self._solo_infer_fns = list(solo_infer_fns) if solo_infer_fns else None
        self._on_event = on_event
        # While draining nobody else will join, so waiting for companions would only delay shutdown.
        self._drain_limits = dataclasses.replace(limits, max_queue_delay_s=0.0)

        self._cond = threading.Condition()
        self._queue: list[WorkItem] = []  # arrival order; guarded by _cond
        self._closing = False  # no new submits; workers exit once the queue is empty
        self._halted = False  # workers exit now, queue or not
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
    def max_queue_items(self) -> int:
        return self.admission.max_queue_items

    @property
    def queue_depth(self) -> int:
        """Items waiting in the queue (not counting batches already inside a backend)."""
        with self._cond:
            return len(self._queue)

    # ----------------------------------------------------------------- event-loop side

    async def submit(self, payloads: Sequence[tuple[Any, int]], deadline: float | None = None,
                     ticket: Ticket | None = None) -> Batched:
        """Run the ``(payload, length)`` items of one request; return their results in the same order,
        with the time its items waited and spent in inference.

        ``ticket``: the request's admission (``self.admission.admit``), taken before its work began;
        its items are queued under it and it is spent. Without one the request is admitted here.

        ``deadline`` is in ``time.monotonic()`` seconds: an item not started by then fails the request
        with DeadlineExceeded. Raises Overloaded (nothing enqueued) when admission refuses it,
        PayloadTooLarge when the request alone exceeds the queue, NotReady when not started or stopping,
        InferenceFailed when a batch holding one of its items failed. Cancelling the caller drops its
        still-queued items.
        """
        if not payloads:
            return Batched([], 0.0, 0.0)
        if self._loop is None:
            raise errors.NotReady(f"model {self.name!r} is not ready")
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), len(payloads))
        now = time.monotonic()
        for index, (payload, length) in enumerate(payloads):
            if length < 1:
                raise ValueError(f"item {index} has length {length}; every item has at least one token")
            request.items.append(WorkItem(length, now, deadline, request, index, payload))

        ticket = self.admission.admit(len(payloads), ticket)
        try:
            with self._cond:
                if self._closing:
                    raise errors.NotReady(f"model {self.name!r} is shutting down")
                self._queue.extend(request.items)
                self.admission.enqueue(ticket, request.items)
                self._cond.notify()
        finally:
            ticket.release()  # spent once queued; given back if the queue was closing

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

    def _refused(self, items: int) -> None:
        self._emit("rejected", {"reason": "overloaded", "items": items})

    def _set_queue(self, items: list[WorkItem]) -> None:
        """Replace the queue and tell admission; lock held."""
        self._queue = items
        self.admission.queue_changed(items)

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
            request.queue_s = max(request.queue_s, taken_at - item.enqueued_at)
            if id(request) not in timed:
                timed.add(id(request))
                request.infer_s += infer_s
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(Batched(request.results, request.queue_s, request.infer_s))

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
        per_token = self.admission.seconds_per_token
        expected = running.tokens * per_token if per_token is not None else 0.0
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
        self.admission.record_batch(tokens, len(batch), infer_s)
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

