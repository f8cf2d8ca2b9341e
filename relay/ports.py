"""The port between the relay and whatever serves its applications (the node).

The relay drives the node through :class:`Messaging`; the node delivers to each
relay connection through the roles it plays (:class:`Requester`, :class:`Member`,
:class:`Subscriber`, :class:`TunnelParty`; a relay session is all of them, an
:class:`Endpoint`). The relay knows nothing else of the node, and the node
nothing of bytes on a socket: the composition root (``irisnode/node.py``) is the
only place that knows both.

Identifiers: request *handles* and tunnel *offers* are node-wide integers chosen by
the node; an endpoint may show them to its application as they are (they fit the
relay protocol's per-connection id space, which only requires them to be echoed).
Request ids and tunnel ids chosen by the application are opaque to the node and
only handed back to the endpoint that chose them.

Also here, because both sides use them: :class:`LimitExceeded` (a client asked for
more than a limit allows) and :class:`ByteBudget` (node-wide byte budgets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

DEFAULT_CHUNK_LIMIT = 65536
"""Largest tunnel chunk an application may send (the relay protocol's fixed value)."""


class Requester(Protocol):
    """An application connection as the origin of requests: it hears each one's outcome."""

    def request_replied(self, request_id: int, reply: bytes) -> None:
        """The endpoint's own request ``request_id`` was answered."""

    def request_faulted(self, request_id: int, fault: str) -> None:
        """The endpoint's own request ``request_id`` failed in the service."""

    def request_timed_out(self, request_id: int) -> None:
        """The endpoint's own request got no answer (deadline, member gone, shutdown)."""


class Member(Protocol):
    """An application connection as a member of a cluster: it is given work."""

    @property
    def congested(self) -> bool:
        """True while the application is not keeping up with what it is sent."""
        ...

    def deliver_request(self, handle: int, request: bytes, timeout_ms: int) -> None:
        """A request for this service member; answer with :meth:`Messaging.reply`."""

    def deliver_broadcast(self, message: bytes) -> None:
        """A broadcast to this endpoint's cluster."""

    def offer_tunnel(self, offer: int, chunk_limit: int) -> None:
        """Someone opens a tunnel to this service member; accept with ``confirm_tunnel``."""


class Subscriber(Protocol):
    """An application connection as a subscriber of topics."""

    def deliver_event(self, topic: str, event: bytes) -> None:
        """An event published on a topic this endpoint subscribed to."""


class TunnelParty(Protocol):
    """An application connection as one end of tunnels."""

    @property
    def congested(self) -> bool:
        """True while the application is not keeping up with what it is sent."""
        ...

    def tunnel_opened(self, tunnel_id: int, tunnel: TunnelEnd, chunk_limit: int) -> None:
        """The endpoint's own tunnel ``tunnel_id`` is connected to a member."""

    def tunnel_failed(self, tunnel_id: int) -> None:
        """The endpoint's own tunnel could not be built (no member, or none accepted)."""

    def tunnel_transfer(self, tunnel_id: int, size_or_cont: int, chunk: bytes) -> None:
        """A chunk of tunnel data; ``size_or_cont`` is the message size on a first chunk."""

    def tunnel_allow(self, tunnel_id: int, size: int) -> None:
        """The node accepts ``size`` more bytes from the application on this tunnel."""

    def tunnel_closed(self, tunnel_id: int, reason: str) -> None:
        """The tunnel is gone; an empty reason means an orderly close."""


Party = Requester | Member | Subscriber | TunnelParty
"""Anything attached to the node: an endpoint in one or more of its roles."""


class Endpoint(Requester, Member, Subscriber, TunnelParty, Protocol):
    """One attached application connection in every role (a relay session).

    Every method is a delivery *to* the application. They must not call back into
    :class:`Messaging` synchronously. Parts of the node that stand in for an
    application in one role only implement that role.
    """


class TunnelEnd(Protocol):
    """An endpoint's handle on one tunnel: what its application does to the tunnel."""

    def transfer(self, size_or_cont: int, chunk: bytes) -> None:
        """Data from the application (within the allowance the node granted)."""

    def allow(self, size: int) -> None:
        """The application can take ``size`` more bytes."""

    def close(self, reason: str = "") -> None:
        """Close the tunnel from this side, acknowledged with ``tunnel_closed``.

        The far side learns ``reason`` after it has received what was already sent;
        an empty reason is an orderly close, anything else says why it failed.
        """

    def resume(self) -> None:
        """The endpoint stopped being congested: data held back for it may flow again."""


class Messaging(Protocol):
    """What an endpoint can ask of the node. ``now`` is seconds on the node's clock."""

    def attach(self, endpoint: Endpoint, cluster: str) -> None:
        """Attach an endpoint; a non-empty ``cluster`` makes it a member of that cluster."""

    def detach(self, endpoint: Endpoint, reason: str) -> None:
        """The endpoint is gone; ``reason`` is empty for an orderly close."""

    def request(
        self,
        origin: Endpoint,
        request_id: int,
        cluster: str,
        request: bytes,
        timeout_ms: int,
        now: float,
    ) -> None:
        """Send a request to one member; exactly one outcome comes back to ``origin``."""

    def reply(self, member: Endpoint, handle: int, reply: bytes) -> None:
        """A member answers a delivered request."""

    def fault(self, member: Endpoint, handle: int, fault: str) -> None:
        """A member reports that a delivered request failed."""

    def broadcast(self, cluster: str, message: bytes) -> None:
        """Deliver ``message`` once to every member of ``cluster``."""

    def subscribe(self, endpoint: Endpoint, topic: str) -> None:
        """Deliver events of ``topic`` to ``endpoint`` (subscribing twice is harmless).

        Raises :class:`LimitExceeded` when the endpoint already has as
        many subscriptions as it may.
        """

    def unsubscribe(self, endpoint: Endpoint, topic: str) -> bool:
        """Stop delivering ``topic``; False if the endpoint was not subscribed."""

    def publish(self, topic: str, event: bytes) -> None:
        """Deliver ``event`` once to every subscriber of ``topic``."""

    def open_tunnel(
        self, origin: Endpoint, tunnel_id: int, cluster: str, timeout_ms: int, now: float
    ) -> None:
        """Build a tunnel to one member; ``tunnel_opened`` or ``tunnel_failed`` follows."""

    def cancel_tunnel(self, origin: Endpoint, tunnel_id: int) -> None:
        """The origin gives up a tunnel it is still building: no outcome follows."""

    def confirm_tunnel(self, member: Endpoint, offer: int, tunnel_id: int) -> TunnelEnd | None:
        """A member accepts a tunnel offer; None if the offer is unknown or expired."""

    def caught_up(self, endpoint: Endpoint) -> None:
        """The endpoint is no longer congested: work held back for it may go now."""


class LimitExceeded(Exception):
    """An endpoint asked for more than a limit allows; the text says which limit, for the client."""


class ByteBudget:
    """Bytes the node may hold for one purpose, node-wide, shared fairly among their holders.

    Holders (connections, as the endpoints that hold requests) take and give bytes.
    Taking always succeeds, since the bytes are already in memory: a budget is
    bookkeeping. Whether a holder may take more is :meth:`fits`; one that may not
    stops taking (typically by no longer reading its socket) and waits (:meth:`wait`).

    Fair shares: once the budget is spent, a holder still below its share (the limit
    divided among the holders) may take up to that share from an overdraft of one more
    budget. So one client holding the whole budget (with requests that wait a long
    time, say) does not stop everybody else, and all holders together never hold more
    than twice the limit.
    """

    __slots__ = ("_held", "_waiters", "limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a budget must be positive")
        self.limit = limit
        self.used = 0
        self._held: dict[object, int] = {}
        self._waiters: dict[Callable[[], None], tuple[int, object]] = {}

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    @property
    def holders(self) -> int:
        return len(self._held)

    def held(self, holder: object) -> int:
        return self._held.get(holder, 0)

    def fits(self, size: int, holder: object) -> bool:
        """May ``holder`` hold ``size`` more? A holder alone below the limit may take one more
        item however large (a packet may be larger than the whole budget)."""
        held = self._held.get(holder, 0)
        used = self.used
        if used + size <= self.limit or (used == held and held < self.limit):
            return True
        holders = len(self._held) + (0 if held else 1)
        return held + size <= self.limit // holders and used + size <= 2 * self.limit

    def take(self, size: int, holder: object) -> None:
        self.used += size
        self._held[holder] = self._held.get(holder, 0) + size

    def give(self, size: int, holder: object) -> None:
        if not size:
            return
        self.used -= size
        left = self._held[holder] - size
        if left:
            self._held[holder] = left
        else:
            del self._held[holder]
        if self._waiters:
            for waiter, (need, waiting) in list(self._waiters.items()):
                if self.fits(need, waiting):
                    del self._waiters[waiter]
                    waiter()

    def wait(self, waiter: Callable[[], None], size: int, holder: object) -> None:
        """Call ``waiter()`` once ``holder`` may take ``size`` more (at once if it may)."""
        if self.fits(size, holder):
            waiter()
        else:
            self._waiters[waiter] = (size, holder)

    def cancel(self, waiter: Callable[[], None]) -> None:
        self._waiters.pop(waiter, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
