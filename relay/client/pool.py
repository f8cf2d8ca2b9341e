"""Admission control for inbound work (spec 11.8), without I/O.

A service that is slower than its callers must not queue without bound: at most
``handlers`` callbacks of one kind run at once, and at most ``memory`` payload
bytes wait for a free slot. Anything beyond that is dropped and counted (for a
request that means no reply, so the requester times out, exactly as with the
Go binding).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

DEFAULT_HANDLERS = 16
DEFAULT_MEMORY = 64 * 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    """How many handlers of one kind may run at once, and how many payload bytes may wait."""

    handlers: int = DEFAULT_HANDLERS
    memory: int = DEFAULT_MEMORY

    def __post_init__(self) -> None:
        if self.handlers < 1:
            raise ValueError(f"handlers must be at least 1, got {self.handlers}")
        if self.memory < 0:
            raise ValueError(f"memory must not be negative, got {self.memory}")


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """Separate limits for a service's request and broadcast handlers."""

    requests: Limits = Limits()
    broadcasts: Limits = Limits()


@dataclass(frozen=True, slots=True)
class _Item(Generic[T]):
    item: T
    size: int
    expires: float | None


class HandlerQueue(Generic[T]):
    """Bounded waiting room in front of at most ``limits.handlers`` running handlers.

    Starts paused when ``paused`` (a service holds its work back until ``init``
    has returned).
    """

    def __init__(self, limits: Limits, *, paused: bool = False) -> None:
        self.limits = limits
        self.paused = paused
        self.running = 0
        self.queued_bytes = 0
        self.dropped = 0
        """Items refused because the waiting room was full."""
        self.expired = 0
        """Items that waited past their expiry and were never run."""
        self._queue: deque[_Item[T]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, item: T, size: int, expires: float | None = None) -> bool:
        """Queue ``item`` (``size`` payload bytes) unless that overflows the memory limit."""
        if self.queued_bytes + size > self.limits.memory:
            self.dropped += 1
            return False
        self.queued_bytes += size
        self._queue.append(_Item(item, size, expires))
        return True

    def next(self, now: float) -> T | None:
        """The next item to run now, if a handler slot is free; counts it as running."""
        if self.paused:
            return None
        while self._queue and self.running < self.limits.handlers:
            entry = self._queue.popleft()
            self.queued_bytes -= entry.size
            if entry.expires is not None and entry.expires <= now:
                self.expired += 1
                continue
            self.running += 1
            return entry.item
        return None

    def finished(self) -> None:
        """A handler returned (or failed); its slot is free again."""
        if self.running < 1:
            raise RuntimeError("finished() without a running handler")
        self.running -= 1

    def clear(self) -> int:
        """Forget everything still waiting (the connection is gone); returns how many."""
        count = len(self._queue)
        self._queue.clear()
        self.queued_bytes = 0
        return count
