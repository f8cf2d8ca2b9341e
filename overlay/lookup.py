"""Which node is responsible for a key: a probe routed to it, and its answer.

What ``irisnode lookup`` and the LAN tests use to check routing. The probe
(:class:`Lookup`) is routed to the key like any message; the node it reaches
routes its id back to the origin's own id (:class:`Found`), which only the origin
is responsible for. Both are registered messages (tags 16-17), so a malformed
answer is a :class:`~overlay.wire.WireError` like any other, never an exception
inside the link's ``dataReceived``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from overlay.pastry import Deliver
from overlay.stack import RouteTo, Upcall
from overlay.wire import ID, U64, MessageRegistry


@dataclass(frozen=True, slots=True)
class Lookup:
    """Routed to a key: "who are you?"; ``nonce`` names the question at its origin."""

    nonce: int


@dataclass(frozen=True, slots=True)
class Found:
    """Routed back to the origin of a :class:`Lookup`: ``owner`` received it."""

    nonce: int
    owner: int


@dataclass(frozen=True, slots=True)
class LookupAnswered:
    """Effect: the lookup ``nonce`` started here ended at node ``owner``."""

    nonce: int
    owner: int


def register(registry: MessageRegistry) -> None:
    registry.register(16, Lookup, U64)
    registry.register(17, Found, U64, ID)


class LookupCore:
    """The lookup layer of one node (an :class:`~overlay.stack.UpperLayer`)."""

    messages = (Lookup, Found)
    consumes = ()

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self._next_nonce = 0

    def lookup(self, key: int) -> tuple[int, list[object]]:
        """Start a lookup of ``key``: its nonce, and the effects that send it."""
        self._next_nonce = (self._next_nonce + 1) & 0xFFFFFFFFFFFFFFFF
        return self._next_nonce, [RouteTo(key, Lookup(self._next_nonce))]

    def upcall(self, event: Upcall, now: float) -> Sequence[object]:
        if type(event) is Deliver:
            message = event.route.message
            if type(message) is Lookup:
                if event.route.origin_id == self.node_id:
                    return [LookupAnswered(message.nonce, self.node_id)]
                return [RouteTo(event.route.origin_id, Found(message.nonce, self.node_id))]
            if type(message) is Found and event.route.key == self.node_id:
                return [LookupAnswered(message.nonce, message.owner)]
        return ()

    def consume(self, effect: object, now: float) -> Sequence[object]:
        return ()

    def on_timer(self, now: float) -> Sequence[object]:
        return ()

    def next_deadline(self) -> float | None:
        return None
