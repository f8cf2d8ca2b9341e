"""Twisted shell around :class:`overlay.link.LinkCore` (docs/wire-link.md §6).

* :class:`Link` is the ``Protocol`` of one TCP connection, dialer or listener
  side. It feeds the core, owns one timer (the handshake deadline), and is the
  streaming producer of its transport: it hands the core's frames to the
  transport only while the transport is not full, so queued messages wait in
  the core (control ahead of bulk) rather than in the socket buffer, and a full
  buffer is backpressure (``congested``, ``link_writable``), never a dropped link.
* :class:`LinkService` is what a node holds: its credentials, a listening
  factory with a per-source handshake rate limit, dialling (persistent loops for
  seeds and one-shot dials with a deadline for ``send(..., dial_to=)``, see
  :mod:`overlay.link_dial`), the duplicate-link rule, and one :class:`LinkHandler`.
  Every failure is logged with its specific ``reason`` and closes that one
  connection; every message given up is counted by reason and logged in summary.

The reactor and clock are constructor arguments; nothing here imports the
global reactor.
"""

from __future__ import annotations

import enum
import random
import socket
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from overlay.identity import Certificate, Credentials, Entropy
from overlay.link import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Effect,
    Established,
    Failed,
    LinkCore,
    LinkStateError,
    Reason,
    Received,
    Role,
    Transmit,
)
from overlay.link_dial import Dialer
from overlay.link_frames import DEFAULT_LIMITS, LinkLimits
from overlay.link_policy import HandshakeLimiter, keep_new_link

_log = Logger(namespace="overlay.link")


class GiveUp(enum.StrEnum):
    """Why a message was given up without reaching the wire (``LinkService.given_up``)."""

    NO_LINK = "no-link"
    """No link to the peer and no address to dial."""
    DIAL_TIMEOUT = "dial-timeout"
    """The peer was dialled but no link came up within ``dial_timeout``."""
    DIAL_QUEUE_FULL = "dial-queue-full"
    """Too many messages or bytes already wait for that peer's link."""
    SEND_BUFFER_FULL = "send-buffer-full"
    """The link's queued bulk bytes are at their cap (``limits.max_bulk_queued``)."""
    CONTROL_QUEUE_FULL = "control-queue-full"
    """The link's queued control bytes are at their cap (``limits.max_control_queued``)."""
    OVERSIZE = "oversize"
    """Over ``limits.max_message_size``; also raised as LinkStateError (the caller's bug)."""
    LINK_LOST = "link-lost"
    """The link closed with the message still queued, or before it was sent."""
    CLOSED = "closed"
    """This node dropped the peer (``LinkService.close_peer``) or stopped."""


class LinkHandler(TypingProtocol):
    """What the node above the links implements (e.g. the Pastry integration).

    ``link_established`` is called when a link becomes *the* link to its peer,
    which may replace an earlier one (the replaced link is closed without a
    ``link_lost``). ``link_lost`` is called when a peer's current link goes away.
    ``frame_received`` brings one whole message and may come from any
    authenticated link, including a duplicate in its last moments; key on
    ``link.peer_node_id``. ``link_writable`` says a congested link drained below
    its low-water mark: bulk senders may go on.
    """

    def link_established(self, link: Link) -> None: ...

    def frame_received(self, link: Link, data: bytes) -> None: ...

    def link_lost(self, link: Link, reason: str) -> None: ...

    def link_writable(self, link: Link) -> None: ...


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


