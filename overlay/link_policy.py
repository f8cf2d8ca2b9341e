"""Pure link policies (docs/wire-link.md §6): which of two links to keep, how long to
wait before re-dialing, and how many inbound handshakes a source may start.

They take ``now`` and an injected ``random.Random``; the adapter owns the clock.
"""

from __future__ import annotations

import random


def keep_new_link(
    local_id: int, peer_id: int, *, existing_initiated_locally: bool, new_initiated_locally: bool
) -> bool:
    """The duplicate-link rule (§6): both ends pick the same survivor without talking.

    Links in opposite directions: keep the one initiated by the lower node id.
    Same direction: keep the newer (its initiator re-dialed, so it lost the old one).
    """
    if existing_initiated_locally == new_initiated_locally:
        return True
    return new_initiated_locally == (local_id < peer_id)


class Backoff:
    """Capped exponential reconnect delays with jitter; reset after a success (§6)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        initial: float = 0.5,
        cap: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
    ) -> None:
        if not (0 < initial <= cap and factor >= 1 and 0 <= jitter < 1):
            raise ValueError("need 0 < initial <= cap, factor >= 1, 0 <= jitter < 1")
        self._rng = rng
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.attempts = 0

    def next_delay(self) -> float:
        """The next wait: ``min(cap, initial * factor**n)`` scaled into ``[1-jitter, 1]``."""
        base = min(self.cap, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempts = 0


class HandshakeLimiter:
    """A token bucket per source address: inbound handshakes cost CPU, so ration them.

    Each source earns ``rate`` handshakes a second up to ``burst`` in hand. Memory
    is bounded: past ``max_sources`` buckets, full ones are forgotten (a full
    bucket is what a new source gets anyway), then the least recently used.
    """

    def __init__(self, rate: float, burst: float, *, max_sources: int = 4096) -> None:
        if not (rate > 0 and burst >= 1 and max_sources > 0):
            raise ValueError("need rate > 0, burst >= 1, max_sources > 0")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, source: str, now: float) -> bool:
        """Take one token for ``source``; False if it has none left."""
        tokens, then = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        allowed = tokens >= 1
        self._buckets[source] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self.max_sources:
            self._forget(now)
        return allowed

    def _forget(self, now: float) -> None:
        full = [
            source
            for source, (tokens, then) in self._buckets.items()
            if tokens + (now - then) * self.rate >= self.burst
        ]
        for source in full:
            del self._buckets[source]
        while len(self._buckets) > self.max_sources:
            del self._buckets[next(iter(self._buckets))]
