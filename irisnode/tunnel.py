"""A tunnel between two endpoints on this node: ordered chunks with byte credit both ways.

Each direction follows the relay protocol's accounting (spec §9.4): the node grants
the sending application a window of :data:`TUNNEL_WINDOW` bytes and grants bytes
back only once they have left the node towards the receiver; the receiving
application grants the node credit for what it can buffer. A chunk that starts a
message waits until the receiver's credit covers it; continuation chunks are
forced through, so a message larger than the whole window cannot deadlock and
credit may go negative. A congested receiver holds everything back.

So the memory a tunnel can pin in the node is bounded by the sender's window,
whatever the two applications do.
"""

from __future__ import annotations

from collections import deque

from irisnode.api import TUNNEL_WINDOW
from relay.ports import TunnelParty


class TunnelHalf:
    """One endpoint's side of a tunnel: what it sends goes to ``peer``'s endpoint.

    Implements :class:`irisnode.api.TunnelEnd` for its endpoint. ``outbox`` holds
    chunks on their way *to* this half's endpoint.
    """

    __slots__ = (
        "closed",
        "credit",
        "endpoint",
        "left",
        "outbox",
        "peer",
        "peer_closed",
        "peer_reason",
        "strict",
        "tunnel_id",
        "window",
    )

    def __init__(self, endpoint: TunnelParty, tunnel_id: int, window: int = TUNNEL_WINDOW) -> None:
        self.endpoint = endpoint
        self.tunnel_id = tunnel_id
        self.peer: TunnelHalf = self
        self.outbox: deque[tuple[int, bytes]] = deque()
        self.credit = 0  # bytes the endpoint's application said it can take
        self.left = 0  # bytes still missing from the message being delivered
        self.window = window  # bytes the endpoint's application may still send
        self.strict: bool = getattr(endpoint, "strict_credit", False)
        """No forced continuations: the endpoint is another node's buffer, not an
        application that must see a whole message (see RemoteParty)."""
        self.closed = False
        self.peer_closed = False
        self.peer_reason = ""

    # -- what the endpoint's application does (TunnelEnd) ---------------------------

    def transfer(self, size_or_cont: int, chunk: bytes) -> None:
        if self.closed:
            return
        self.window -= len(chunk)
        if self.window < 0:
            self.close("tunnel allowance exceeded")
            return
        peer = self.peer
        if peer.closed:
            # The far side is gone: grant the bytes back so the sender never stalls on
            # a tunnel whose close notice is already on its way.
            self._grant(len(chunk))
            return
        peer.outbox.append((size_or_cont, chunk))
        peer.flush()

    def allow(self, size: int) -> None:
        if self.closed:
            return
        self.credit += size
        self.flush()

    def resume(self) -> None:
        if not self.closed:
            self.flush()

    def close(self, reason: str = "") -> None:
        """Close from this side: acknowledge here, finish delivering to the peer, then tell it."""
        if self.closed:
            return
        self.closed = True
        self.outbox.clear()
        self.endpoint.tunnel_closed(self.tunnel_id, reason)
        peer = self.peer
        if not peer.closed:
            peer.peer_closed = True
            peer.peer_reason = reason
            peer.flush()

    # -- delivery towards this half's endpoint -----------------------------------

    def flush(self) -> None:
        """Deliver queued chunks as far as credit and congestion allow."""
        outbox = self.outbox
        endpoint = self.endpoint
        delivered = 0
        while outbox and not endpoint.congested:
            size_or_cont, chunk = outbox[0]
            length = len(chunk)
            if self.credit < length and (self.strict or (size_or_cont and self.left == 0)):
                break  # a new message waits until the receiver has room for its start
            if size_or_cont:
                self.left = size_or_cont - length
            else:
                self.left = max(self.left - length, 0)
            outbox.popleft()
            self.credit -= length
            delivered += length
            endpoint.tunnel_transfer(self.tunnel_id, size_or_cont, chunk)
        if delivered:
            self.peer._grant(delivered)
        if self.peer_closed and not outbox and not self.closed:
            self.closed = True
            endpoint.tunnel_closed(self.tunnel_id, self.peer_reason)

    def _grant(self, size: int) -> None:
        """Bytes this half's application sent have left the node: let it send as many more."""
        if self.closed:
            return
        self.window += size
        self.endpoint.tunnel_allow(self.tunnel_id, size)


def connect(
    origin: TunnelParty, origin_id: int, member: TunnelParty, member_id: int
) -> tuple[TunnelHalf, TunnelHalf]:
    """Join two endpoints with a fresh tunnel; returns (origin's half, member's half)."""
    near = TunnelHalf(origin, origin_id)
    far = TunnelHalf(member, member_id)
    near.peer = far
    far.peer = near
    return near, far
