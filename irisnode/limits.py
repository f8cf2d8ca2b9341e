"""What a node holds for its applications, and the node-wide budgets that bound it.

``docs/backpressure.md`` lists every limit, its default, its option and what a
client sees when it passes one. The relay's own per-connection limits are
:class:`relay.server.RelayLimits`; the messaging ones are here, in one small
config the node hands to its broker.
"""

from __future__ import annotations

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
