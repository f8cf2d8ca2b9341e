"""Admission control for handlers (spec 11.8): what runs, what waits, what is dropped."""

from __future__ import annotations

import pytest

from relay.client.pool import HandlerQueue, Limits


def test_at_most_n_run_and_the_rest_wait_in_order() -> None:
    queue: HandlerQueue[str] = HandlerQueue(Limits(handlers=2, memory=100))
    for item in "abc":
        assert queue.offer(item, 1)
    assert [queue.next(0.0), queue.next(0.0), queue.next(0.0)] == ["a", "b", None]
    assert (queue.running, queue.queued_bytes, len(queue)) == (2, 1, 1)
    queue.finished()
    assert queue.next(0.0) == "c"
    assert queue.queued_bytes == 0


def test_memory_counts_waiting_payload_bytes_only() -> None:
    queue: HandlerQueue[str] = HandlerQueue(Limits(handlers=1, memory=10))
    assert queue.offer("big", 10)
    assert not queue.offer("one more", 1)  # 10 + 1 > 10
    assert queue.next(0.0) == "big"  # running items no longer count
    assert queue.offer("fits", 10)
    assert not queue.offer("too big", 11)
    assert queue.dropped == 2


def test_items_that_expired_while_waiting_are_skipped_and_counted() -> None:
    queue: HandlerQueue[str] = HandlerQueue(Limits(handlers=1))
    queue.offer("stale", 1, expires=5.0)
    queue.offer("fresh", 1, expires=50.0)
    queue.offer("forever", 1)
    assert queue.next(10.0) == "fresh"
    assert queue.expired == 1
    queue.finished()
    assert queue.next(1e9) == "forever"


def test_a_paused_queue_holds_everything_back() -> None:
    queue: HandlerQueue[str] = HandlerQueue(Limits(), paused=True)
    queue.offer("a", 1)
    assert queue.next(0.0) is None
    queue.paused = False
    assert queue.next(0.0) == "a"


def test_clear_forgets_the_waiting_items() -> None:
    queue: HandlerQueue[str] = HandlerQueue(Limits(handlers=1))
    for item in "abc":
        queue.offer(item, 3)
    queue.next(0.0)
    assert queue.clear() == 2
    assert (len(queue), queue.queued_bytes, queue.running) == (0, 0, 1)


def test_limits_are_validated_and_finished_must_match_a_start() -> None:
    with pytest.raises(ValueError):
        Limits(handlers=0)
    with pytest.raises(ValueError):
        Limits(memory=-1)
    with pytest.raises(RuntimeError):
        HandlerQueue[str](Limits()).finished()
