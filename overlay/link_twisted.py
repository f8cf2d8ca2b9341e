"""Twisted shell around :class:`overlay.link.LinkCore` (docs/wire-link.md §5).

* :class:`Link` is the ``Protocol`` of one TCP connection, dialer or listener
  side. It feeds the core, owns one timer (the handshake deadline), writes what
  the core says, and is a streaming producer for its transport so a slow peer
  pauses the sender instead of growing a buffer without bound.
* :class:`LinkService` is what a node holds: its credentials, a listening
  factory, persistent dial loops (:class:`Dialer`, jittered backoff), the
  duplicate-link rule, and one :class:`LinkHandler` that hears about links and
  frames. Every failure is logged with its specific ``reason`` and closes that
  one connection.

The reactor and clock are constructor arguments; nothing here imports the
global reactor.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IConsumer,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from overlay.identity import Certificate, Credentials, Entropy
from overlay.link import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_FRAME,
    Backoff,
    Effect,
    Established,
    Failed,
    LinkCore,
    LinkStateError,
    Reason,
    Received,
    Role,
    Transmit,
    keep_new_link,
)

DEFAULT_MAX_PAUSED_BYTES = 16 * 1024 * 1024
"""Bytes a link accepts while its transport is paused before it gives up on the peer."""

_log = Logger(namespace="overlay.link")


class LinkHandler(TypingProtocol):
    """What the node above the links implements (e.g. the Pastry integration).

    ``link_established`` is called when a link becomes *the* link to its peer,
    which may replace an earlier one (the replaced link is closed without a
    ``link_lost``). ``link_lost`` is called when a peer's current link goes away.
    ``frame_received`` may come from any authenticated link, including a
    duplicate in its last moments; key on ``link.peer_node_id``.
    """

    def link_established(self, link: Link) -> None: ...

    def frame_received(self, link: Link, data: bytes) -> None: ...

    def link_lost(self, link: Link, reason: str) -> None: ...


def describe_address(address: IAddress | None) -> str:
    """``host:port`` (``[v6]:port``) for logs, with IPv4-mapped IPv6 shown as plain IPv4."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return "unknown"
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_node_id(node_id: int | None) -> str:
    return "-" if node_id is None else f"{node_id:032x}"


