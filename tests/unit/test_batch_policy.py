"""choose_batch: a pure function, so every rule is checked with plain numbers and a fake clock."""

import random

import pytest

from service.batching.policy import BatchLimits, WorkItem, choose_batch

LIMITS = BatchLimits(max_batch_size=4, max_batch_tokens=1000, max_queue_delay_s=0.01)


def items(*lengths, t0=0.0, step=0.001, deadline=None):
    """One item per length, enqueued ``step`` seconds apart, each its own request."""
    return [WorkItem(length=n, enqueued_at=t0 + i * step, deadline=deadline, request=i, index=0)
            for i, n in enumerate(lengths)]


def lengths_of(batch):
    return [item.length for item in batch]


def test_empty_queue_waits_for_new_items():
    decision = choose_batch([], LIMITS, now=5.0)
    assert decision.batch == [] and decision.expired == [] and decision.cancelled == []
    assert decision.wait_s is None


def test_partial_batch_waits_until_oldest_reaches_max_delay():
    queue = items(10, 10)  # enqueued at 0.000 and 0.001
    decision = choose_batch(queue, LIMITS, now=0.004)
    assert decision.batch == []
    assert decision.wait_s == pytest.approx(0.006)


def test_partial_batch_goes_once_oldest_waited_max_delay():
    queue = items(10, 10)
    decision = choose_batch(queue, LIMITS, now=0.010)
    assert decision.batch == queue
    assert decision.wait_s is None


def test_zero_delay_dispatches_immediately():
    limits = BatchLimits(max_batch_size=4, max_batch_tokens=1000, max_queue_delay_s=0.0)
    queue = items(10)
    assert choose_batch(queue, limits, now=0.0).batch == queue


def test_full_batch_by_count_goes_without_waiting():
    queue = items(10, 10, 10, 10, 10)
    decision = choose_batch(queue, LIMITS, now=0.004)
    assert decision.batch == queue[:4]  # size limit, oldest first among equals
    assert decision.wait_s is None


def test_full_batch_by_tokens_goes_without_waiting():
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=100, max_queue_delay_s=1.0)
    queue = items(50, 50)  # 2 * 50 padded tokens reaches the budget
    assert choose_batch(queue, limits, now=0.002).batch == queue


def test_wait_is_cut_short_by_a_deadline_inside_the_window():
    queue = items(10, deadline=0.005)
    decision = choose_batch(queue, LIMITS, now=0.001)
    # Waiting until 0.005 would only wake us to expire it: go now instead.
    assert decision.batch == queue


def test_wait_is_unchanged_by_a_deadline_after_the_window():
    queue = items(10, deadline=5.0)
    decision = choose_batch(queue, LIMITS, now=0.001)
    assert decision.batch == [] and decision.wait_s == pytest.approx(0.009)


def test_expired_and_cancelled_are_dropped_never_batched():
    queue = items(10, 10, 10, 10)
    queue[0].deadline = 1.0  # passed
    queue[1].cancelled = True
    queue[2].deadline = 2.0  # exactly now counts as passed
    decision = choose_batch(queue, LIMITS, now=2.0)
    assert decision.expired == [queue[0], queue[2]]
    assert decision.cancelled == [queue[1]]
    assert decision.batch == [queue[3]]


def test_only_dead_items_means_empty_queue():
    queue = items(10, 10)
    queue[0].cancelled = True
    queue[1].deadline = 0.0
    decision = choose_batch(queue, LIMITS, now=1.0)
    assert decision.batch == [] and decision.wait_s is None
    assert len(decision.expired) == 1 and len(decision.cancelled) == 1


def test_token_budget_counts_padding():
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=120, max_queue_delay_s=0.0)
    queue = items(40, 10, 10, 10)  # the oldest is long, so every companion pads up to 40
    batch = choose_batch(queue, limits, now=1.0).batch
    # 3 * 40 = 120 fits exactly; 4 * 40 would not, though the real tokens (70) would
    assert lengths_of(batch) == [40, 10, 10]


def test_item_longer_than_budget_goes_alone():
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=64, max_queue_delay_s=0.0)
    queue = items(512, 8, 8)
    decision = choose_batch(queue, limits, now=1.0)
    assert decision.batch == [queue[0]]


def test_oldest_item_always_included():
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=10_000, max_queue_delay_s=0.0)
    queue = items(300, 5, 5, 5, 5)  # the long one is oldest: the short ones must not starve it
    batch = choose_batch(queue, limits, now=1.0).batch
    assert queue[0] in batch and len(batch) == 2


def test_padding_minimized_similar_lengths_go_together():
    limits = BatchLimits(max_batch_size=8, max_batch_tokens=250, max_queue_delay_s=0.0)
    queue = items(5, 100, 5, 100, 5)
    first = choose_batch(queue, limits, now=1.0).batch
    assert first == [queue[0], queue[2], queue[4]]
    rest = [item for item in queue if item not in first]
    assert choose_batch(rest, limits, now=1.0).batch == [queue[1], queue[3]]


def test_padding_minimized_when_oldest_is_long():
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=10_000, max_queue_delay_s=0.0)
    queue = items(100, 5, 5, 99)
    assert choose_batch(queue, limits, now=1.0).batch == [queue[0], queue[3]]


def test_equal_padding_prefers_older_neighbour():
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=10_000, max_queue_delay_s=0.0)
    queue = items(7, 7, 7, 7)
    assert choose_batch(queue, limits, now=1.0).batch == queue[:2]


