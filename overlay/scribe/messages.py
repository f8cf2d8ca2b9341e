"""Scribe's messages between nodes (tags 32-41).

Tree upkeep (subscribe, acknowledge, redirect, unsubscribe, beats) is control
traffic; :class:`Multicast` and :class:`Anycast` carry application data
(``BULK``), which links send after control traffic and fragment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from overlay.pastry import Address
from overlay.wire import (
    ADDRESS,
    BOOL,
    FLOAT,
    ID,
    U8,
    U32,
    U64,
    ListOf,
    MessageRegistry,
    Struct,
)

BEAT_ENTRIES = 512
"""Groups per beat message; a node pair sharing more groups sends several."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """The sender wants to be a child in ``group``'s tree.

    Routed towards the group key with ``intercept`` (the first node on the way
    that takes it becomes the parent), or sent straight to a node after a
    :class:`Redirect`. ``capacity`` is the sender's subtree capacity, so a new
    member is eligible for anycasts as soon as its parent has it.
    """

    group: int
    address: Address
    capacity: float
    members: int
    """Member nodes in the sender's subtree (itself included, if it has members)."""


@dataclass(frozen=True, slots=True)
class SubscribeAck:
    """The sender is now the receiver's parent in ``group``, at tree depth ``depth``."""

    group: int
    address: Address
    depth: int


@dataclass(frozen=True, slots=True)
class Redirect:
    """The sender has too many children in ``group``: subscribe to ``to_id`` instead."""

    group: int
    to_id: int
    to_address: Address


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """The tree edge between sender and receiver in ``group`` ends (either direction)."""

    group: int


@dataclass(frozen=True, slots=True)
class ParentBeat:
    """Parent to child, every beat: per group (key, parent's depth, capacity and
    member nodes outside the child's subtree). Also the child's evidence that its
    parent is alive."""

    address: Address
    entries: tuple[tuple[int, int, float, int], ...]


@dataclass(frozen=True, slots=True)
class ChildBeat:
    """Child to parent, every beat: per group (key, capacity and member nodes of the
    child's subtree)."""

    address: Address
    entries: tuple[tuple[int, float, int], ...]


@dataclass(frozen=True, slots=True)
class Multicast:
    """One message to every member node of ``group``: routed to the root, then down.

    ``(origin, incarnation, seq)`` names it: ``seq`` grows with every multicast the
    origin sends, so each node delivers it once whatever paths it takes.
    """

    BULK: ClassVar[bool] = True

    group: int
    origin: int
    incarnation: int
    seq: int
    payload: object


@dataclass(frozen=True, slots=True)
class Anycast:
    """One message to one member node of ``group``, chosen by capacity.

    Routed towards the group key until a tree node takes it, then walked along
    tree edges; ``down`` is set once it goes from a parent to a child (it then
    stays in that subtree). ``tag`` names it at its origin (for a failure).
    """

    BULK: ClassVar[bool] = True

    group: int
    origin: int
    origin_address: Address
    tag: int
    down: bool
    payload: object


@dataclass(frozen=True, slots=True)
class AnycastFailure:
    """To an anycast's origin: no member node could be found for ``tag``."""

    group: int
    tag: int


def register(registry: MessageRegistry) -> None:
    """Scribe's message types, tags 32-41."""
    payload = registry.message_field()
    registry.register(32, Subscribe, ID, ADDRESS, FLOAT, U32)
    registry.register(33, SubscribeAck, ID, ADDRESS, U8)
    registry.register(34, Redirect, ID, ID, ADDRESS)
    registry.register(35, Unsubscribe, ID)
    registry.register(36, ParentBeat, ADDRESS, ListOf(Struct(ID, U8, FLOAT, U32), BEAT_ENTRIES))
    registry.register(37, ChildBeat, ADDRESS, ListOf(Struct(ID, FLOAT, U32), BEAT_ENTRIES))
    registry.register(38, Multicast, ID, ID, U32, U64, payload)
    registry.register(39, Anycast, ID, ID, ADDRESS, U64, BOOL, payload)
    registry.register(40, AnycastFailure, ID, U64)
