"""The relay bindings for Twisted: every operation that waits returns a Deferred.

::

    conn = await connect(reactor, port=55555)
    reply = await conn.request("echo", b"hi", timeout=1.0)
    await conn.close()

Argument mistakes raise :class:`ValueError` (or :class:`TypeError`) at once;
everything that happens on the wire is reported through the returned Deferred
(:class:`~relay.client.errors.Timeout`, :class:`~relay.client.errors.RemoteFault`,
:class:`~relay.client.errors.ConnectionClosed` ...). Methods that do not wait
(``broadcast``, ``publish``, ``subscribe``, ``unsubscribe``) raise
``ConnectionClosed`` directly when the connection is gone.

The reactor is always passed in; nothing here touches the global one.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTCP,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from relay.client import core, errors
from relay.client._session import Done, HandlerStats, Session, TunnelEnd
from relay.client.pool import Limits, ServiceLimits

__all__ = [
    "DEFAULT_PORT",
    "Connection",
    "Service",
    "ServiceHandler",
    "Tunnel",
    "connect",
    "register",
]

DEFAULT_PORT = 55555

log = Logger(namespace="relay.client")

T = TypeVar("T")


class _DeferredWaiter(Generic[T]):
    """A Deferred as the session's waiter; cancelling the Deferred withdraws it."""

    __slots__ = ("deferred",)

    def __init__(self) -> None:
        self.deferred: Deferred[T] = Deferred()

    def pending(self) -> bool:
        return not self.deferred.called

    def resolve(self, value: T) -> None:
        if not self.deferred.called:
            self.deferred.callback(value)

    def reject(self, error: BaseException) -> None:
        if not self.deferred.called:
            self.deferred.errback(error)


def _invoke(call: Callable[[], object]) -> Deferred[object]:
    """Run a handler that may return a value, a Deferred or a coroutine."""
    try:
        result = call()
    except Exception:
        return fail()
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return succeed(result)


