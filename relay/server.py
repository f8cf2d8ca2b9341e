"""The Twisted side of the relay: listeners on loopback and one adapter per connection.

Each connection runs a pure :class:`~relay.session.RelaySession`; the adapter here
owns the socket, the handshake timer and the backpressure.

Backpressure (see ``docs/backpressure.md``): the adapter registers itself as the
streaming producer of its own transport, so Twisted tells it when the client stops
keeping up (more than ``high_water`` bytes unsent). While a connection is
congested, any connection whose input causes a write to it stops being read until
the congested one has drained: a slow consumer slows its producers down instead of
growing the node's memory. Fan-out deliveries (broadcasts, events) to a connection
that is already ``max_backlog`` bytes behind are dropped and counted, since one
publish must not pin unbounded memory for a reader that never reads.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from irisnode.api import Messaging
from relay import codec
from relay.session import HANDSHAKE_SECONDS, RelaySession, State

log = Logger(namespace="irisnode.relay")

_SOCKET_SHORTCUT = True
"""Write straight to an idle TCP socket (see :meth:`RelayConnection.flush`)."""


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """Per-connection limits, all explicit and configurable."""

    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    max_name: int = codec.DEFAULT_MAX_NAME
    handshake_seconds: float = HANDSHAKE_SECONDS
    high_water: int = 1024 * 1024
    """Unsent bytes above which a connection counts as congested."""
    max_backlog: int = 64 * 1024 * 1024
    """Unsent bytes above which broadcasts and events to a connection are dropped."""


@dataclass(slots=True)
class RelayCounters:
    connections: int = 0
    handshakes: int = 0
    drops: int = 0
    dropped_deliveries: int = 0
    paused_reads: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class RelayConnection(Protocol):
    """One accepted relay connection: the session's wire and its transport's producer."""

    factory: RelayFactory

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        self.session: RelaySession | None = None
        self.congested = False
        self.backlog = 0  # bytes written while congested (the buffer holds at least this)
        self._waiters: set[RelayConnection] = set()  # connections paused because of us
        self._blockers = 0  # how many congested connections we are waiting for
        self._timer: IDelayedCall | None = None
        self._outbox: list[bytes] = []  # written this reactor turn, not yet handed to the socket

    # -- Protocol ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections.add(self)
        factory.counters.connections += 1
        transport = self.transport
        assert transport is not None
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        # Twisted reads up to ``bufferSize`` bytes at a time and also calls it "full"
        # beyond that; reads stay at its default, and congestion is judged against
        # ``high_water`` here (see ``flush`` and ``pauseProducing``).
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        limits = factory.limits
        clock = factory.clock
        self.session = RelaySession(
            factory.messaging,
            self,
            clock.seconds(),
            max_payload=limits.max_payload,
            max_name=limits.max_name,
            handshake_seconds=limits.handshake_seconds,
        )
        deadline = self.session.next_deadline()
        assert deadline is not None
        self._timer = clock.callLater(deadline - clock.seconds(), self._handshake_timer)

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        factory = self.factory
        factory.counters.bytes_in += len(data)
        factory.reader = self
        try:
            session.data_received(data, factory.clock.seconds())
        finally:
            factory.reader = None
        if self._timer is not None and session.state is not State.AWAITING_INIT:
            self._cancel_timer()
            if session.state is State.OPEN:
                factory.counters.handshakes += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self.factory.connections.discard(self)
        self.congested = False
        self._release_waiters()
        if self.session is not None:
            self.session.connection_lost()

    def _handshake_timer(self) -> None:
        self._timer = None
        if self.session is not None:
            self.session.on_timer(self.factory.clock.seconds())

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- Wire (what the session writes through) ------------------------------------------

    @property
    def overloaded(self) -> bool:
        return self.congested and self.backlog > self.factory.limits.max_backlog

    def write(self, data: bytes) -> None:
        if not self._outbox:
            self.factory.flush_later(self)
        self._outbox.append(data)
        if self.congested:
            self.backlog += len(data)
            reader = self.factory.reader
            if reader is not None and reader not in self._waiters:
                self._waiters.add(reader)
                reader._blockers += 1
                if reader._blockers == 1:
                    self.factory.counters.paused_reads += 1
                    reader.transport.pauseProducing()  # type: ignore[union-attr]

    def flush(self) -> None:
        """Hand everything written this turn to the socket in one go.

        Most of the time the socket takes it all at once; then the bytes skip
        Twisted's write buffer, and with it two epoll updates and a reactor turn.
        Whatever the socket does not take goes through ``transport.write`` as usual,
        which keeps the order and the producer/consumer accounting intact.
        """
        outbox = self._outbox
        if not outbox:
            return
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        transport: Any = self.transport
        if transport is None:
            return
        self.factory.counters.bytes_out += len(data)
        sock = _idle_socket(transport)
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # would block, or broken: transport.write finds out which
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)
        if not self.congested and _buffered(transport) > self.factory.limits.high_water:
            self._congest(transport)

    def close(self) -> None:
        self.flush()
        transport = self.transport
        assert transport is not None
        transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.loseConnection()

    def abort(self, reason: str) -> None:
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "dropping relay connection from {peer}: {reason}", peer=_describe(peer), reason=reason
        )
        self.factory.counters.drops += 1
        self.close()

    def drop_delivery(self, kind: str) -> None:
        counters = self.factory.counters
        counters.dropped_deliveries += 1
        if counters.dropped_deliveries & (counters.dropped_deliveries - 1) == 0:
            # Log the 1st, 2nd, 4th, 8th... drop: visible without flooding the log.
            log.warn(
                "dropped a {kind} for a client {backlog} bytes behind "
                "({total} deliveries dropped so far)",
                kind=kind,
                backlog=self.backlog,
                total=counters.dropped_deliveries,
            )

    # -- IPushProducer (our transport tells us when the client lags) -----------------------

    def pauseProducing(self) -> None:
        # Twisted says "full" at its small read size; only our own mark counts.
        transport = self.transport
        if not self.congested and _buffered(transport) > self.factory.limits.high_water:
            self._congest(transport)

    def _congest(self, transport: Any) -> None:
        self.congested = True
        # Make sure Twisted calls resumeProducing once its buffer has drained.
        transport.producerPaused = True

    def resumeProducing(self) -> None:
        self.congested = False
        self.backlog = 0
        self._release_waiters()
        if self.session is not None:
            self.session.resumed()

    def stopProducing(self) -> None:
        self.congested = False
        self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            waiter._blockers -= 1
            if waiter._blockers == 0 and waiter.transport is not None:
                waiter.transport.resumeProducing()  # type: ignore[attr-defined]


def _buffered(transport: Any) -> int:
    """Bytes a Twisted transport holds that the socket has not taken yet."""
    try:
        held: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:  # not a file-descriptor transport (tests' in-memory ones)
        return 0
    return held


def _idle_socket(transport: Any) -> socket.socket | None:
    """The socket of a Twisted TCP transport with nothing buffered, else None."""
    sock = getattr(transport, "socket", None)
    if (
        _SOCKET_SHORTCUT
        and isinstance(sock, socket.socket)
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        return sock
    return None


def _describe(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else repr(address)


class RelayFactory(ServerFactory):
    """Creates relay connections that share one node's messaging."""

    protocol = RelayConnection  # type: ignore[assignment]
    noisy = False

    def __init__(self, messaging: Messaging, clock: IReactorTime, limits: RelayLimits) -> None:
        self.messaging = messaging
        self.clock = clock
        self.limits = limits
        self.connections: set[RelayConnection] = set()
        self.counters = RelayCounters()
        self.reader: RelayConnection | None = None  # the connection whose input is being handled
        self._unflushed: list[RelayConnection] = []
        # irisnode's own reactor runs this right after the turn's reads; any other
        # reactor gets the same effect, slightly dearer, from a zero-delay call.
        self._call_after_io: Callable[[Callable[[], object]], object] = getattr(
            clock, "call_after_io", lambda function: clock.callLater(0, function)
        )

    def buildProtocol(self, addr: IAddress | None) -> RelayConnection:  # type: ignore[override]
        return RelayConnection(self)

    def flush_later(self, connection: RelayConnection) -> None:
        """Flush ``connection`` at the start of the next reactor turn, with all others.

        Writes produced by every read of one turn are gathered first, so a service
        fed by many clients gets one send per turn rather than one per request.
        """
        if not self._unflushed:
            self._call_after_io(self._flush_all)
        self._unflushed.append(connection)

    def _flush_all(self) -> None:
        connections, self._unflushed = self._unflushed, []
        for connection in connections:
            connection.flush()

    def shut_down(self, reason: str) -> None:
        """Tell every client the node is going away and close its connection."""
        for connection in list(self.connections):
            if connection.session is not None:
                connection.session.shut_down(reason)


def listen_loopback(reactor: IReactorTCP, factory: RelayFactory, port: int) -> list[IListeningPort]:
    """Listen on 127.0.0.1 and [::1] with the same port number; one family is enough.

    With ``port=0`` the IPv4 listener picks the number and IPv6 reuses it.
    Raises the IPv4 error if neither family can listen.
    """
    listeners: list[IListeningPort] = []
    first_error: Exception | None = None
    try:
        listeners.append(reactor.listenTCP(port, factory, interface="127.0.0.1"))
        port = listeners[0].getHost().port  # type: ignore[attr-defined]
    except Exception as error:  # CannotListenError, or no IPv4 at all
        first_error = error
    if socket.has_ipv6:
        try:
            listeners.append(reactor.listenTCP(port, factory, interface="::1"))
        except Exception as error:
            first_error = first_error or error
    if not listeners:
        assert first_error is not None
        raise first_error
    return listeners