class LogSummary:
    """Logs without flooding: the first event of each kind in an interval at once, with
    its details; the rest as one line per interval with counts per kind and source."""

    def __init__(self, clock: IReactorTime, interval: float, what: str) -> None:
        self.clock = clock
        self.interval = interval
        self.what = what
        self._said: set[str] = set()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._call: IDelayedCall | None = None

    def add(self, kind: str, source: str, count: int = 1, **fields: Any) -> None:
        if kind not in self._said:
            self._said.add(kind)
            _log.warn(
                "{what}: {count} {reason} ({detail}) from {source}",
                what=self.what,
                count=count,
                reason=kind,
                source=source,
                **{"detail": "", **fields},
            )
        else:
            self._counts[kind, source] += count
        if self._call is None:
            self._call = self.clock.callLater(self.interval, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line and start a new interval."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._said.clear()
        if self._counts:
            counts: dict[str, dict[str, int]] = {}
            for (kind, source), count in sorted(self._counts.items()):
                counts.setdefault(kind, {})[source] = count
            _log.warn(
                "{what}, more in the last {interval}s: {counts}",
                what=self.what,
                interval=self.interval,
                counts=counts,
            )
            self._counts.clear()


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
        """The transport's buffer is full: frames wait in the core until it drains."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self._core: LinkCore | None = None
        self._timer: IDelayedCall | None = None
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

    @property
    def congested(self) -> bool:
        """Queued bulk bytes are above the high-water mark (until below the low-water mark)."""
        return self._core is not None and self._core.congested

    @property
    def queued_bytes(self) -> int:
        """Message bytes waiting in this link's queues (control and bulk)."""
        core = self._core
        return 0 if core is None else core.queued_control_bytes + core.queued_bulk_bytes

    def send(self, data: bytes, *, bulk: bool = False) -> bool:
        """Queue one message (control by default, or bulk) and write what the transport takes.

        Returns False, counting the message as given up, if the link is closed or
        the message's queue is full (bulk: ``limits.max_bulk_queued``). Raises
        :class:`LinkStateError` before the link is established or for a message
        over ``limits.max_message_size`` (both are the caller's bug).
        """
        service = self.service
        if self.close_reason is not None:
            service._give_up(GiveUp.LINK_LOST, self.peer_node_id, 1, "the link is closed")
            return False
        core = self._core
        if core is None or not core.established:
            raise LinkStateError("the link is not established")
        if len(data) > core.limits.max_message_size:
            service._give_up(GiveUp.OVERSIZE, self.peer_node_id, 1, f"{len(data)} bytes")
        if not core.queue(data, bulk=bulk):
            why = GiveUp.SEND_BUFFER_FULL if bulk else GiveUp.CONTROL_QUEUE_FULL
            service._give_up(why, self.peer_node_id, 1, f"{self.queued_bytes} bytes queued")
            return False
        self._write()
        return True

    def wait_writable(self) -> Deferred[None]:
        """Fires once the link is not congested (at once if it is not), or closes."""
        if not self.congested or self.close_reason is not None:
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
        """Close on purpose: writes what is queued, then hangs up."""
        self._close(Reason.CLOSED, "", abort=False)

    # -- IPushProducer: the transport tells us when its write buffer is full

    def pauseProducing(self) -> None:
        self.writing_paused = True

    def resumeProducing(self) -> None:
        self.writing_paused = False
        self._write()

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
            limits=service.limits,
            handshake_timeout=service.handshake_timeout,
            expected_peer=self.expected_peer,
        )
        assert self.transport is not None
        service._link_started(self)
        IConsumer(self.transport).registerProducer(self, True)
        tcp = ITCPTransport(self.transport, None)
        if tcp is not None:
            tcp.setTcpNoDelay(True)
            _limit_socket_buffers(tcp, service.socket_buffer)
        self._schedule(now)
        self._apply(self._core.start())

    def dataReceived(self, data: bytes) -> None:
        if self._core is None or self.close_reason is not None:
            return
        self.bytes_received += len(data)
        self.service.bytes_received += len(data)
        self._apply(self._core.receive(data, self.service.clock.seconds()))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        self._release_writers()
        if self.close_reason is None:
            self.close_reason = Reason.CONNECTION_LOST
            self._log_close(Reason.CONNECTION_LOST, "")
            self._drop_queued()
            self.service._link_closed(self, Reason.CONNECTION_LOST)

    # -- internals

    def _write(self) -> None:
        """Hand frames to the transport while it is not full; tell the handler once the
        bulk queue drained below its low-water mark."""
        core = self._core
        transport = self.transport
        if core is None or transport is None or self.close_reason is not None:
            return
        was_congested = core.congested
        budget = core.limits.fragment_size
        service = self.service
        while not self.writing_paused and core.has_output:
            data = core.take(budget)
            self.bytes_sent += len(data)
            service.bytes_sent += len(data)
            transport.write(data)
        if was_congested and not core.congested and self.close_reason is None:
            self._release_writers()
            service.handler.link_writable(self)

    def _write_all(self) -> None:
        """Everything queued, whatever the transport holds already (we are hanging up)."""
        core = self._core
        if core is None or self.transport is None:
            return
        while core.has_output:
            data = core.take(core.limits.fragment_size)
            self.bytes_sent += len(data)
            self.service.bytes_sent += len(data)
            self.transport.write(data)

    def _drop_queued(self) -> None:
        lost = 0 if self._core is None else self._core.drop_queued()
        if lost:
            self.service._give_up(GiveUp.LINK_LOST, self.peer_node_id, lost, str(self.close_reason))

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if self.close_reason is not None:
                return
            if isinstance(effect, Received):
                self.service.handler.frame_received(self, effect.data)
            elif isinstance(effect, Transmit):
                assert self.transport is not None
                self.bytes_sent += len(effect.data)
                self.service.bytes_sent += len(effect.data)
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
        if not abort:
            self._write_all()
        self.close_reason = reason
        self._cancel_timer()
        self._log_close(reason, detail)
        self._drop_queued()
        if self.transport is not None:
            tcp = ITCPTransport(self.transport, None)
            if abort and tcp is not None:
                tcp.abortConnection()
            else:
                self.transport.loseConnection()
        self._release_writers()
        self.service._link_closed(self, reason)

    def _log_close(self, reason: Reason, detail: str) -> None:
        if self.role is Role.RESPONDER and self.peer is None and reason is not Reason.CLOSED:
            # Anyone can connect: failed inbound handshakes are logged in summary.
            self.service.refusals.add(str(reason), _host(self.address), detail=detail)
            return
        quiet = reason in (Reason.CLOSED, Reason.DUPLICATE_LINK, Reason.CONNECTION_LOST)
        (_log.info if quiet else _log.warn)(
            "link {event}: {reason} ({detail}) peer={peer_id} address={address} role={role}",
            event="lost" if reason is Reason.CONNECTION_LOST else "failed",
            reason=str(reason),
            detail=detail,
            peer_id=format_node_id(self.peer_node_id),
            address=describe_address(self.address),
            role=self.role.value,
        )

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


