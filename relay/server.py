"""The Twisted side of the relay: listeners on loopback and one adapter per connection.

Each connection runs a pure :class:`~relay.session.RelaySession`; the adapter here
owns the socket, the connection's one timer and the backpressure
(``docs/backpressure.md``), which rests on a single measure, a connection's
*backlog*: the bytes written to it that the client has not taken yet, counted on
every write whoever makes it (a packet being handled, a timer, a node service).

* A connection whose backlog passes ``high_water`` is **congested** until it has
  caught up. While it is, it is not read itself, and neither is any connection
  whose input writes to it: a slow consumer slows its producers down (and itself)
  instead of growing the node's memory.
* Fan-out deliveries (broadcasts, events) to a connection more than
  ``max_backlog`` behind are dropped and counted.
* Bytes of packets still arriving are held against node-wide budgets: REQUEST
  packets against the request budget the broker keeps for requests in flight,
  anything else against ``max_partial_bytes``. A connection whose packet does not
  fit is not read until there is room; a connection that completes a request
  while the request budget is spent is not read until it has room again.
* At most ``max_connections`` connections; more are refused, with one log line a
  second while that lasts.

The backlog comes from Twisted's public producer contract: the transport says
when its buffer is full (``pauseProducing``) and when it has drained
(``resumeProducing``); in between, every byte handed to it counts. One shortcut
reads Twisted internals, for speed only: :func:`relay.tcp.idle_socket` (see there).
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.timer import DeadlineTimer
from relay import codec
from relay.ports import ByteBudget, Messaging
from relay.session import (
    HANDSHAKE_SECONDS,
    PACKET_SECONDS,
    PACKETS_PER_TURN,
    RelaySession,
    SharedEncoding,
    State,
)
from relay.tcp import client_gone, idle_socket

log = Logger(namespace="irisnode.relay")

MIB = 1 << 20

RESERVED_DESCRIPTORS = 128
"""Descriptors kept for everything but relay connections (listeners, links, logs)."""

HANGUP_CHECK_SECONDS = 1.0
"""How often connections the node is not reading are checked for a client that has gone."""


DEFAULT_MAX_CONNECTIONS = 4096
"""Enough for any machine's local applications; more takes longer to say goodbye to at
shutdown (about 0.1 ms each) than the one second a node has to stop."""


def default_max_connections() -> int:
    """:data:`DEFAULT_MAX_CONNECTIONS`, or fewer if the descriptor limit (less those kept for
    everything else) is lower."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(min(DEFAULT_MAX_CONNECTIONS, soft - RESERVED_DESCRIPTORS), 16)


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """Limits of the relay, all explicit and configurable (``docs/backpressure.md``)."""

    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    max_name: int = codec.DEFAULT_MAX_NAME
    handshake_seconds: float = HANDSHAKE_SECONDS
    packet_seconds: float = PACKET_SECONDS
    """How long a packet that has begun may take to arrive whole (reading time)."""
    high_water: int = 1 * MIB
    """Backlog above which a connection counts as congested."""
    max_backlog: int = 64 * MIB
    """Backlog above which broadcasts and events to a connection are dropped."""
    max_partial_bytes: int = 64 * MIB
    """Bytes of packets still arriving (other than requests), node-wide."""
    max_connections: int = field(default_factory=default_max_connections)
    """Relay connections at once; the default stays below the descriptor limit."""
    packets_per_turn: int = PACKETS_PER_TURN
    """Packets of one connection handled per reactor turn (fairness, not memory)."""


