"""One heap for every deadline a core keeps (requests, tunnel offers, retries).

A core pushes ``(when, item)`` and, on its timer, pops what is due. Items that
finish early stay in the heap until their time (removing from the middle of a
heap is dear); the core says so with :meth:`DeadlineHeap.finished`, and once
they are more than half of the heap they are swept out in one pass, so a busy
node never holds a timeout's worth of finished work.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_SWEEP_MIN = 1024


class DeadlineHeap(Generic[T]):
    """Deadlines of items that are still ``pending(item)``, earliest first."""

    def __init__(self, pending: Callable[[T], bool]) -> None:
        self._pending = pending
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()
        self._finished = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, when: float, item: T) -> bool:
        """Add a deadline; True if it is now the earliest (the owner's timer must move)."""
        heap = self._heap
        earliest = not heap or when < heap[0][0]
        heapq.heappush(heap, (when, next(self._order), item))
        return earliest

    def finished(self) -> None:
        """An item in the heap stopped being pending before its deadline."""
        self._finished += 1
        heap = self._heap
        if self._finished > _SWEEP_MIN and self._finished * 2 > len(heap):
            pending = self._pending
            self._heap = [entry for entry in heap if pending(entry[2])]
            heapq.heapify(self._heap)
            self._finished = 0

    def next_deadline(self) -> float | None:
        heap, pending = self._heap, self._pending
        while heap and not pending(heap[0][2]):
            heapq.heappop(heap)
            self._finished = max(0, self._finished - 1)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[T]:
        """Every pending item whose deadline is ``now`` or earlier, in deadline order."""
        heap, pending = self._heap, self._pending
        due: list[T] = []
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if pending(item):
                due.append(item)
            else:
                self._finished = max(0, self._finished - 1)
        return due

    def pop_all(self) -> list[T]:
        """Every pending item, earliest first (the node is shutting down)."""
        items = [entry[2] for entry in sorted(self._heap) if self._pending(entry[2])]
        self._heap.clear()
        self._finished = 0
        return items
