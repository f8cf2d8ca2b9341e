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

    __slots__ = ("cancelled", "when")

    def __init__(self, when: float) -> None:
        self.when = when
        self.cancelled = False


_Entry = tuple[float, int, Callable[..., object], tuple[object, ...], Timer | None]
"""(time, sequence, function, arguments, timer): the sequence breaks ties, so the
comparison never reaches the function; the timer is None for calls that cannot
be cancelled."""


class HeapClock:
    """Simulated time that only moves when told to, running calls in time order."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        """The current time (read it, never set it: use the run methods)."""
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._cancelled = 0

    def seconds(self) -> float:
        """The current time (the name ``IReactorTime`` uses)."""
        return self.now

    def call_at(self, when: float, fn: Callable[..., object], *args: object) -> Timer:
        """Run ``fn(*args)`` at ``when`` (now, if that has passed)."""
        if when < self.now:
            when = self.now
        timer = Timer(when)
        heapq.heappush(self._heap, (when, next(self._seq), fn, args, timer))
        return timer

    def call_later(self, delay: float, fn: Callable[..., object], *args: object) -> Timer:
        return self.call_at(self.now + delay, fn, *args)

    def post_at(self, when: float, fn: Callable[..., object], *args: object) -> None:
        """:meth:`call_at` for a call that will never be cancelled (a message in
        flight): no :class:`Timer` to allocate, which matters at millions of calls."""
        if when < self.now:
            when = self.now
        heapq.heappush(self._heap, (when, next(self._seq), fn, args, None))

    def cancel(self, timer: Timer) -> None:
        if timer.cancelled:
            return
        timer.cancelled = True
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[4] is None or not e[4].cancelled]
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
        when, _, fn, args, timer = heapq.heappop(self._heap)
        self.now = when
        if timer is not None:
            timer.cancelled = True  # it has run: cancelling it now is a no-op
        fn(*args)
        return True

    def run_until(self, when: float) -> int:
        """Run every call due up to and including ``when``, then set the time to ``when``."""
        heap = self._heap
        pop = heapq.heappop
        ran = 0
        while heap and heap[0][0] <= when:
            at, _, fn, args, timer = pop(heap)
            if timer is not None:
                if timer.cancelled:
                    self._cancelled -= 1
                    continue
                timer.cancelled = True
            self.now = at
            fn(*args)
            ran += 1
        if when > self.now:
            self.now = when
        return ran

    def advance(self, delay: float) -> int:
        """Move time forward by ``delay``, running what falls due on the way."""
        return self.run_until(self.now + delay)

    def _skip_cancelled(self) -> None:
        heap = self._heap
        while heap:
            timer = heap[0][4]
            if timer is None or not timer.cancelled:
                return
            heapq.heappop(heap)
            self._cancelled -= 1