@dataclass(slots=True)
class RelayCounters:
    connections: int = 0
    handshakes: int = 0
    drops: int = 0
    dropped_deliveries: int = 0
    paused_reads: int = 0
    refused_connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class RelayConnection(Protocol):
    """One accepted relay connection: the session's wire and its transport's producer."""

    factory: RelayFactory

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        self.session: RelaySession | None = None
        self.congested = False
        self._high_water = factory.limits.high_water
        self._outbox: list[bytes] = []  # written this reactor turn, not yet handed to the socket
        self._full = False  # the transport said its buffer is full and has not drained since
        self._unsent = 0  # bytes handed to the transport since it said it was full
        self._room = self._high_water  # high_water - backlog: below 0 means congested
        self._waiters: set[RelayConnection] = set()  # not read until we have caught up
        self._blockers = 0  # reasons we are not read: congested connections, budgets
        self._reserved = 0  # bytes of our packet in progress held against a budget
        self._reserved_from: ByteBudget | None = None
        self._waiting_for: ByteBudget | None = None
        self._handshaking = True
        self._more_later = False  # packets wait for the next turn
        self._timer = DeadlineTimer(factory.clock, self._on_timer)

    # -- Protocol ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections.add(self)
        factory.counters.connections += 1
        transport = self.transport
        assert transport is not None
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        limits = factory.limits
        self.session = RelaySession(
            factory.messaging,
            self,
            factory.clock.seconds(),
            max_payload=limits.max_payload,
            max_name=limits.max_name,
            handshake_seconds=limits.handshake_seconds,
            packet_seconds=limits.packet_seconds,
            packets_per_turn=limits.packets_per_turn,
            shared=factory.shared,
            reserved=factory.reserved,
        )
        self._timer.wake(self.session.next_deadline())

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            self.factory.counters.bytes_in += len(data)
            self._handle(session, data)

    def _handle(self, session: RelaySession, data: bytes | None) -> None:
        """Feed ``data`` (None: the packets still waiting) to the session, then see to limits."""
        factory = self.factory
        factory.reader = self
        requests = session.requests
        try:
            if data is None:
                session.handle_more(factory.clock.seconds())
            else:
                session.data_received(data, factory.clock.seconds())
        finally:
            factory.reader = None
        need = session.partial_need
        if need or self._reserved:
            self._reserve(need, session.partial_request)
        if session.requests != requests and not session.closed:
            budget = factory.request_budget
            if not budget.fits(1, session):
                self._wait_for(budget)  # it holds its share of requests: let some end first
        if session.unhandled and not self._more_later:
            # Its share of this turn is done: the rest on the next, and no reading meanwhile.
            self._more_later = True
            self._block(counted=False)
            factory.clock.callLater(0, self._handle_more)
        if self._handshaking:
            if session.state is not State.AWAITING_INIT:
                self._handshaking = False
                self._timer.stop()
                if session.state is State.OPEN:
                    factory.counters.handshakes += 1
        elif not need:
            return  # no deadline to watch
        deadline = session.next_deadline()
        if deadline is not None:
            self._timer.wake(deadline)

    def _handle_more(self) -> None:
        self._more_later = False
        self._unblock()
        if self.session is not None and self.session.unhandled:
            self._handle(self.session, None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._timer.stop()
        self.factory.connections.discard(self)
        self.factory.not_reading.discard(self)
        if self.session is not None:
            self.session.connection_lost()
        self._release_budgets()
        self._release_waiters()

    def _on_timer(self, now: float) -> float | None:
        session = self.session
        if session is None:
            return None
        if self._blockers and not self._handshaking:
            return None  # we are not reading it: its packet in progress is not its fault
        session.on_timer(now)
        return session.next_deadline()

    # -- not reading a connection ----------------------------------------------------------

    def _block(self, *, counted: bool = True) -> None:
        """One more reason not to read this connection (``counted``: a backpressure pause)."""
        self._blockers += 1
        if counted:
            self.factory.counters.paused_reads += 1
        if self._blockers == 1 and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.factory.watch_hangup(self)

    def _unblock(self) -> None:
        self._blockers -= 1
        if self._blockers == 0:
            self.factory.not_reading.discard(self)
        session = self.session
        if self._blockers == 0 and self.transport is not None and session is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            session.reading_resumed(self.factory.clock.seconds())
            deadline = session.next_deadline()
            if deadline is not None:
                self._timer.wake(deadline)

    def _hold(self, connection: RelayConnection | None) -> None:
        """Do not read ``connection`` until we have caught up."""
        if connection is not None and connection not in self._waiters:
            self._waiters.add(connection)
            connection._block()

    def _reserve(self, need: int, request: bool) -> None:
        """Hold the packet in progress (``need`` bytes in all) against its budget, or stop reading."""
        factory = self.factory
        budget = factory.request_budget if request else factory.partial_budget
        held, source = self._reserved, self._reserved_from
        if source is not None and source is not budget:
            source.give(held, self.session)
            held = 0
        if need <= held:
            self._reserved, self._reserved_from = need, (budget if need else None)
            if held > need:
                budget.give(held - need, self.session)
        elif budget.fits(need - held, self.session):
            budget.take(need - held, self.session)
            self._reserved, self._reserved_from = need, budget
        else:
            self._reserved, self._reserved_from = held, budget
            self._wait_for(budget, need)

    def _wait_for(self, budget: ByteBudget, size: int = 1) -> None:
        """Stop reading until ``size`` more fit in ``budget`` (giving back what we reserved)."""
        if self._reserved_from is budget:
            held, self._reserved, self._reserved_from = self._reserved, 0, None
            budget.give(held, self.session)
        if self._waiting_for is None and not budget.fits(size, self.session):
            self._waiting_for = budget
            self._block()
            budget.wait(self._budget_ready, size, self.session)

    def _budget_ready(self) -> None:
        self._waiting_for = None
        self._unblock()

    def _release_budgets(self) -> None:
        if self._reserved_from is not None:
            self._reserved_from.give(self._reserved, self.session)
            self._reserved, self._reserved_from = 0, None
        if self._waiting_for is not None:
            self._waiting_for.cancel(self._budget_ready)
            self._waiting_for = None

    # -- Wire (what the session writes through) ------------------------------------------

    @property
    def backlog(self) -> int:
        """Bytes written to this connection that the client has not taken yet (at most)."""
        return self._high_water - self._room

    @property
    def overloaded(self) -> bool:
        return self.congested and self.backlog > self.factory.limits.max_backlog

    def write(self, data: bytes) -> None:
        if not self._outbox:
            self.factory.flush_later(self)
        self._outbox.append(data)
        self._room -= len(data)
        if self._room < 0:  # congested (or now becoming so): whoever wrote this waits
            if not self.congested:
                self._congest()
            self._hold(self.factory.reader)

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
        sock = idle_socket(transport)
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # would block, or broken: transport.write finds out which
            data = data[sent:] if sent else data
        if data:
            transport.write(data)  # may call pauseProducing: the buffer is now full
            self._unsent = self._unsent + len(data) if self._full else 0
        self._room = self._high_water - self._unsent
        if self.congested:
            if self._room >= 0:
                self._uncongest()
        elif self._room < 0:
            self._congest()

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

    def _congest(self) -> None:
        self.congested = True
        self._hold(self)  # a client that does not take its output does not get to add input

    def _uncongest(self) -> None:
        if self.congested:
            self._release_waiters()
            if self.session is not None:
                self.session.resumed()

    def _release_waiters(self) -> None:
        self.congested = False
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            waiter._unblock()

    # -- IPushProducer: our transport says when its buffer is full and when it has drained --

    def pauseProducing(self) -> None:
        self._full = True

    def resumeProducing(self) -> None:
        self._full = False
        self._unsent = 0
        self._room = self._high_water - sum(map(len, self._outbox))
        if self._room >= 0:
            self._uncongest()

    def stopProducing(self) -> None:
        """The connection is closing: whoever waits for it need not wait any longer."""
        self._full = False
        self._unsent = 0
        self._room = self._high_water
        self._release_waiters()


def _describe(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else repr(address)


class RelayFactory(ServerFactory):
    """Creates relay connections that share one node's messaging."""

    protocol = RelayConnection  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        messaging: Messaging,
        clock: IReactorTime,
        limits: RelayLimits,
        *,
        request_budget: ByteBudget | None = None,
        reserved: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.messaging = messaging
        self.reserved = reserved
        """Cluster names the node keeps for itself (applications cannot register them)."""
        self.clock = clock
        self.limits = limits
        self.connections: set[RelayConnection] = set()
        self.counters = RelayCounters()
        self.reader: RelayConnection | None = None  # the connection whose input is being handled
        self.partial_budget = ByteBudget(limits.max_partial_bytes)
        self.request_budget = request_budget or ByteBudget(64 * MIB)
        """The broker's budget for requests held; arriving requests take from it too."""
        self.shared = SharedEncoding()
        self.stopping = False
        self.not_reading: set[RelayConnection] = set()
        self._hangups = DeadlineTimer(clock, self._check_hangups)
        self._unflushed: list[RelayConnection] = []
        self._refused = 0  # refusals not yet logged
        self._refusal_log = DeadlineTimer(clock, self._log_refusals)
        self._next_refusal_log = 0.0
        # irisnode's own reactor runs this right after the turn's reads; any other
        # reactor gets the same effect, slightly dearer, from a zero-delay call.
        self._call_after_io: Callable[[Callable[[], object]], object] = getattr(
            clock, "call_after_io", lambda function: clock.callLater(0, function)
        )

    def buildProtocol(self, addr: IAddress | None) -> RelayConnection | None:  # type: ignore[override]
        if self.stopping or len(self.connections) >= self.limits.max_connections:
            self._refuse()
            return None  # Twisted closes the socket at once
        return RelayConnection(self)

    def _refuse(self) -> None:
        self.counters.refused_connections += 1
        self._refused += 1
        now = self.clock.seconds()
        if now >= self._next_refusal_log:
            self._log_refusals(now)
        else:
            self._refusal_log.wake(self._next_refusal_log)

    def _log_refusals(self, now: float) -> None:
        """One line a second at most while connections are refused."""
        if self._refused:
            log.warn(
                "refused {count} relay connections: {open} open, the limit is {limit}",
                count=self._refused,
                open=len(self.connections),
                limit=self.limits.max_connections,
                stopping=self.stopping,
            )
            self._refused = 0
            self._next_refusal_log = now + 1.0

    def watch_hangup(self, connection: RelayConnection) -> None:
        """``connection`` is not being read: check now and then that its client is still there."""
        self.not_reading.add(connection)
        self._hangups.wake(self.clock.seconds() + HANGUP_CHECK_SECONDS)

    def _check_hangups(self, now: float) -> float | None:
        for connection in list(self.not_reading):
            transport: Any = connection.transport
            if transport is not None and client_gone(transport):
                transport.abortConnection()  # its requests end with it (and free the budget)
        return now + HANGUP_CHECK_SECONDS if self.not_reading else None

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
        self.shared.forget()  # this turn's fan-outs are written: keep no payload beyond it

    def shut_down(self, reason: str) -> None:
        """Refuse newcomers, tell every client the node is going away and close its connection."""
        self.stopping = True
        for connection in list(self.connections):
            if connection.session is not None:
                connection.session.shut_down(reason)
        self._refusal_log.stop()
        self._hangups.stop()


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
