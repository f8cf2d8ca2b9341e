"""One reactor timer that follows a pure core's earliest deadline.

Cores expose ``next_deadline()`` and ``on_timer(now)``; the adapter that owns a core
keeps exactly one :class:`DeadlineTimer` for it instead of one reactor call per
pending item, which keeps timers cheap however many requests are in flight.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class DeadlineTimer:
    """Fires ``fire(now)`` at the earliest deadline it was told about.

    ``fire`` returns the core's next deadline (or None), and the timer re-arms itself.
    ``wake(deadline)`` moves the timer earlier when a core gets an earlier deadline;
    a later one is ignored, since the core reports it when the timer fires.
    """

    def __init__(self, clock: IReactorTime, fire: Callable[[float], float | None]) -> None:
        self._clock = clock
        self._fire = fire
        self._call: IDelayedCall | None = None
        self._at = float("inf")

    def wake(self, deadline: float | None) -> None:
        if deadline is None or deadline >= self._at:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._at = deadline
        self._call = self._clock.callLater(max(deadline - self._clock.seconds(), 0.0), self._run)

    def _run(self) -> None:
        self._call = None
        self._at = float("inf")
        self.wake(self._fire(self._clock.seconds()))

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._at = float("inf")
