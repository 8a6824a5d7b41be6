"""Batcher: real threads and a real event loop, fake infer fns. No timing assertions: where a test needs
the worker busy it blocks the infer fn on an Event instead of relying on sleeps."""

import asyncio
import logging
import threading
import time

import pytest

from service import errors
from service.batching import Batcher, BatchLimits

IMMEDIATE = BatchLimits(max_batch_size=8, max_batch_tokens=10_000, max_queue_delay_s=0.0)
TIMEOUT_S = 5.0


def run(coro):
    """Run one test coroutine; a generous timeout turns a hang into a failure."""

    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT_S)

    return asyncio.run(bounded())


def doubling(seen=None, delay_s=0.0):
    """Infer fn returning payload * 2; records every batch's payloads in ``seen``."""

    def infer(batch):
        if seen is not None:
            seen.append([item.payload for item in batch])
        if delay_s:
            time.sleep(delay_s)
        return [item.payload * 2 for item in batch]

    return infer


class Gate:
    """An infer fn that holds its first batch until released, so a test can keep the worker busy."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen = []

    def __call__(self, batch):
        self.seen.append([item.payload for item in batch])
        self.entered.set()
        assert self.release.wait(TIMEOUT_S)
        return [item.payload * 2 for item in batch]

    async def wait_entered(self):
        assert await asyncio.to_thread(self.entered.wait, TIMEOUT_S)


def payloads(*values, length=4):
    return [(v, length) for v in values]


async def results_of(submitted):
    """The results of a submit, without its timings."""
    return (await submitted).results


async def wait_for_depth(batcher, depth):
    while batcher.queue_depth != depth:
        await asyncio.sleep(0.001)


def test_concurrent_requests_of_mixed_sizes_get_their_own_results_in_order():
    async def main():
        seen = []
        limits = BatchLimits(max_batch_size=4, max_batch_tokens=10_000, max_queue_delay_s=0.002)
        batcher = Batcher("m", [doubling(seen, 0.001)], limits, max_queue_items=1000)
        batcher.start()
        requests = [[(r * 100 + i, 1 + (r + i) % 9) for i in range(1 + r % 7)] for r in range(30)]
        results = await asyncio.gather(*(results_of(batcher.submit(p)) for p in requests))
        await batcher.stop(grace_s=1.0)
        for request, result in zip(requests, results):
            assert result == [value * 2 for value, _ in request]
        assert all(len(batch) <= 4 for batch in seen)
        assert sum(len(batch) for batch in seen) == sum(len(r) for r in requests)

    run(main())


def test_request_larger_than_batch_is_split_and_reassembled():
    async def main():
        seen = []
        limits = BatchLimits(max_batch_size=2, max_batch_tokens=10_000, max_queue_delay_s=0.0)
        batcher = Batcher("m", [doubling(seen)], limits, max_queue_items=100)
        batcher.start()
        result = await results_of(batcher.submit(payloads(*range(7))))
        await batcher.stop(grace_s=1.0)
        assert result == [v * 2 for v in range(7)]
        assert len(seen) >= 4 and all(len(batch) <= 2 for batch in seen)

    run(main())


def test_queue_full_raises_overloaded_with_retry_after_and_enqueues_nothing():
    async def main():
        gate = Gate()
        events = []
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=3, on_event=lambda k, d: events.append((k, d)))
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()  # the worker holds request 1; the queue is empty again
        queued = asyncio.create_task(results_of(batcher.submit(payloads(2, 3))))
        await wait_for_depth(batcher, 2)

        with pytest.raises(errors.Overloaded) as info:
            await results_of(batcher.submit(payloads(4, 5)))  # 2 + 2 > 3: all or nothing
        assert info.value.status_code == 429
        assert int(info.value.headers["Retry-After"]) >= 1
        assert batcher.queue_depth == 2
        assert ("rejected", {"reason": "overloaded", "items": 2}) in events

        gate.release.set()
        assert await busy == [2]
        assert await queued == [4, 6]
        assert await results_of(batcher.submit(payloads(4, 5))) == [8, 10]  # room again
        await batcher.stop(grace_s=1.0)
        assert all(4 not in batch for batch in gate.seen[:2])

    run(main())


def test_queue_wait_limit_refuses_at_once_while_the_queue_would_take_too_long():
    async def main():
        gate = Gate()
        # Batches of one item, as the token budget allows, though max_batch_size is 32: the estimate
        # must count items, not max_batch_size-sized batches (that took 10 items for one batch).
        one = BatchLimits(max_batch_size=32, max_batch_tokens=4, max_queue_delay_s=0.0)
        batcher = Batcher("m", [gate], one, max_queue_items=1000, max_queue_wait_s=2.5)
        batcher.admission.seconds_per_token = 0.25  # as if each 4-token item had taken a second
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()
        big = asyncio.create_task(results_of(batcher.submit(payloads(*range(10, 20)))))  # empty queue: always admitted
        await wait_for_depth(batcher, 10)
        with pytest.raises(errors.Overloaded) as info:  # 10 queued items of ~1 s > 2.5 s
            await results_of(batcher.submit(payloads(2)))
        assert int(info.value.headers["Retry-After"]) >= 10
        with pytest.raises(errors.Overloaded):
            batcher.admission.admit(1).release()  # the same rule before any tokenizing
        assert batcher.queue_depth == 10
        gate.release.set()
        assert await busy == [2] and await big == [2 * v for v in range(10, 20)]
        batcher.admission.admit(1).release()  # drained: room again
        await batcher.stop(grace_s=1.0)

    run(main())


def test_room_reserved_at_the_door_counts_as_queued_until_submitted():
    async def main():
        gate = Gate()
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=3)
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()  # the worker holds request 1; the queue is empty
        first = batcher.admission.admit(2)
        with pytest.raises(errors.Overloaded):  # 2 reserved + 2 > 3, though nothing is queued yet
            batcher.admission.admit(2)
        with pytest.raises(errors.Overloaded):
            batcher.admission.admit(2).release()  # the routes' own check sees the reservation too
        # Submitting with its reservation turns the room into queued items (not counted twice).
        queued = asyncio.create_task(results_of(batcher.submit(payloads(2, 3), ticket=first)))
        await wait_for_depth(batcher, 2)
        assert not first.held
        first.release()  # a no-op once submitted
        second = batcher.admission.admit(1)  # 2 queued + 1 fits
        second.release()  # the request ended before submitting: its room comes back
        second.release()
        assert batcher.admission.held == 0
        other = Batcher("n", [doubling()], IMMEDIATE, max_queue_items=3).admission.admit(1)
        gate.release.set()
        assert await busy == [2] and await queued == [4, 6]
        # Another model's reservation is not this queue's room.
        assert await results_of(batcher.submit(payloads(5), ticket=other)) == [10] and other.held
        await batcher.stop(grace_s=1.0)

    run(main())


def test_request_larger_than_the_whole_queue_is_payload_too_large():
    async def main():
        batcher = Batcher("m", [doubling()], IMMEDIATE, max_queue_items=3)
        batcher.start()
        with pytest.raises(errors.PayloadTooLarge):
            await results_of(batcher.submit(payloads(1, 2, 3, 4)))
        await batcher.stop(grace_s=1.0)

    run(main())


def test_deadline_expiry_raises_and_item_never_reaches_inference():
    async def main():
        gate = Gate()
        events = []
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=10, on_event=lambda k, d: events.append((k, d)))
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()
        deadline = time.monotonic() + 0.2
        late = asyncio.create_task(results_of(batcher.submit(payloads(7, 8), deadline=deadline)))
        # The only worker stays inside its batch: the deadline must fire on its own, on time.
        with pytest.raises(errors.DeadlineExceeded) as info:
            await asyncio.wait_for(late, 2.0)
        assert time.monotonic() >= deadline and not gate.release.is_set()
        assert "timed out after" in info.value.message
        assert info.value.status_code == 503
        assert batcher.queue_depth == 0
        gate.release.set()
        assert await busy == [2]
        await batcher.stop(grace_s=1.0)
        assert gate.seen == [[1]]
        assert [d for k, d in events if k == "rejected"] == [{"reason": "timeout", "items": 2}]

    run(main())


def test_cancelled_caller_drops_its_items_before_inference():
    async def main():
        gate = Gate()
        events = []
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=10, on_event=lambda k, d: events.append((k, d)))
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()
        gone = asyncio.create_task(results_of(batcher.submit(payloads(7, 8, 9))))
        await wait_for_depth(batcher, 3)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queue_depth == 0

        gate.release.set()
        assert await busy == [2]
        assert await results_of(batcher.submit(payloads(3))) == [6]
        await batcher.stop(grace_s=1.0)
        assert gate.seen == [[1], [3]]
        assert ("rejected", {"reason": "cancelled", "items": 3}) in events

    run(main())


def test_failing_batch_fails_only_its_requests_and_batcher_keeps_serving(caplog):
    def infer(batch):
        if any(item.payload == "boom" for item in batch):
            raise RuntimeError("secret backend detail")
        return [item.payload * 2 for item in batch]

    async def main():
        events = []
        limits = BatchLimits(max_batch_size=1, max_batch_tokens=10_000, max_queue_delay_s=0.0)
        batcher = Batcher("m", [infer], limits, max_queue_items=10, on_event=lambda k, d: events.append((k, d)))
        batcher.start()
        results = await asyncio.gather(
            results_of(batcher.submit(payloads(1))),
            results_of(batcher.submit(payloads("boom"))),
            results_of(batcher.submit(payloads(3))),
            return_exceptions=True,
        )
        assert results[0] == [2] and results[2] == [6]
        assert isinstance(results[1], errors.InferenceFailed)
        assert results[1].status_code == 500
        assert "secret" not in results[1].message and "secret" not in str(results[1])
        assert await results_of(batcher.submit(payloads(5))) == [10]
        await batcher.stop(grace_s=1.0)
        assert [d["exception_type"] for k, d in events if k == "error"] == ["RuntimeError"]

    with caplog.at_level(logging.ERROR, logger="service.batching.batcher"):
        run(main())
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1 and "secret backend detail" in str(failures[0].exc_info[1])


def test_split_request_fails_whole_when_one_of_its_batches_fails():
    def infer(batch):
        if any(item.payload == 3 for item in batch):
            raise ValueError("bad")
        return [item.payload for item in batch]

    async def main():
        limits = BatchLimits(max_batch_size=2, max_batch_tokens=10_000, max_queue_delay_s=0.0)
        batcher = Batcher("m", [infer], limits, max_queue_items=10)
        batcher.start()
        with pytest.raises(errors.InferenceFailed):
            await results_of(batcher.submit(payloads(0, 1, 2, 3, 4, 5)))
        assert await results_of(batcher.submit(payloads(9))) == [9]
        await batcher.stop(grace_s=1.0)

    run(main())


def test_two_workers_both_used():
    # Each worker's first batch waits at the barrier: it only passes if both workers run at once.
    barrier = threading.Barrier(2, timeout=TIMEOUT_S)
    threads_used = set()

    def make_infer():
        def infer(batch):
            threads_used.add(threading.current_thread().name)
            barrier.wait()
            return [item.payload * 2 for item in batch]

        return infer

    async def main():
        limits = BatchLimits(max_batch_size=1, max_batch_tokens=10_000, max_queue_delay_s=0.0)
        batcher = Batcher("m", [make_infer(), make_infer()], limits, max_queue_items=10)
        batcher.start()
        assert await asyncio.gather(results_of(batcher.submit(payloads(1))), results_of(batcher.submit(payloads(2)))) == [[2], [4]]
        await batcher.stop(grace_s=1.0)

    run(main())
    assert threads_used == {"batcher-m-0", "batcher-m-1"}


def test_lone_batch_runs_on_the_solo_fn_and_a_batch_beside_it_on_the_normal_fn():
    # A lone request gets the wide session; while it runs, the next one must not (its cores are taken).
    solo = Gate()
    normal_seen = []

    async def main():
        batcher = Batcher("m", [doubling(normal_seen), doubling(normal_seen)], IMMEDIATE, max_queue_items=10,
                          solo_infer_fns=[solo, solo])
        batcher.start()
        first = asyncio.ensure_future(results_of(batcher.submit(payloads(1))))
        await solo.wait_entered()
        assert await results_of(batcher.submit(payloads(2))) == [4]
        solo.release.set()
        assert await first == [2]
        assert await results_of(batcher.submit(payloads(3))) == [6]  # alone again: the solo fn
        await batcher.stop(grace_s=1.0)

    run(main())
    assert solo.seen == [[1], [3]]
    assert normal_seen == [[2]]


def test_solo_fns_must_match_the_workers():
    with pytest.raises(ValueError, match="solo infer fns"):
        Batcher("m", [doubling(), doubling()], IMMEDIATE, max_queue_items=10, solo_infer_fns=[doubling()])


def test_stop_drains_queued_work_then_refuses_new_work():
    async def main():
        limits = BatchLimits(max_batch_size=2, max_batch_tokens=10_000, max_queue_delay_s=10.0)
        batcher = Batcher("m", [doubling(delay_s=0.001)], limits, max_queue_items=100)
        batcher.start()
        # With a 10 s delay, one item would wait; stop() must not make it wait for companions.
        tasks = [asyncio.create_task(results_of(batcher.submit(payloads(i)))) for i in range(5)]
        await wait_for_depth(batcher, 1)
        await batcher.stop(grace_s=TIMEOUT_S - 1)
        assert [await t for t in tasks] == [[i * 2] for i in range(5)]
        assert not any(t.is_alive() for t in batcher._threads)
        with pytest.raises(errors.NotReady):
            await results_of(batcher.submit(payloads(1)))

    run(main())


def test_stop_after_grace_fails_what_is_still_queued():
    async def main():
        gate = Gate()
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=10)
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()
        queued = asyncio.create_task(results_of(batcher.submit(payloads(2))))
        await wait_for_depth(batcher, 1)
        asyncio.get_running_loop().call_later(0.05, gate.release.set)
        await batcher.stop(grace_s=0.01)
        with pytest.raises(errors.NotReady):
            await queued
        assert await busy == [2]  # the batch already inside the backend still answers
        assert gate.seen == [[1]]

    run(main())


def test_submit_before_start_is_not_ready_and_empty_request_is_empty():
    async def main():
        batcher = Batcher("m", [doubling()], IMMEDIATE, max_queue_items=10)
        assert await results_of(batcher.submit([])) == []
        with pytest.raises(errors.NotReady):
            await results_of(batcher.submit(payloads(1)))
        await batcher.stop(grace_s=0.1)

    run(main())


def test_batch_event_and_a_failing_hook_do_not_break_serving(caplog):
    events = []

    def hook(kind, data):
        events.append((kind, data))
        raise RuntimeError("metrics down")

    async def main():
        batcher = Batcher("m", [doubling()], IMMEDIATE, max_queue_items=10, on_event=hook)
        batcher.start()
        assert await results_of(batcher.submit([(1, 3), (2, 5)])) == [2, 4]
        await batcher.stop(grace_s=1.0)

    with caplog.at_level(logging.ERROR, logger="service.batching.batcher"):
        run(main())
    batches = [d for k, d in events if k == "batch"]
    assert sum(d["size"] for d in batches) == 2
    for d in batches:
        assert set(d) >= {"size", "padded_tokens", "real_tokens", "queue_wait_s", "infer_s"}
        assert d["padded_tokens"] >= d["real_tokens"] and len(d["queue_wait_s"]) == d["size"]


def test_deadline_of_a_request_already_in_inference_does_not_fail_it():
    async def main():
        gate = Gate()
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=10)
        batcher.start()
        running = asyncio.create_task(results_of(batcher.submit(payloads(1), deadline=time.monotonic() + 0.05)))
        await gate.wait_entered()
        await asyncio.sleep(0.1)  # past its deadline, but it reached inference before it
        gate.release.set()
        assert await running == [2]
        await batcher.stop(grace_s=1.0)

    run(main())


def test_wait_estimate_counts_tokens_so_a_queue_of_news_costs_more_than_one_of_tweets():
    async def main():
        gate = Gate()
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=1000, max_queue_wait_s=1.0)
        batcher.admission.seconds_per_token = 0.001  # a millisecond per token
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()
        tweets = asyncio.create_task(results_of(batcher.submit(payloads(*range(10), length=40))))  # 0.4 s of work
        await wait_for_depth(batcher, 10)
        batcher.admission.admit(1).release()  # 0.4 s < 1 s: room
        news = asyncio.create_task(results_of(batcher.submit(payloads(*range(4), length=256))))  # about 1 s more
        await wait_for_depth(batcher, 14)
        with pytest.raises(errors.Overloaded):  # 400 + 1024 tokens: 1.4 s > 1 s
            batcher.admission.admit(1).release()
        gate.release.set()
        await asyncio.gather(busy, tweets, news)
        await batcher.stop(grace_s=1.0)

    run(main())


def test_watchdog_marks_a_batch_past_its_limit_stalled_until_it_ends():
    async def main():
        gate = Gate()
        events = []
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=10, stall_after_s=0.05,
                          on_event=lambda k, d: events.append((k, d)))
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()
        assert batcher.check_stalls() == 0 and not batcher.stalled
        await asyncio.sleep(0.1)
        assert batcher.check_stalls() == 1 and batcher.stalled
        assert batcher.check_stalls() == 1  # counted once per batch, however often it is checked
        assert [k for k, _ in events if k == "stalled"] == ["stalled"]
        gate.release.set()
        assert await busy == [2]
        assert not batcher.stalled and batcher.check_stalls() == 0
        assert [k for k, _ in events if k in ("stalled", "recovered")] == ["stalled", "recovered"]
        await batcher.stop(grace_s=1.0)

    run(main())


def test_automatic_stall_limit_follows_recent_batches_with_a_floor():
    from service.batching.batcher import STALL_FACTOR, STALL_FLOOR_S, _Running

    batcher = Batcher("m", [doubling()], IMMEDIATE, max_queue_items=10)
    assert batcher._stall_limit_s(_Running(0.0, 100)) == STALL_FLOOR_S  # nothing measured yet
    batcher.admission.seconds_per_token = 0.01  # 10 ms per token: a 100-token batch should take 1 s
    assert batcher._stall_limit_s(_Running(0.0, 100)) == pytest.approx(STALL_FACTOR * 1.0)
    assert Batcher("m", [doubling()], IMMEDIATE, max_queue_items=10,
                   stall_after_s=2.0)._stall_limit_s(_Running(0.0, 100)) == 2.0


def test_admission_also_refuses_while_the_oldest_queued_item_has_waited_past_the_limit():
    async def main():
        gate = Gate()
        batcher = Batcher("m", [gate], IMMEDIATE, max_queue_items=1000, max_queue_wait_s=1.0)
        batcher.admission.seconds_per_token = 1e-6  # the prediction says the queue is nothing
        batcher.start()
        busy = asyncio.create_task(results_of(batcher.submit(payloads(1))))
        await gate.wait_entered()
        queued = asyncio.create_task(results_of(batcher.submit(payloads(2))))
        await wait_for_depth(batcher, 1)
        batcher.admission.admit(1).release()  # just queued: room
        batcher._queue[0].enqueued_at -= 2.0  # as if the workers had fallen behind the prediction
        with pytest.raises(errors.Overloaded):
            batcher.admission.admit(1).release()
        gate.release.set()
        assert await busy == [2] and await queued == [4]
        batcher.admission.admit(1).release()
        await batcher.stop(grace_s=1.0)

    run(main())
