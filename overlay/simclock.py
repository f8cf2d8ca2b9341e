"""A heap-ordered simulated clock for simulations with many thousands of timers.

Twisted's ``task.Clock`` keeps its calls in a list it re-sorts on every
``callLater``; with one timer per node and one per message in flight that
becomes the whole cost of a large simulation. Here scheduling and cancelling are
O(log n): a heap of ``(time, sequence, timer)``, cancelled timers skipped when
they surface (and swept out if they pile up). Equal times run in scheduling
order, so a simulation driven by it is reproducible.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

_COMPACT_MIN = 1024


class Timer:
    """A scheduled call; pass it to :meth:`HeapClock.cancel` to revoke it."""

    __slots__ = ("args", "cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False


class HeapClock:
    """Simulated time that only moves when told to, running calls in time order."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        """The current time (read it, never set it: use the run methods)."""
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0

    def seconds(self) -> float:
        """The current time (the name ``IReactorTime`` uses)."""
        return self.now

    def call_at(self, when: float, fn: Callable[..., object], *args: object) -> Timer:
        """Run ``fn(*args)`` at ``when`` (now, if that has passed)."""
        if when < self.now:
            when = self.now
        timer = Timer(when, fn, args)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, fn: Callable[..., object], *args: object) -> Timer:
        return self.call_at(self.now + delay, fn, *args)

    def cancel(self, timer: Timer) -> None:
        if timer.cancelled:
            return
        timer.cancelled = True
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def __len__(self) -> int:
        """Pending (not cancelled) calls."""
        return len(self._heap) - self._cancelled

    def next_time(self) -> float | None:
        """When the next pending call runs, or None if there is none."""
        self._skip_cancelled()
        return self._heap[0][0] if self._heap else None

    def step(self) -> bool:
        """Run the next pending call (moving time to it); False if there was none."""
        self._skip_cancelled()
        if not self._heap:
            return False
        when, _, timer = heapq.heappop(self._heap)
        self.now = when
        timer.cancelled = True  # it has run: cancelling it now is a no-op
        timer.fn(*timer.args)
        return True

    def run_until(self, when: float) -> int:
        """Run every call due up to and including ``when``, then set the time to ``when``."""
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= when:
            _, _, timer = heapq.heappop(heap)
            if timer.cancelled:
                self._cancelled -= 1
                continue
            self.now = timer.when
            timer.cancelled = True
            timer.fn(*timer.args)
            ran += 1
        if when > self.now:
            self.now = when
        return ran

    def advance(self, delay: float) -> int:
        """Move time forward by ``delay``, running what falls due on the way."""
        return self.run_until(self.now + delay)

    def _skip_cancelled(self) -> None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
