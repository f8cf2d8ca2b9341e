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
    """Bytes the node may hold for one purpose, node-wide; whoever finds no room waits.

    Taking always succeeds (the bytes are already in memory): a budget is bookkeeping,
    and a holder that finds no room stops taking more, typically by no longer reading
    a socket, and calls :meth:`wait`. As bytes are given back, waiters are called,
    oldest first, as soon as what each needs fits; each then tries again.
    """

    __slots__ = ("_waiters", "limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a budget must be positive")
        self.limit = limit
        self.used = 0
        self._waiters: dict[Callable[[], None], int] = {}

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    def fits(self, size: int, held: int = 0) -> bool:
        """Could a holder of ``held`` bytes hold ``size`` in all? Always, if it would be alone."""
        return self.used - held + size <= self.limit or self.used == held

    def take(self, size: int) -> None:
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        if self._waiters and self.used < self.limit:
            for waiter, need in list(self._waiters.items()):
                if self.fits(need):
                    del self._waiters[waiter]
                    waiter()

    def wait(self, waiter: Callable[[], None], size: int = 1) -> None:
        """Call ``waiter()`` once ``size`` bytes fit (at once if they do)."""
        if self.fits(size):
            waiter()
        else:
            self._waiters[waiter] = size

    def cancel(self, waiter: Callable[[], None]) -> None:
        self._waiters.pop(waiter, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
