"""Node-to-node messages of the messaging layer (tags 64-79).

What an application sends crosses nodes in these: a request rides an anycast to
a member node and its answer comes straight back; a broadcast or an event rides
a multicast; a tunnel is opened by an anycast and then runs between the two
nodes on their link, with the relay's own credit rules end to end. Application
data is ``BULK`` (sent after control traffic, fragmented); credit and the
answers that set a tunnel up are control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from overlay.pastry import Address
from overlay.wire import ADDRESS, PAYLOAD, U32, U64, MessageRegistry, Text

MAX_NAME = 4096
"""Longest cluster or topic name (the relay protocol's limit)."""
MAX_REASON = 4096
"""Longest fault or close reason carried between nodes."""

NAME = Text(MAX_NAME)
REASON = Text(MAX_REASON)


@dataclass(frozen=True, slots=True)
class ClusterRequest:
    """A request for one member of ``cluster`` (an anycast's payload).

    ``seq`` names it at its origin node; ``remaining_ms`` is the time it has left
    when it leaves, so a request that waited 900 ms of 1,000 arrives saying 100.
    """

    BULK: ClassVar[bool] = True

    seq: int
    cluster: str
    data: bytes
    remaining_ms: int


@dataclass(frozen=True, slots=True)
class ClusterReply:
    """The member's answer to request ``seq``, straight back to its origin node."""

    BULK: ClassVar[bool] = True

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ClusterFault:
    """The member reported that request ``seq`` failed, with ``reason``."""

    BULK: ClassVar[bool] = True

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class ClusterBroadcast:
    """A broadcast to every member of ``cluster`` (a multicast's payload)."""

    BULK: ClassVar[bool] = True

    cluster: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TopicEvent:
    """An event for every subscriber of ``topic`` (a multicast's payload)."""

    BULK: ClassVar[bool] = True

    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TunnelOpen:
    """Open a tunnel to one member of ``cluster`` (an anycast's payload)."""

    BULK: ClassVar[bool] = True

    tunnel: int
    cluster: str
    remaining_ms: int


@dataclass(frozen=True, slots=True)
class TunnelAccepted:
    """A member accepted the origin's tunnel ``tunnel``; its node knows it as ``peer``
    and is reached at ``address``."""

    tunnel: int
    peer: int
    address: Address


@dataclass(frozen=True, slots=True)
class TunnelRefused:
    """No member accepted the origin's tunnel ``tunnel`` in time."""

    tunnel: int


@dataclass(frozen=True, slots=True)
class TunnelData:
    """A chunk for the receiver's tunnel end ``tunnel`` (``size_or_cont`` as in the relay)."""

    BULK: ClassVar[bool] = True

    tunnel: int
    size_or_cont: int
    chunk: bytes


@dataclass(frozen=True, slots=True)
class TunnelCredit:
    """The receiver's end of ``tunnel`` can take ``size`` more bytes."""

    tunnel: int
    size: int


@dataclass(frozen=True, slots=True)
class TunnelEnded:
    """The sender's end closed (``reason`` empty: orderly); after all its data."""

    BULK: ClassVar[bool] = True

    tunnel: int
    reason: str


def register(registry: MessageRegistry) -> None:
    """The messaging layer's message types, tags 64-74."""
    registry.register(64, ClusterRequest, U64, NAME, PAYLOAD, U64)
    registry.register(65, ClusterReply, U64, PAYLOAD)
    registry.register(66, ClusterFault, U64, REASON)
    registry.register(67, ClusterBroadcast, NAME, PAYLOAD)
    registry.register(68, TopicEvent, NAME, PAYLOAD)
    registry.register(69, TunnelOpen, U64, NAME, U64)
    registry.register(70, TunnelAccepted, U64, U64, ADDRESS)
    registry.register(71, TunnelRefused, U64)
    registry.register(72, TunnelData, U64, U64, PAYLOAD)
    registry.register(73, TunnelCredit, U64, U32)
    registry.register(74, TunnelEnded, U64, REASON)
