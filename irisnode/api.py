"""The boundary between the node's messaging semantics and whatever attaches applications.

The relay protocol (``relay/``) is one such attachment: each relay connection is an
:class:`Endpoint`, and it drives the node through :class:`Messaging`. Neither side
sees the other's internals, so the node never learns about bytes on a socket and
the relay never learns about clusters spread over an overlay.

Identifiers: request *handles* and tunnel *offers* are node-wide integers chosen by
the node; an endpoint may show them to its application as they are (they fit the
relay protocol's per-connection id space, which only requires them to be echoed).
Request ids and tunnel ids chosen by the application are opaque to the node and
only handed back to the endpoint that chose them.
"""

from __future__ import annotations

import unicodedata
from typing import Protocol

DEFAULT_CHUNK_LIMIT = 65536
"""Largest tunnel chunk an application may send (the relay protocol's fixed value)."""

TUNNEL_WINDOW = 4 * 1024 * 1024
"""Bytes of tunnel data the node accepts from an application before it must wait."""

TUNNEL_CONFIRM_SECONDS = 3.0
"""How long a service has to accept a tunnel offer before the offer is withdrawn."""


RESERVED_PREFIX = "$"
"""Cluster names the node keeps for itself (see :mod:`irisnode.system`): applications cannot
register them, and a request to one the node does not serve fails at once."""

_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def is_reserved(name: str) -> bool:
    """Whether ``name`` is in the node's namespace: it starts with ``$``, or with a look-alike.

    Look-alikes are characters that read as ``$`` (fullwidth U+FF04, small U+FE69: their
    NFKC form is ``$``), possibly after invisible ones (spaces, controls, zero-width
    characters), so that no application can pose as a node service in a listing.
    """
    for char in name:
        if char == RESERVED_PREFIX:
            return True
        if unicodedata.category(char) not in _INVISIBLE:
            return unicodedata.normalize("NFKC", char).startswith(RESERVED_PREFIX)
    return False


class Endpoint(Protocol):
    """One attached application connection, as the node sees it.

    Every method is a delivery *to* the application. They must not call back into
    :class:`Messaging` synchronously.
    """

    @property
    def congested(self) -> bool:
        """True while the application is not keeping up with what it is sent."""
        ...

    def deliver_request(self, handle: int, request: bytes, timeout_ms: int) -> None:
        """A request for this service member; answer with :meth:`Messaging.reply`."""

    def request_replied(self, request_id: int, reply: bytes) -> None:
        """The endpoint's own request ``request_id`` was answered."""

    def request_faulted(self, request_id: int, fault: str) -> None:
        """The endpoint's own request ``request_id`` failed in the service."""

    def request_timed_out(self, request_id: int) -> None:
        """The endpoint's own request got no answer (deadline, member gone, shutdown)."""

    def deliver_broadcast(self, message: bytes) -> None:
        """A broadcast to this endpoint's cluster."""

    def deliver_event(self, topic: str, event: bytes) -> None:
        """An event published on a topic this endpoint subscribed to."""

    def offer_tunnel(self, offer: int, chunk_limit: int) -> None:
        """Someone opens a tunnel to this service member; accept with ``confirm_tunnel``."""

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

        Raises :class:`~irisnode.limits.LimitExceeded` when the endpoint already has as
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
