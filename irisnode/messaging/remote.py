"""Other nodes, as one endpoint of this node's local broker.

A request that arrives from another node is handed to the local broker as if an
application on this node had sent it, with :class:`RemoteParty` as its origin; a
tunnel between nodes is a local tunnel between an application's endpoint and
:class:`RemoteParty`. Whatever the broker then tells that origin (a reply, a
fault, tunnel data, credit, a close) becomes a node-to-node message to the node
where the real origin lives. So the broker's guarantees (one outcome per request,
the relay's credit rules for tunnels) hold across nodes without a second copy of
them, and the memory a tunnel can pin stays bounded by the same windows.

The messages it makes go into an outbox the messaging core drains.
"""

from __future__ import annotations

from dataclasses import dataclass

from irisnode.messaging.messages import (
    ClusterFault,
    ClusterReply,
    TunnelAccepted,
    TunnelCredit,
    TunnelData,
    TunnelEnded,
    TunnelRefused,
)
from overlay.pastry import Address, Send
from relay.ports import TunnelEnd

MAX_FAULT = 4096
"""Fault texts longer than this are cut before they cross to another node."""


@dataclass(slots=True)
class _Origin:
    """A request from another node, delivered here to a local member."""

    node: int
    address: Address
    seq: int


@dataclass(slots=True)
class _Tunnel:
    """A tunnel end here whose far end is on ``node``, known there as ``peer``."""

    node: int
    address: Address
    peer: int
    end: TunnelEnd | None = None
    """This side's end, once the tunnel is open here."""
    accepted: int | None = None
    """For a tunnel opened from another node: its number there, until it is accepted."""


class RemoteParty:
    """Every other node, as one origin and tunnel party attached to the local broker
    (:class:`relay.ports.Requester` and :class:`relay.ports.TunnelParty`; never a member
    or a subscriber, so it has nothing of theirs)."""

    congested = False
    strict_credit = True
    """Tunnel data goes to another node only within the credit that node granted:
    continuation chunks are not forced through here (the far node forces them to
    its application), so each node buffers at most one window per tunnel."""

    def __init__(self, node_id: int, address: Address, outbox: list[object]) -> None:
        self.node_id = node_id
        self.address = address
        self._outbox = outbox
        self._requests: dict[int, _Origin] = {}
        self._tunnels: dict[int, _Tunnel] = {}
        self._next_id = 0

    # -- what the messaging core registers --------------------------------------------------

    def request_from(self, node: int, address: Address, seq: int) -> int:
        """A request from ``node``: the id under which the broker knows it here."""
        self._next_id += 1
        self._requests[self._next_id] = _Origin(node, address, seq)
        return self._next_id

    def tunnel_from(self, node: int, address: Address, seq: int) -> int:
        """A tunnel being opened from ``node`` (its number there ``seq``): our id for it."""
        self._next_id += 1
        self._tunnels[self._next_id] = _Tunnel(node, address, 0, accepted=seq)
        return self._next_id

    def tunnel_to(
        self, local_id: int, node: int, address: Address, peer: int, end: TunnelEnd
    ) -> None:
        """A tunnel we opened, accepted on ``node`` where it is ``peer``; ``end`` is ours."""
        self._tunnels[local_id] = _Tunnel(node, address, peer, end)

    def tunnels_with(self, node: int) -> list[int]:
        return [t for t, tunnel in self._tunnels.items() if tunnel.node == node]

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    @property
    def open_tunnels(self) -> int:
        return len(self._tunnels)

    # -- what arrives from the far end ----------------------------------------------------

    def data(self, local_id: int, size_or_cont: int, chunk: bytes) -> None:
        tunnel = self._tunnels.get(local_id)
        if tunnel is not None and tunnel.end is not None:
            tunnel.end.transfer(size_or_cont, chunk)

    def credit(self, local_id: int, size: int) -> None:
        tunnel = self._tunnels.get(local_id)
        if tunnel is not None and tunnel.end is not None:
            tunnel.end.allow(size)

    def ended(self, local_id: int, reason: str) -> None:
        """The far end closed: close ours without telling it back."""
        tunnel = self._tunnels.pop(local_id, None)
        if tunnel is not None and tunnel.end is not None:
            tunnel.end.close(reason)

    def link_lost(self, node: int, reason: str) -> None:
        """``node`` is unreachable: its tunnels cannot continue in order, so they close."""
        for local_id in self.tunnels_with(node):
            self.ended(local_id, reason)

    # -- Requester and TunnelParty: what the broker tells the origin -------------------------

    def _send(self, node: int, address: Address, message: object) -> None:
        self._outbox.append(Send(node, address, message))

    def request_replied(self, request_id: int, reply: bytes) -> None:
        origin = self._requests.pop(request_id, None)
        if origin is not None:
            self._send(origin.node, origin.address, ClusterReply(origin.seq, reply))

    def request_faulted(self, request_id: int, fault: str) -> None:
        origin = self._requests.pop(request_id, None)
        if origin is not None:
            text = fault[:MAX_FAULT]
            self._send(origin.node, origin.address, ClusterFault(origin.seq, text))

    def request_timed_out(self, request_id: int) -> None:
        # The origin keeps its own deadline (it has the same one): nothing to send.
        self._requests.pop(request_id, None)

    def tunnel_opened(self, tunnel_id: int, tunnel: TunnelEnd, chunk_limit: int) -> None:
        entry = self._tunnels.get(tunnel_id)
        if entry is None or entry.accepted is None:
            tunnel.close("tunnel origin gone")
            return
        entry.end = tunnel
        self._send(
            entry.node, entry.address, TunnelAccepted(entry.accepted, tunnel_id, self.address)
        )
        # The far end's number for this tunnel is the one it opened it with.
        entry.peer, entry.accepted = entry.accepted, None

    def tunnel_failed(self, tunnel_id: int) -> None:
        entry = self._tunnels.pop(tunnel_id, None)
        if entry is not None and entry.accepted is not None:
            self._send(entry.node, entry.address, TunnelRefused(entry.accepted))

    def tunnel_transfer(self, tunnel_id: int, size_or_cont: int, chunk: bytes) -> None:
        entry = self._tunnels.get(tunnel_id)
        if entry is not None:
            self._send(entry.node, entry.address, TunnelData(entry.peer, size_or_cont, chunk))

    def tunnel_allow(self, tunnel_id: int, size: int) -> None:
        entry = self._tunnels.get(tunnel_id)
        if entry is not None:
            self._send(entry.node, entry.address, TunnelCredit(entry.peer, size))

    def tunnel_closed(self, tunnel_id: int, reason: str) -> None:
        entry = self._tunnels.pop(tunnel_id, None)
        if entry is not None:
            self._send(entry.node, entry.address, TunnelEnded(entry.peer, reason))
