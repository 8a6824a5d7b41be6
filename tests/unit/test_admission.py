"""Admission on its own: one ticket per request, its room counted until queued or given back, once."""

from __future__ import annotations

import time

import pytest

from service import errors
from service.batching.admission import Admission
from service.batching.policy import WorkItem


def items(*lengths: int, enqueued_at: float | None = None) -> list[WorkItem]:
    now = time.monotonic() if enqueued_at is None else enqueued_at
    return [WorkItem(length, now, None, None, i, None) for i, length in enumerate(lengths)]


def test_a_ticket_holds_its_room_until_queued_or_given_back_once():
    admission = Admission("m", max_queue_items=4, max_queue_wait_s=None, workers=1)
    first = admission.admit(3)
    assert admission.held == 3
    with pytest.raises(errors.Overloaded):
        admission.admit(2)  # 3 held + 2 > 4, though nothing is queued
    first.release()
    first.release()  # a second give-back changes nothing
    assert admission.held == 0
    second = admission.admit(4)
    admission.enqueue(second, items(5, 5, 5, 5))
    assert (admission.held, admission.queued) == (0, 4)
    second.release()  # spent: a no-op
    assert (admission.held, admission.queued) == (0, 4)
    admission.queue_changed([])
    assert admission.admit(4).items == 4


def test_the_doors_ticket_is_reused_grown_or_replaced():
    admission = Admission("m", max_queue_items=5, max_queue_wait_s=None, workers=1)
    door = admission.admit(1)
    assert admission.admit(1, door) is door and admission.held == 1  # covers it: not counted twice
    grown = admission.admit(3, door)  # the door counted one input; the tensors hold three
    assert grown is door and door.items == 3 and admission.held == 3
    neighbour = admission.admit(1)
    with pytest.raises(errors.Overloaded):
        admission.admit(5, door)  # growing by 2 follows the same rule: 4 held + 2 > 5
    assert door.items == 3 and admission.held == 4
    neighbour.release()
    other = Admission("n", max_queue_items=5, max_queue_wait_s=None, workers=1).admit(1)
    own = admission.admit(1, other)  # another model's ticket is not this queue's room
    assert own is not other and admission.held == 4 and other.held


def test_more_inputs_than_the_queue_holds_is_payload_too_large_not_overloaded():
    refused = []
    admission = Admission("m", max_queue_items=4, max_queue_wait_s=None, workers=1, on_refused=refused.append)
    with pytest.raises(errors.PayloadTooLarge):  # no retry would ever fit it
        admission.admit(5)
    admission.admit(4)
    with pytest.raises(errors.Overloaded) as info:
        admission.admit(1)
    assert int(info.value.headers["Retry-After"]) >= 1 and refused == [1]


def test_the_wait_rule_counts_queued_tokens_and_held_items_at_the_recent_cost():
    admission = Admission("m", max_queue_items=1000, max_queue_wait_s=1.0, workers=2)
    admission.record_batch(tokens=100, items=10, infer_s=0.1)  # 1 ms a token, 10 tokens an item
    admission.queue_changed(items(*[100] * 30))  # 3000 tokens over 2 workers: 1.5 s
    with pytest.raises(errors.Overloaded) as info:
        admission.admit(1)
    assert int(info.value.headers["Retry-After"]) >= 2
    admission.queue_changed(items(*[100] * 10))  # 0.5 s
    ticket = admission.admit(120)  # admitted: the queue is 0.5 s deep (the rule looks at the queue it joins)
    assert admission.wait_s() == pytest.approx(1.1)  # 120 held items of ~10 tokens: 0.6 s more
    with pytest.raises(errors.Overloaded):
        admission.admit(1)
    ticket.release()
    admission.admit(1)


def test_the_oldest_queued_item_past_the_wait_limit_closes_the_queue():
    admission = Admission("m", max_queue_items=1000, max_queue_wait_s=1.0, workers=1)
    admission.queue_changed(items(4, enqueued_at=time.monotonic() - 2.0))  # no cost known yet
    with pytest.raises(errors.Overloaded):
        admission.admit(1)
    admission.queue_changed([])
    admission.admit(1)
