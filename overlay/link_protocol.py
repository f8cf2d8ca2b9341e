"""The Twisted ``Protocol`` of one link (docs/wire-link.md §6), around
:class:`overlay.link.LinkCore`.

:class:`Link` is one TCP connection, dialer or listener side. It feeds the core,
owns one timer (the handshake deadline), and is the streaming producer of its
transport: it hands the core's frames to the transport only while the transport
is not full, so queued messages wait in the core (control ahead of bulk) rather
than in the socket buffer, and a full buffer is backpressure (``congested``,
``link_writable``), never a dropped link. Also here: what a link tells the node
(:class:`LinkHandler`), why a message is given up (:class:`GiveUp`), and the
summary logging that keeps failures from flooding the log (:class:`LogSummary`).
:class:`overlay.link_twisted.LinkService` owns the links.
"""

from __future__ import annotations

import enum
import socket
from collections import Counter
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from overlay.identity import Certificate
from overlay.link import (
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

if TYPE_CHECKING:
    from overlay.link_dial import Dialer
    from overlay.link_twisted import LinkService

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
            self.service.refusals.add(str(reason), source_host(self.address), detail=detail)
            return
        # Closing on purpose and the duplicate-link rule are routine, not failures.
        routine = reason in (Reason.CLOSED, Reason.DUPLICATE_LINK)
        if routine:
            log, event = _log.debug, "closed"
        elif reason is Reason.CONNECTION_LOST:
            log, event = _log.info, "lost"
        else:
            log, event = _log.warn, "failed"
        log(
            "link {outcome}: {reason} ({detail}) peer={peer_id} address={address} role={role}",
            outcome=event,
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


def source_host(address: IAddress | None) -> str:
    """The host part of :func:`describe_address`: what the handshake rate is counted by."""
    host = getattr(address, "host", None)
    return "unknown" if host is None else describe_address(address).rpartition(":")[0]