class _TxSession(Session):
    facade: Connection

    def __init__(
        self,
        clock: IReactorTime,
        core_: core.ClientCore,
        ready: _DeferredWaiter[None],
        handler: ServiceHandler | None,
        limits: ServiceLimits | None,
    ) -> None:
        super().__init__(core_, ready, handler, limits)
        self.clock = clock
        self.facade = Connection(self)
        self.transport: ITransport | None = None
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None

    def now(self) -> float:
        return self.clock.seconds()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def disconnect(self, abort: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        if abort and hasattr(transport, "abortConnection"):
            transport.abortConnection()
        else:
            transport.loseConnection()

    def set_timer(self, deadline: float | None) -> None:
        if deadline == self._timer_at:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.clock.callLater(max(0.0, deadline - self.now()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.on_timer()

    def spawn(self, call: Callable[[], object], done: Done) -> None:
        def failed(failure: Failure) -> None:
            done(None, failure.value)

        _invoke(call).addCallbacks(lambda result: done(result, None), failed)

    def warn(self, text: str, error: BaseException | None = None, **fields: object) -> None:
        if error is None:
            log.warn(text, **fields)
        else:
            failure = Failure(error)  # type: ignore[no-untyped-call]
            log.failure(text, failure, LogLevel.warn, **fields)

    def wrap_tunnel(self, end: TunnelEnd) -> Tunnel:
        return Tunnel(end, self.clock)


class _RelayProtocol(Protocol):
    """Only moves bytes and the socket's fate into the session."""

    def __init__(self, session: _TxSession) -> None:
        self.session = session

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        self.session.transport = transport
        self.session.connection_made()

    def dataReceived(self, data: bytes) -> None:
        self.session.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session.transport = None
        self.session.connection_lost(reason.getErrorMessage())


class _Once(ClientFactory):
    """Hands out the one protocol instance made for this connection attempt."""

    noisy = False

    def __init__(self, protocol: _RelayProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: IAddress | None) -> _RelayProtocol:
        return self.protocol_instance


class Tunnel:
    """An ordered, flow-controlled message stream to one member of a cluster.

    ``send`` waits for credit, ``recv`` for the next whole message. Messages
    received before the far side closed stay readable; after that ``recv``
    fails with ``ConnectionClosed``. Several concurrent ``send`` calls are fine:
    messages leave whole, one after another, in call order.
    """

    def __init__(self, end: TunnelEnd, clock: IReactorTime) -> None:
        self._end = end
        self._clock = clock

    @property
    def closed(self) -> bool:
        return self._end.closed

    @property
    def chunk_limit(self) -> int:
        return self._end.chunk_limit

    def send(self, message: bytes, timeout: float | None = None) -> Deferred[None]:
        """Fires once every chunk is on its way; ``timeout`` (seconds) bounds the wait for credit."""
        waiter = _DeferredWaiter[None]()
        try:
            self._end.send(message, timeout, waiter)
        except errors.IrisError as error:
            return fail(error)
        return waiter.deferred

    def recv(self, timeout: float | None = None) -> Deferred[bytes]:
        """The next message; ``Timeout`` after ``timeout`` seconds (``None``: wait forever)."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        waiter = _DeferredWaiter[bytes]()
        self._end.recv(waiter)
        if timeout is not None and waiter.pending():
            call = self._clock.callLater(
                timeout, waiter.reject, errors.Timeout("no message arrived in time")
            )
            waiter.deferred.addBoth(_cancelling(call))
        return waiter.deferred

    def close(self) -> Deferred[None]:
        """Close and wait for the node's acknowledgement.

        Fails with ``ConnectionClosed`` (carrying the reason) if the tunnel had
        already been broken by a failure rather than closed normally.
        """
        waiter = _DeferredWaiter[None]()
        self._end.close(waiter)
        return waiter.deferred


def _cancelling(call: IDelayedCall) -> Callable[[T], T]:
    def cancel(result: T) -> T:
        if call.active():
            call.cancel()
        return result

    return cancel


class Connection:
    """A connection to the local node; a service's connection is handed to ``init``."""

    def __init__(self, session: _TxSession) -> None:
        self._session = session

    @property
    def closed(self) -> bool:
        return self._session.core.state is core.State.CLOSED

    def request(self, cluster: str, request: bytes, timeout: float) -> Deferred[bytes]:
        """Ask one member of ``cluster``; fires with its reply (``b""`` is a valid reply).

        Fails with ``Timeout`` after ``timeout`` seconds (whole milliseconds, at
        least 1), ``RemoteFault`` if the service failed, ``ConnectionClosed``
        if the connection ends first.
        """
        waiter = _DeferredWaiter[bytes]()
        try:
            self._session.request(cluster, request, timeout, waiter)
        except errors.IrisError as error:
            return fail(error)
        return waiter.deferred

    def broadcast(self, cluster: str, message: bytes) -> None:
        """Deliver ``message`` to every member of ``cluster`` (best effort, no answer)."""
        self._session.broadcast(cluster, message)

    def subscribe(
        self,
        topic: str,
        handler: Callable[[bytes], object],
        limits: Limits | None = None,
    ) -> None:
        """Call ``handler(event)`` for each event published on ``topic``.

        The handler may return a Deferred or a coroutine; at most
        ``limits.handlers`` run at once. Refuses a second subscription to the same
        topic with ``ValueError`` (nothing is sent).
        """
        self._session.subscribe(topic, handler, limits)

    def unsubscribe(self, topic: str) -> None:
        """Stop the subscription; events not yet handled are dropped. ``ValueError`` if none."""
        self._session.unsubscribe(topic)

    def publish(self, topic: str, event: bytes) -> None:
        self._session.publish(topic, event)

    def tunnel(self, cluster: str, timeout: float) -> Deferred[Tunnel]:
        """Open a tunnel to one member of ``cluster``; ``Timeout`` if none takes it in time."""
        waiter = _DeferredWaiter[TunnelEnd]()
        try:
            self._session.open_tunnel(cluster, timeout, waiter)
        except errors.IrisError as error:
            return fail(error)
        clock = self._session.clock
        return waiter.deferred.addCallback(lambda end: Tunnel(end, clock))

    def close(self) -> Deferred[None]:
        """Close gracefully: fires once the node acknowledged (at once if already closed).

        Pending requests and tunnel operations then fail with ``ConnectionClosed``.
        """
        waiter = _DeferredWaiter[None]()
        self._session.close(waiter)
        return waiter.deferred


class ServiceHandler:
    """What a service implements; override the callbacks you need.

    Each callback may return a plain value, a Deferred or a coroutine. ``init``
    runs first: no request, broadcast or tunnel callback runs before it returned.
    """

    def init(self, connection: Connection) -> Deferred[None] | Awaitable[None] | None:
        """The connection is open; keep ``connection`` to make requests of your own."""

    def handle_request(
        self, request: bytes
    ) -> bytes | Deferred[bytes | None] | Awaitable[bytes | None] | None:
        """Return the reply (``None`` is an empty reply); raise to send a fault.

        The fault's text is ``str(exception)`` (its type name if that is empty).
        """
        raise NotImplementedError("this service does not handle requests")

    def handle_broadcast(self, message: bytes) -> Deferred[None] | Awaitable[None] | None:
        """A broadcast to the cluster (including ones this service sent itself)."""

    def handle_tunnel(self, tunnel: Tunnel) -> Deferred[None] | Awaitable[None] | None:
        """A remote party opened ``tunnel``; it may be used for as long as it lives."""
        return tunnel.close()

    def handle_drop(self, reason: str) -> Deferred[None] | Awaitable[None] | None:
        """The connection ended abnormally (never called after a graceful close)."""


class Service:
    """A registered member of a cluster; ``close`` unregisters it."""

    def __init__(self, connection: Connection, session: _TxSession) -> None:
        self.connection = connection
        self._session = session

    @property
    def stats(self) -> HandlerStats:
        """Inbound work dropped because of the handler limits."""
        return self._session.stats

    def close(self) -> Deferred[None]:
        return self.connection.close()


def connect(
    reactor: IReactorTCP,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    *,
    tunnel_window: int = core.DEFAULT_TUNNEL_WINDOW,
) -> Deferred[Connection]:
    """Connect as a plain client (it can send, but receives nothing unasked).

    Fails with ``ConnectionDenied`` if the node refuses the protocol version,
    ``ConnectionClosed`` if the node cannot be reached or hangs up.
    """
    session, started = _open(reactor, port, host, "", None, None, tunnel_window)
    return started.addCallback(lambda _: session.facade)


def register(
    reactor: IReactorTCP,
    cluster: str,
    handler: ServiceHandler,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    *,
    limits: ServiceLimits | None = None,
    tunnel_window: int = core.DEFAULT_TUNNEL_WINDOW,
) -> Deferred[Service]:
    """Connect as a member of ``cluster`` and run ``handler.init``; fires when both are done.

    If ``init`` fails, the connection is closed and the Deferred fails with its error.
    """
    if not isinstance(cluster, str) or not cluster:
        raise ValueError("empty cluster name")
    session, started = _open(reactor, port, host, cluster, handler, limits, tunnel_window)
    return started.addCallback(lambda _: Service(session.facade, session))


def _open(
    reactor: IReactorTCP,
    port: int,
    host: str,
    cluster: str,
    handler: ServiceHandler | None,
    limits: ServiceLimits | None,
    tunnel_window: int,
) -> tuple[_TxSession, Deferred[None]]:
    """Start connecting; the Deferred fires once the handshake (and ``init``) completed."""
    ready = _DeferredWaiter[None]()
    session = _TxSession(
        IReactorTime(reactor),
        core.ClientCore(cluster, tunnel_window=tunnel_window),
        ready,
        handler,
        limits,
    )

    def unreachable(failure: Failure) -> None:
        raise errors.ConnectionClosed(
            f"cannot reach the node at {host}:{port}: {failure.getErrorMessage()}"
        )

    attempt = HostnameEndpoint(reactor, host, port).connect(_Once(_RelayProtocol(session)))
    attempt.addErrback(unreachable)
    started: Deferred[None] = attempt.addCallback(lambda _: ready.deferred)
    return session, started