@implementer(IPushProducer)
class Link(Protocol):
    """One authenticated, encrypted connection to one peer."""

    def __init__(
        self,
        service: LinkService,
        role: Role,
        *,
        expected_peer: int | None = None,
        dialer: Dialer | None = None,
    ) -> None:
        self.service = service
        self.role = role
        self.expected_peer = expected_peer
        self.dialer = dialer
        self.peer: Established | None = None
        self.close_reason: str | None = None
        self.writing_paused = False
        self._core: LinkCore | None = None
        self._timer: IDelayedCall | None = None
        self._paused_bytes = 0
        self._writable: list[Deferred[None]] = []

    # -- what the node uses

    @property
    def established(self) -> bool:
        return self.peer is not None and self.close_reason is None

    @property
    def peer_node_id(self) -> int | None:
        return None if self.peer is None else self.peer.peer_node_id

    @property
    def peer_public_key(self) -> bytes | None:
        return None if self.peer is None else self.peer.peer_public_key

    @property
    def certificate(self) -> Certificate | None:
        return None if self.peer is None else self.peer.certificate

    @property
    def initiated_locally(self) -> bool:
        return self.role is Role.INITIATOR

    @property
    def address(self) -> IAddress | None:
        return None if self.transport is None else self.transport.getPeer()

    def send(self, data: bytes) -> bool:
        """Encrypt and write one frame; False if the link is already closed.

        Raises :class:`LinkStateError` before the link is established or for a
        frame over the size limit (both are the caller's bug). While the peer
        is slow (``writing_paused``) frames are still buffered, up to a bound.
        """
        if self.close_reason is not None:
            return False
        if self._core is None:
            raise LinkStateError("the link has no connection yet")
        wire = self._core.send(data)
        if self.writing_paused:
            self._paused_bytes += len(wire)
            if self._paused_bytes > self.service.max_paused_bytes:
                self._fail(Reason.SEND_BUFFER_OVERFLOW, f"{self._paused_bytes} bytes while paused")
                return False
        assert self.transport is not None
        self.transport.write(wire)
        return True

    def wait_writable(self) -> Deferred[None]:
        """Fires when the transport can take more (at once if it can), or the link closes."""
        if not self.writing_paused or self.close_reason is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._writable.append(waiter)
        return waiter

    def pause_reading(self) -> None:
        """Stop reading from the peer (TCP pushes back on it) until :meth:`resume_reading`."""
        if self.transport is not None and self.close_reason is None:
            IPushProducer(self.transport).pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None and self.close_reason is None:
            IPushProducer(self.transport).resumeProducing()

    def close(self) -> None:
        """Close on purpose: flushes what was sent, then hangs up."""
        self._close(Reason.CLOSED, "", abort=False)

    # -- IPushProducer: the transport tells us when its write buffer is full

    def pauseProducing(self) -> None:
        self.writing_paused = True

    def resumeProducing(self) -> None:
        self.writing_paused = False
        self._paused_bytes = 0
        self._release_writers()

    def stopProducing(self) -> None:
        self._release_writers()

    # -- Protocol

    def connectionMade(self) -> None:
        service = self.service
        now = service.clock.seconds()
        self._core = LinkCore(
            self.role,
            service.credentials,
            service.entropy,
            now,
            max_frame_size=service.max_frame_size,
            handshake_timeout=service.handshake_timeout,
            expected_peer=self.expected_peer,
        )
        assert self.transport is not None
        service._link_started(self)
        IConsumer(self.transport).registerProducer(self, True)
        tcp = ITCPTransport(self.transport, None)
        if tcp is not None:
            tcp.setTcpNoDelay(True)
        self._schedule(now)
        self._apply(self._core.start())

    def dataReceived(self, data: bytes) -> None:
        if self._core is None or self.close_reason is not None:
            return
        self._apply(self._core.receive(data, self.service.clock.seconds()))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        self._release_writers()
        if self.close_reason is None:
            self.close_reason = Reason.CONNECTION_LOST
            _log.info(
                "link lost: {reason} peer={peer_id} address={address} role={role}",
                reason=str(Reason.CONNECTION_LOST),
                peer_id=format_node_id(self.peer_node_id),
                address=describe_address(self.address),
                role=self.role.value,
            )
            self.service._link_closed(self, Reason.CONNECTION_LOST)

    # -- internals

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if self.close_reason is not None:
                return
            if isinstance(effect, Received):
                self.service.handler.frame_received(self, effect.data)
            elif isinstance(effect, Transmit):
                assert self.transport is not None
                self.transport.write(effect.data)
            elif isinstance(effect, Established):
                self._cancel_timer()
                self.peer = effect
                _log.info(
                    "link established: peer={peer_id} address={address} role={role}",
                    peer_id=format_node_id(effect.peer_node_id),
                    address=describe_address(self.address),
                    role=self.role.value,
                )
                self.service._link_established(self)
            elif isinstance(effect, Failed):
                self._fail(effect.reason, effect.detail)

    def _fail(self, reason: Reason, detail: str) -> None:
        self._close(reason, detail, abort=True)

    def _close(self, reason: Reason, detail: str, *, abort: bool) -> None:
        """Hang up (never telling the peer why), log the reason, tell the service once."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._cancel_timer()
        # Closing on purpose and the duplicate-link rule are routine, not failures.
        routine = reason in (Reason.CLOSED, Reason.DUPLICATE_LINK)
        log = _log.debug if routine else _log.warn
        log(
            "link {outcome}: {reason} ({detail}) peer={peer_id} address={address} role={role}",
            outcome="closed" if routine else "failed",
            reason=str(reason),
            detail=detail,
            peer_id=format_node_id(self.peer_node_id),
            address=describe_address(self.address),
            role=self.role.value,
        )
        if self.transport is not None:
            tcp = ITCPTransport(self.transport, None)
            if abort and tcp is not None:
                tcp.abortConnection()
            else:
                self.transport.loseConnection()
        self._release_writers()
        self.service._link_closed(self, reason)

    def _schedule(self, now: float) -> None:
        assert self._core is not None
        deadline = self._core.next_deadline()
        if deadline is not None:
            self._timer = self.service.clock.callLater(max(0.0, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._core is None or self.close_reason is not None:
            return
        now = self.service.clock.seconds()
        self._apply(self._core.on_timer(now))
        if self.close_reason is None and self._timer is None:
            self._schedule(now)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _release_writers(self) -> None:
        waiters, self._writable = self._writable, []
        for waiter in waiters:
            waiter.callback(None)


class _ListeningFactory(ServerFactory):
    noisy = False

    def __init__(self, service: LinkService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> Link:
        return Link(self.service, Role.RESPONDER)


class _DialingFactory(ClientFactory):
    noisy = False

    def __init__(self, dialer: Dialer) -> None:
        self.dialer = dialer

    def buildProtocol(self, addr: IAddress | None) -> Link:
        dialer = self.dialer
        link = Link(
            dialer.service, Role.INITIATOR, expected_peer=dialer.expected_peer, dialer=dialer
        )
        dialer.link = link
        return link

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.dialer._connection_failed(reason)


class Dialer:
    """Keeps a link to one address: dial, and re-dial with jittered backoff (§5).

    After a link that lost the duplicate rule, it waits until the peer has no
    link at all, then dials again.
    """

    def __init__(self, service: LinkService, host: str, port: int, expected_peer: int | None):
        self.service = service
        self.host = host
        self.port = port
        self.expected_peer = expected_peer
        self.link: Link | None = None
        self.parked_on: int | None = None
        self.stopped = False
        self.last_failure: str | None = None
        """Why the last attempt failed (None once linked): what ``irisnode status`` shows."""
        self.backoff = Backoff(
            service.rng, initial=service.backoff_initial, cap=service.backoff_cap
        )
        self._timer: IDelayedCall | None = None
        self._connector: IConnector | None = None

    def start(self) -> None:
        self._dial()

    def stop(self) -> None:
        """Stop re-dialing; an established link stays up (close it separately if wanted)."""
        self.stopped = True
        self.parked_on = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.link is None and self._connector is not None:
            self._connector.stopConnecting()

    def _dial(self) -> None:
        self._timer = None
        self.parked_on = None
        if self.stopped:
            return
        self.link = None
        self._connector = self.service.reactor.connectTCP(
            self.host,
            self.port,
            _DialingFactory(self),
            timeout=max(1, round(self.service.handshake_timeout)),
        )

    def _retry_later(self) -> None:
        if self.stopped or self._timer is not None:
            return
        delay = self.backoff.next_delay()
        _log.debug(
            "redial {host}:{port} in {delay:.2f}s", host=self.host, port=self.port, delay=delay
        )
        self._timer = self.service.clock.callLater(delay, self._dial)

    def _connection_failed(self, reason: Failure) -> None:
        _log.info(
            "dial failed: {host}:{port}: {error}",
            host=self.host,
            port=self.port,
            error=reason.getErrorMessage(),
        )
        self._connector = None
        self.last_failure = reason.getErrorMessage()
        self._retry_later()

    def _established(self, link: Link) -> None:
        self.backoff.reset()
        self.last_failure = None

    def _link_ended(self, link: Link, reason: Reason) -> None:
        if link is not self.link:
            return
        self.link = None
        self._connector = None
        if reason not in (Reason.CLOSED, Reason.DUPLICATE_LINK):
            self.last_failure = str(reason)
        peer = link.peer_node_id
        if peer is not None and peer in self.service.links:
            self.parked_on = peer  # another link to the same node won; wait for it to end
            return
        self._retry_later()

    def _peer_unlinked(self, peer_id: int) -> None:
        if self.parked_on == peer_id:
            self.parked_on = None
            self._retry_later()


class LinkService:
    """A node's links: listen, dial, keep one link per peer, tell the handler."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        credentials: Credentials,
        handler: LinkHandler,
        *,
        entropy: Entropy,
        rng: random.Random,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        max_paused_bytes: int = DEFAULT_MAX_PAUSED_BYTES,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.credentials = credentials
        self.handler = handler
        self.entropy = entropy
        self.rng = rng
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.max_paused_bytes = max_paused_bytes
        self._links: dict[int, Link] = {}
        self._all: set[Link] = set()
        self._dialers: dict[tuple[str, int], Dialer] = {}
        self._ports: list[IListeningPort] = []

    @property
    def node_id(self) -> int:
        return self.credentials.identity.node_id

    @property
    def links(self) -> Mapping[int, Link]:
        """The current link of each peer (at most one per peer)."""
        return self._links

    @property
    def dialers(self) -> list[Dialer]:
        """The addresses this service keeps dialling (seeds, peers being linked)."""
        return list(self._dialers.values())

    def factory(self) -> ServerFactory:
        """A listening factory, for callers that bind the port themselves."""
        return _ListeningFactory(self)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        listening = self.reactor.listenTCP(port, self.factory(), interface=interface)
        self._ports.append(listening)
        return listening

    def connect(self, host: str, port: int, *, expected_peer: int | None = None) -> Dialer:
        """Keep a link to ``host:port`` (idempotent per address)."""
        key = (host, port)
        dialer = self._dialers.get(key)
        if dialer is None or dialer.stopped:
            dialer = Dialer(self, host, port, expected_peer)
            self._dialers[key] = dialer
            dialer.start()
        return dialer

    def disconnect(self, host: str, port: int) -> None:
        """Stop the dial loop for that address and close its link."""
        dialer = self._dialers.pop((host, port), None)
        if dialer is not None:
            dialer.stop()
            if dialer.link is not None:
                dialer.link.close()

    def stop(self) -> Deferred[None]:
        """Stop dialing and listening, close every link."""
        for dialer in list(self._dialers.values()):
            dialer.stop()
        self._dialers.clear()
        for link in list(self._all):
            link.close()
        stopping = [Deferred.fromCoroutine(_stop_listening(port)) for port in self._ports]
        self._ports.clear()
        return gatherResults(stopping).addCallback(lambda _: None)

    # -- called by links

    def _link_started(self, link: Link) -> None:
        self._all.add(link)

    def _link_established(self, link: Link) -> None:
        peer = link.peer_node_id
        assert peer is not None
        if link.dialer is not None:
            link.dialer._established(link)
        existing = self._links.get(peer)
        if existing is not None and existing is not link:
            if not keep_new_link(
                self.node_id,
                peer,
                existing_initiated_locally=existing.initiated_locally,
                new_initiated_locally=link.initiated_locally,
            ):
                link._close(Reason.DUPLICATE_LINK, "kept the existing link", abort=False)
                return
            self._links[peer] = link
            existing._close(Reason.DUPLICATE_LINK, "replaced by a new link", abort=False)
        self._links[peer] = link
        self.handler.link_established(link)

    def _link_closed(self, link: Link, reason: Reason) -> None:
        self._all.discard(link)
        peer = link.peer_node_id
        if peer is not None and self._links.get(peer) is link:
            del self._links[peer]
            self.handler.link_lost(link, str(reason))
            for dialer in list(self._dialers.values()):
                dialer._peer_unlinked(peer)
        if link.dialer is not None:
            link.dialer._link_ended(link, reason)


async def _stop_listening(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
