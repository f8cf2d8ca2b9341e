"""What a :class:`~overlay.pastry.core.PastryCore` asks its owner to do, or tells it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from overlay.pastry.messages import Address, Route


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to ``dst_id`` at ``dst_address`` (dialling if need be)."""

    dst_id: int
    dst_address: Address
    message: object


@dataclass(frozen=True, slots=True)
class Deliver:
    """This node is responsible for ``route.key``: hand ``route.message`` to the layer above."""

    route: Route


@dataclass(frozen=True, slots=True)
class Intercept:
    """A ``Route`` with ``intercept`` set passes here on its way from ``src_id`` to
    ``next_hop``: the layer above absorbs it, or continues it with :meth:`PastryCore.forward`."""

    route: Route
    src_id: int
    next_hop: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """A routed message was given up here (observability: the owner may log it)."""

    route: Route
    reason: str


PeerLossReason = Literal["silent", "left"]


@dataclass(frozen=True, slots=True)
class PeerDead:
    """A peer this node relied on is gone (it stopped answering, or said goodbye)."""

    peer_id: int
    reason: PeerLossReason


@dataclass(frozen=True, slots=True)
class LeafSetChanged:
    """The leaf set gained or lost a member, so keys this node is responsible for
    may have moved (at most one per input; Scribe moves tree roots on it)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The node has joined the overlay (emitted once)."""


Effect = Send | Deliver | Intercept | Dropped | PeerDead | LeafSetChanged | Ready
