"""Pastry's messages between nodes, and how they travel (tags 1-15).

Also here: :func:`is_bulk`, the one rule that tells links which messages are
application data (sent after control traffic, fragmented) and which are control
(heartbeats, routing, tree upkeep), so a large transfer never delays a heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from overlay.ids import ID_BYTES, ID_DIGITS
from overlay.wire import (
    ADDRESS,
    BOOL,
    ID,
    MAX_ADDRESS,
    MAX_ARRAY,
    U8,
    U32,
    Field,
    MessageRegistry,
    UInt,
    WireError,
)

Address = bytes
"""Where a peer can be reached; opaque to the core (the link layer's business)."""


class NodeRef(NamedTuple):
    node_id: int
    address: Address


def is_bulk(message: object) -> bool:
    """True for messages that carry application data: a class says so with ``BULK = True``."""
    if type(message) is Route:
        message = message.message
    return getattr(message, "BULK", False) is True


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """I am alive and my leaf set is at ``leaf_version``.

    ``watching``: the sender keeps the receiver in its state and will keep sending
    heartbeats; False from a node that just dropped the receiver ("unwatch").
    ``want_reply``: answer at once (a ping).
    """

    address: Address
    leaf_version: int
    watching: bool
    want_reply: bool


@dataclass(frozen=True, slots=True)
class Join:
    """Routed towards ``joiner_id``; every node on the path answers the joiner."""

    joiner_id: int
    joiner_address: Address
    hops: int


@dataclass(frozen=True, slots=True)
class JoinReply:
    """A path node's routing-table rows (and, if ``final``, its leaf set): hints."""

    address: Address
    refs: tuple[NodeRef, ...]
    final: bool


@dataclass(frozen=True, slots=True)
class LeafSetRequest:
    address: Address


@dataclass(frozen=True, slots=True)
class LeafSetReply:
    address: Address
    leaf_version: int
    refs: tuple[NodeRef, ...]


@dataclass(frozen=True, slots=True)
class RowRequest:
    address: Address
    row: int


@dataclass(frozen=True, slots=True)
class RowReply:
    address: Address
    row: int
    refs: tuple[NodeRef, ...]


@dataclass(frozen=True, slots=True)
class Leave:
    """The sender is leaving for good; ``refs`` (its leaf set) repair the gap at once."""

    refs: tuple[NodeRef, ...]


@dataclass(frozen=True, slots=True)
class Route:
    """An application message on its way to the node responsible for ``key``.

    ``intercept`` asks every intermediate node to hand the message to its upper
    layer (:class:`Intercept`) instead of forwarding it, which is how Scribe builds
    trees along routes.
    """

    key: int
    origin_id: int
    origin_address: Address
    hops: int
    intercept: bool
    message: object
    """A registered message for the layer above (Scribe, lookups, messaging)."""

    @property
    def bulk(self) -> bool:
        """Does it carry application data (see :func:`is_bulk`)?"""
        return is_bulk(self.message)


PastryMessage = (
    Heartbeat
    | Join
    | JoinReply
    | LeafSetRequest
    | LeafSetReply
    | RowRequest
    | RowReply
    | Leave
    | Route
)


class Refs(Field):
    """A list of (id, address) pairs."""

    def __init__(self, max_items: int = MAX_ARRAY) -> None:
        self.max_items = max_items

    def encode(self, value: tuple[NodeRef, ...]) -> object:
        return [[node_id.to_bytes(ID_BYTES, "big"), address] for node_id, address in value]

    def decode(self, raw: object) -> tuple[NodeRef, ...]:
        if type(raw) is not list or len(raw) > self.max_items:
            raise WireError(f"expected a list of at most {self.max_items} node refs")
        refs = []
        for item in raw:
            if type(item) is not list or len(item) != 2:
                raise WireError("a node ref is [id, address]")
            node_id, address = item
            if type(node_id) is not bytes or len(node_id) != ID_BYTES:
                raise WireError(f"an id is {ID_BYTES} bytes")
            if type(address) is not bytes or len(address) > MAX_ADDRESS:
                raise WireError(f"an address is at most {MAX_ADDRESS} bytes")
            refs.append(NodeRef(int.from_bytes(node_id, "big"), address))
        return tuple(refs)


REFS = Refs()


def register(registry: MessageRegistry) -> None:
    """Pastry's message types, tags 1-9."""
    registry.register(1, Heartbeat, ADDRESS, U32, BOOL, BOOL)
    registry.register(2, Join, ID, ADDRESS, U8)
    registry.register(3, JoinReply, ADDRESS, REFS, BOOL)
    registry.register(4, LeafSetRequest, ADDRESS)
    registry.register(5, LeafSetReply, ADDRESS, U32, REFS)
    registry.register(6, RowRequest, ADDRESS, UInt(ID_DIGITS - 1))
    registry.register(7, RowReply, ADDRESS, UInt(ID_DIGITS - 1), REFS)
    registry.register(8, Leave, REFS)
    registry.register(9, Route, ID, ID, ADDRESS, U8, BOOL, registry.message_field())