def _limit_socket_buffers(tcp: ITCPTransport, size: int) -> None:
    """Cap the kernel's send and receive buffers of a link: data queued past them waits in
    the link, where control messages can overtake it, instead of in the kernel, where
    every heartbeat would wait behind all of it."""
    handle = getattr(tcp, "getHandle", lambda: None)()
    if size and isinstance(handle, socket.socket):
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _host(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    return "unknown" if host is None else describe_address(address).rpartition(":")[0]


class _ListeningFactory(ServerFactory):
    noisy = False

    def __init__(self, service: LinkService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> Link | None:
        """A responder link, unless this source used up its handshakes (then Twisted
        closes the connection before a byte is read: no CPU spent on it)."""
        service = self.service
        source = _host(addr)
        if not service.handshake_limiter.allow(source, service.clock.seconds()):
            service.handshakes_refused += 1
            service.refusals.add("rate-limited", source)
            return None
        return Link(service, Role.RESPONDER)


@dataclass(slots=True)
class _Waiting:
    """Messages for a peer being dialled, flushed in order once its link is up."""

    dialer: Dialer
    deadline: IDelayedCall
    messages: deque[tuple[bytes, bool]] = field(default_factory=deque)
    bytes: int = 0


class LinkService:
    """A node's links: listen, dial, keep one link per peer, send, tell the handler."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        credentials: Credentials,
        handler: LinkHandler,
        *,
        entropy: Entropy,
        rng: random.Random,
        limits: LinkLimits = DEFAULT_LIMITS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        dial_timeout: float = 5.0,
        max_dial_queue: int = 256,
        max_dial_queue_bytes: int = 32 << 20,
        handshake_rate: float = 5.0,
        handshake_burst: float = 20.0,
        log_interval: float = 10.0,
        socket_buffer: int = 256 * 1024,
    ) -> None:
        if max_dial_queue_bytes < limits.max_message_size or max_dial_queue < 1:
            raise ValueError("the dial queue must hold at least one message of the largest size")
        self.reactor = reactor
        self.clock = clock
        self.credentials = credentials
        self.handler = handler
        self.entropy = entropy
        self.rng = rng
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.dial_timeout = dial_timeout
        self.max_dial_queue = max_dial_queue
        self.max_dial_queue_bytes = max_dial_queue_bytes
        self.socket_buffer = socket_buffer
        """SO_SNDBUF and SO_RCVBUF of each link (Linux doubles it; 0: the kernel's autotuning)."""
        self.handshake_limiter = HandshakeLimiter(handshake_rate, handshake_burst)
        self.given_up: Counter[str] = Counter()
        """Messages given up, by :class:`GiveUp` reason."""
        self.handshakes_refused = 0
        """Inbound connections closed unread: their source was over its handshake rate."""
        self.bytes_sent = 0
        self.bytes_received = 0
        """Wire bytes over every link, closed ones included (per link: ``Link.bytes_*``)."""
        self.give_ups = LogSummary(clock, log_interval, "messages given up")
        self.refusals = LogSummary(clock, log_interval, "inbound links refused")
        self._links: dict[int, Link] = {}
        self._all: set[Link] = set()
        self._dialers: dict[tuple[str, int], Dialer] = {}
        self._waiting: dict[int, _Waiting] = {}
        self._ports: list[IListeningPort] = []

    @property
    def node_id(self) -> int:
        return self.credentials.identity.node_id

    @property
    def links(self) -> Mapping[int, Link]:
        """The current link of each peer (at most one per peer)."""
        return self._links

    def factory(self) -> ServerFactory:
        """A listening factory, for callers that bind the port themselves."""
        return _ListeningFactory(self)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        listening = self.reactor.listenTCP(port, self.factory(), interface=interface)
        self._ports.append(listening)
        return listening

    def send(
        self,
        peer_id: int,
        data: bytes,
        *,
        bulk: bool = False,
        dial_to: tuple[str, int] | None = None,
    ) -> bool:
        """Send one message to a peer, dialling ``dial_to`` first if there is no link.

        Messages for a peer being dialled wait (at most ``max_dial_queue`` of them
        and ``max_dial_queue_bytes``) and go out in order once its link is up; if
        none comes up within ``dial_timeout`` they are given up. False means the
        message was given up at once (counted in ``given_up``).
        """
        link = self._links.get(peer_id)
        if link is not None:
            return link.send(data, bulk=bulk)
        if len(data) > self.limits.max_message_size:
            self._give_up(GiveUp.OVERSIZE, peer_id, 1, f"{len(data)} bytes")
            raise LinkStateError(
                f"message of {len(data)} bytes exceeds {self.limits.max_message_size}"
            )
        waiting = self._waiting.get(peer_id)
        if waiting is None:
            if dial_to is None:
                self._give_up(GiveUp.NO_LINK, peer_id, 1, "no address to dial")
                return False
            waiting = self._dial(peer_id, *dial_to)
        if (
            len(waiting.messages) >= self.max_dial_queue
            or waiting.bytes + len(data) > self.max_dial_queue_bytes
        ):
            self._give_up(GiveUp.DIAL_QUEUE_FULL, peer_id, 1, f"{len(waiting.messages)} waiting")
            return False
        waiting.messages.append((data, bulk))
        waiting.bytes += len(data)
        return True

    def connect(self, host: str, port: int, *, expected_peer: int | None = None) -> Dialer:
        """Keep a link to ``host:port`` (idempotent per address): a seed."""
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

    def close_peer(self, peer_id: int) -> None:
        """Forget a peer: stop dialling it, give up what waits for it, close its link."""
        waiting = self._waiting.pop(peer_id, None)
        if waiting is not None:
            self._abandon(peer_id, waiting, GiveUp.CLOSED, "the peer was dropped")
        link = self._links.get(peer_id)
        if link is not None:
            link.close()

    def stop(self) -> Deferred[None]:
        """Stop dialing and listening, close every link."""
        for dialer in list(self._dialers.values()):
            dialer.stop()
        self._dialers.clear()
        for peer_id, waiting in list(self._waiting.items()):
            self._abandon(peer_id, waiting, GiveUp.CLOSED, "the node is stopping")
        self._waiting.clear()
        for link in list(self._all):
            link.close()
        self.give_ups.flush()
        self.refusals.flush()
        stopping = [Deferred.fromCoroutine(_stop_listening(port)) for port in self._ports]
        self._ports.clear()
        return gatherResults(stopping).addCallback(lambda _: None)

    # -- dialling for send()

    def _dial(self, peer_id: int, host: str, port: int) -> _Waiting:
        dialer = Dialer(self, host, port, peer_id, one_shot=True)
        deadline = self.clock.callLater(self.dial_timeout, self._dial_expired, peer_id)
        waiting = self._waiting[peer_id] = _Waiting(dialer, deadline)
        dialer.start()
        return waiting

    def _dial_expired(self, peer_id: int) -> None:
        waiting = self._waiting.pop(peer_id, None)
        if waiting is not None:
            dialer = waiting.dialer
            why = f"no link to {dialer.host}:{dialer.port} in {self.dial_timeout}s"
            if dialer.last_error:
                why += f" (last: {dialer.last_error})"
            self._abandon(peer_id, waiting, GiveUp.DIAL_TIMEOUT, why)

    def _abandon(self, peer_id: int, waiting: _Waiting, reason: GiveUp, why: str) -> None:
        if waiting.deadline.active():
            waiting.deadline.cancel()
        waiting.dialer.stop()
        if waiting.messages:
            self._give_up(reason, peer_id, len(waiting.messages), why)

    def _give_up(self, reason: GiveUp, peer_id: int | None, count: int, detail: str) -> None:
        self.given_up[reason] += count
        self.give_ups.add(str(reason), format_node_id(peer_id), count, detail=detail)

    # -- called by links and dialers

    def _outgoing_link(self, dialer: Dialer) -> Link:
        return Link(self, Role.INITIATOR, expected_peer=dialer.expected_peer, dialer=dialer)

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
        waiting = self._waiting.pop(peer, None)
        if waiting is not None:
            waiting.deadline.cancel()
            if waiting.dialer.link is not link:
                waiting.dialer.stop()
            for data, bulk in waiting.messages:
                link.send(data, bulk=bulk)
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