def test_items_of_one_request_keep_their_order_and_may_split():
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=10_000, max_queue_delay_s=0.0)
    request = object()
    queue = [WorkItem(length=10, enqueued_at=0.0, deadline=None, request=request, index=i) for i in range(5)]
    seen = []
    while queue:
        batch = choose_batch(queue, limits, now=1.0).batch
        seen.extend(item.index for item in batch)
        queue = [item for item in queue if item not in batch]
    assert seen == [0, 1, 2, 3, 4]


def test_limits_are_validated():
    with pytest.raises(ValueError):
        BatchLimits(max_batch_size=0, max_batch_tokens=10, max_queue_delay_s=0.0)
    with pytest.raises(ValueError):
        BatchLimits(max_batch_size=1, max_batch_tokens=10, max_queue_delay_s=-1.0)


@pytest.mark.parametrize("seed", range(20))
def test_randomized_nothing_lost_or_duplicated_and_limits_hold(seed):
    rng = random.Random(seed)
    limits = BatchLimits(
        max_batch_size=rng.randint(1, 8),
        max_batch_tokens=rng.randint(16, 600),
        max_queue_delay_s=rng.choice([0.0, 0.005, 0.05]),
    )
    queue = []
    for i in range(rng.randint(1, 80)):
        queue.append(WorkItem(
            length=rng.randint(1, 200),
            enqueued_at=rng.uniform(0.0, 0.1),
            deadline=rng.choice([None, None, rng.uniform(0.0, 0.3)]),
            request=i,
            index=0,
            cancelled=rng.random() < 0.1,
        ))
    everything = list(queue)
    out: list[WorkItem] = []
    now = 0.1
    for _ in range(10_000):
        if not queue:
            break
        decision = choose_batch(queue, limits, now)
        batch = decision.batch
        if batch:
            live_before = [i for i in queue if not i.cancelled and (i.deadline is None or i.deadline > now)]
            oldest = min(live_before, key=lambda i: (i.enqueued_at, queue.index(i)))
            assert oldest in batch
            assert len(batch) <= limits.max_batch_size
            assert len(batch) == 1 or len(batch) * max(lengths_of(batch)) <= limits.max_batch_tokens
        assert all(i.cancelled for i in decision.cancelled)
        assert all(i.deadline is not None and i.deadline <= now for i in decision.expired)
        gone = batch + decision.expired + decision.cancelled
        out.extend(gone)
        queue = [item for item in queue if item not in gone]
        if not gone:
            assert decision.wait_s is not None and decision.wait_s > 0
            now += decision.wait_s
    assert not queue, "queue never drained"
    assert len(out) == len(everything)
    assert {id(i) for i in out} == {id(i) for i in everything}


def test_hypothesis_property_if_available():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.given(
        lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40),
        size=st.integers(1, 8),
        tokens=st.integers(1, 800),
    )
    def prop(lengths, size, tokens):
        limits = BatchLimits(max_batch_size=size, max_batch_tokens=tokens, max_queue_delay_s=0.0)
        queue = items(*lengths)
        drained = []
        while queue:
            batch = choose_batch(queue, limits, now=10.0).batch
            assert queue[0] in batch
            assert len(batch) <= size
            assert len(batch) == 1 or len(batch) * max(lengths_of(batch)) <= tokens
            drained.extend(batch)
            queue = [item for item in queue if item not in batch]
        assert len(drained) == len(lengths) and len({id(i) for i in drained}) == len(lengths)

    prop()


def test_padding_ratio_keeps_short_and_long_texts_apart():
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=8192, max_queue_delay_s=0.0, max_padding_ratio=1.5)
    queue = items(40, 256, 38, 250, 42, 256, 36, 240)  # one client's mixed request
    first = choose_batch(queue, limits, now=1.0).batch
    assert lengths_of(first) == [40, 38, 42, 36]  # the oldest (40) with its own kind
    rest = [i for i in queue if i not in first]
    second = choose_batch(rest, limits, now=1.0).batch
    assert sorted(lengths_of(second)) == [240, 250, 256, 256]
    padded = len(first) * max(lengths_of(first)) + len(second) * max(lengths_of(second))
    assert padded < 0.6 * len(queue) * 256  # against one batch padded to the longest


def test_padding_ratio_off_batches_everything_together():
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=8192, max_queue_delay_s=0.0)
    queue = items(40, 256, 38, 250)
    assert len(choose_batch(queue, limits, now=1.0).batch) == 4


def test_padding_ratio_below_one_is_refused():
    with pytest.raises(ValueError, match="max_padding_ratio"):
        BatchLimits(max_batch_size=4, max_batch_tokens=100, max_queue_delay_s=0.0, max_padding_ratio=0.5)


def test_companions_come_from_the_oldest_few_batches_so_a_deep_queue_stays_near_arrival_order():
    from service.batching.policy import LOOKAHEAD_BATCHES

    limits = BatchLimits(max_batch_size=4, max_batch_tokens=10_000, max_queue_delay_s=0.0)
    window = LOOKAHEAD_BATCHES * limits.max_batch_size
    # Under overload: the oldest text is short, the next window's worth are long, and short texts as
    # good a match as can be arrive later. Going for them would leave the long ones waiting.
    queue = items(10, *([60] * window), *([10] * 40))
    batch = choose_batch(queue, limits, now=1.0).batch
    assert queue[0] in batch and len(batch) == 4
    assert all(queue.index(item) < window for item in batch), lengths_of(batch)

