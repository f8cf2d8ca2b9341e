"""What a node holds for its applications, and the node-wide budgets that bound it.

``docs/backpressure.md`` lists every limit, its default, its option and what a
client sees when it passes one. The relay's own per-connection limits are
:class:`relay.server.RelayLimits`; the messaging ones are here, in one small
config the node hands to its broker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MIB = 1 << 20

REQUEST_OVERHEAD = 256
"""Bytes a request costs the node beyond its payload (its bookkeeping), for the budget."""


@dataclass(frozen=True, slots=True)
class MessagingLimits:
    """Limits of the messaging semantics (``irisnode.broker``)."""

    max_timeout_ms: int = 600_000
    """Longest request timeout honoured; a longer one is shortened to this."""
    max_subscriptions: int = 1000
    """Topics one connection may subscribe to at once."""
    max_request_bytes: int = 64 * MIB
    """Request bytes held node-wide (parked, delivered but unanswered, arriving) before the
    node stops reading from requesters."""

    def __post_init__(self) -> None:
        for name in ("max_timeout_ms", "max_subscriptions", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")


class LimitExceeded(Exception):
    """An endpoint asked for more than a limit allows; the text says which limit, for the client."""


class ByteBudget:
    """Bytes the node may hold for one purpose, node-wide, shared fairly among their holders.

    Holders (connections, as the endpoints that hold requests) take and give bytes.
    Taking always succeeds, since the bytes are already in memory: a budget is
    bookkeeping. Whether a holder may take more is :meth:`fits`; one that may not
    stops taking (typically by no longer reading its socket) and waits (:meth:`wait`).

    Fair shares: once the budget is spent, a holder still below its share (the limit
    divided among the holders) may take up to that share from an overdraft of one more
    budget. So one client holding the whole budget (with requests that wait a long
    time, say) does not stop everybody else, and all holders together never hold more
    than twice the limit.
    """

    __slots__ = ("_held", "_waiters", "limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a budget must be positive")
        self.limit = limit
        self.used = 0
        self._held: dict[object, int] = {}
        self._waiters: dict[Callable[[], None], tuple[int, object]] = {}

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    @property
    def holders(self) -> int:
        return len(self._held)

    def held(self, holder: object) -> int:
        return self._held.get(holder, 0)

    def fits(self, size: int, holder: object) -> bool:
        """May ``holder`` hold ``size`` more? A holder alone below the limit may take one more
        item however large (a packet may be larger than the whole budget)."""
        held = self._held.get(holder, 0)
        used = self.used
        if used + size <= self.limit or (used == held and held < self.limit):
            return True
        holders = len(self._held) + (0 if held else 1)
        return held + size <= self.limit // holders and used + size <= 2 * self.limit

    def take(self, size: int, holder: object) -> None:
        self.used += size
        self._held[holder] = self._held.get(holder, 0) + size

    def give(self, size: int, holder: object) -> None:
        if not size:
            return
        self.used -= size
        left = self._held[holder] - size
        if left:
            self._held[holder] = left
        else:
            del self._held[holder]
        if self._waiters:
            for waiter, (need, waiting) in list(self._waiters.items()):
                if self.fits(need, waiting):
                    del self._waiters[waiter]
                    waiter()

    def wait(self, waiter: Callable[[], None], size: int, holder: object) -> None:
        """Call ``waiter()`` once ``holder`` may take ``size`` more (at once if it may)."""
        if self.fits(size, holder):
            waiter()
        else:
            self._waiters[waiter] = (size, holder)

    def cancel(self, waiter: Callable[[], None]) -> None:
        self._waiters.pop(waiter, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
