"""The relay bindings for asyncio: the Twisted API's shape, with ``async def``.

::

    async with await connect(port=55555) as conn:
        reply = await conn.request("echo", b"hi", timeout=1.0)

Pure asyncio (a :class:`asyncio.Protocol` over the shared session); no Twisted
reactor is involved. Argument mistakes raise :class:`ValueError` /
:class:`TypeError` before anything is sent; outcomes on the wire are the
exceptions of :mod:`relay.client.errors`. Cancelling a waiting call withdraws
it (a reply arriving later is ignored; a tunnel confirmed later is closed).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, TypeVar

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

log = logging.getLogger("relay.client")

T = TypeVar("T")


class _FutureWaiter(Generic[T]):
    """A Future as the session's waiter; cancelling the Future withdraws it."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[T] = loop.create_future()

    def pending(self) -> bool:
        return not self.future.done()

    def resolve(self, value: T) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def reject(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class _AioSession(Session):
    facade: Connection

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        core_: core.ClientCore,
        ready: _FutureWaiter[None],
        handler: ServiceHandler | None,
        limits: ServiceLimits | None,
    ) -> None:
        super().__init__(core_, ready, handler, limits)
        self.loop = loop
        self.facade = Connection(self)
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Future[object]] = set()
        self._writable: asyncio.Future[None] | None = None

    def now(self) -> float:
        return self.loop.time()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def disconnect(self, abort: bool) -> None:
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def set_timer(self, deadline: float | None) -> None:
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.on_timer()

    def spawn(self, call: Callable[[], object], done: Done) -> None:
        try:
            result = call()
        except Exception as error:
            done(None, error)
            return
        if not inspect.isawaitable(result):
            done(result, None)
            return
        task: asyncio.Future[object] = asyncio.ensure_future(result, loop=self.loop)
        self._tasks.add(task)  # a running handler must not be garbage-collected

        def finished(task: asyncio.Future[object]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                done(None, asyncio.CancelledError())
            elif (error := task.exception()) is not None:
                done(None, error)
            else:
                done(task.result(), None)

        task.add_done_callback(finished)

    def warn(self, text: str, error: BaseException | None = None, **fields: object) -> None:
        exc_info = (type(error), error, error.__traceback__) if error is not None else None
        log.warning(text.format_map(fields), exc_info=exc_info, extra={"iris": fields})

    def wrap_tunnel(self, end: TunnelEnd) -> Tunnel:
        return Tunnel(end)

    async def writable(self) -> None:
        """Wait while the socket's buffer is over its high-water mark."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set_result(None)
            self._writable = None


class _RelayProtocol(asyncio.Protocol):
    """Only moves bytes, flow control and the socket's fate into the session."""

    def __init__(self, session: _AioSession) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.session.transport = transport
        self.session.connection_made()

    def data_received(self, data: bytes) -> None:
        self.session.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.transport = None
        self.session.resume_writing()
        self.session.connection_lost(str(exc) if exc else "connection closed by the node")

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class Tunnel:
    """An ordered, flow-controlled message stream to one member of a cluster.

    ``send`` waits for credit, ``recv`` for the next whole message. Messages
    received before the far side closed stay readable; after that ``recv``
    raises ``ConnectionClosed``. Concurrent ``send`` calls are fine: messages
    leave whole, one after another, in call order. ``async with`` closes it.
    """

    def __init__(self, end: TunnelEnd) -> None:
        self._end = end

    @property
    def closed(self) -> bool:
        return self._end.closed

    @property
    def chunk_limit(self) -> int:
        return self._end.chunk_limit

    async def send(self, message: bytes, timeout: float | None = None) -> None:
        """Return once every chunk is on its way; ``timeout`` (seconds) bounds the wait for credit."""
        session = self._end.session
        assert isinstance(session, _AioSession)
        waiter = _FutureWaiter[None](session.loop)
        self._end.send(message, timeout, waiter)
        await waiter.future
        await session.writable()

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next message; ``Timeout`` after ``timeout`` seconds (``None``: wait forever)."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        session = self._end.session
        assert isinstance(session, _AioSession)
        waiter = _FutureWaiter[bytes](session.loop)
        self._end.recv(waiter)
        try:
            return await asyncio.wait_for(waiter.future, timeout)
        except TimeoutError:
            raise errors.Timeout("no message arrived in time") from None

    async def close(self) -> None:
        """Close and wait for the node's acknowledgement.

        Raises ``ConnectionClosed`` (carrying the reason) if the tunnel had
        already been broken by a failure rather than closed normally.
        """
        session = self._end.session
        assert isinstance(session, _AioSession)
        waiter = _FutureWaiter[None](session.loop)
        self._end.close(waiter)
        await waiter.future

    async def __aenter__(self) -> Tunnel:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class Connection:
    """A connection to the local node; a service's connection is handed to ``init``.

    ``async with`` closes it gracefully.
    """

    def __init__(self, session: _AioSession) -> None:
        self._session = session

    @property
    def closed(self) -> bool:
        return self._session.core.state is core.State.CLOSED

    async def request(self, cluster: str, request: bytes, timeout: float) -> bytes:
        """Ask one member of ``cluster``; returns its reply (``b""`` is a valid reply).

        Raises ``Timeout`` after ``timeout`` seconds (whole milliseconds, at least
        1), ``RemoteFault`` if the service failed, ``ConnectionClosed`` if the
        connection ends first.
        """
        waiter = _FutureWaiter[bytes](self._session.loop)
        self._session.request(cluster, request, timeout, waiter)
        return await waiter.future

    async def broadcast(self, cluster: str, message: bytes) -> None:
        """Deliver ``message`` to every member of ``cluster`` (best effort, no answer)."""
        self._session.broadcast(cluster, message)
        await self._session.writable()

    async def subscribe(
        self,
        topic: str,
        handler: Callable[[bytes], object],
        limits: Limits | None = None,
    ) -> None:
        """Call ``handler(event)`` (plain or ``async``) for each event published on ``topic``.

        At most ``limits.handlers`` run at once. Refuses a second subscription to
        the same topic with ``ValueError`` (nothing is sent).
        """
        self._session.subscribe(topic, handler, limits)
        await self._session.writable()

    async def unsubscribe(self, topic: str) -> None:
        """Stop the subscription; events not yet handled are dropped. ``ValueError`` if none."""
        self._session.unsubscribe(topic)
        await self._session.writable()

    async def publish(self, topic: str, event: bytes) -> None:
        self._session.publish(topic, event)
        await self._session.writable()

    async def tunnel(self, cluster: str, timeout: float) -> Tunnel:
        """Open a tunnel to one member of ``cluster``; ``Timeout`` if none takes it in time."""
        waiter = _FutureWaiter[TunnelEnd](self._session.loop)
        self._session.open_tunnel(cluster, timeout, waiter)
        return Tunnel(await waiter.future)

    async def close(self) -> None:
        """Close gracefully: returns once the node acknowledged (at once if already closed).

        Pending requests and tunnel operations then fail with ``ConnectionClosed``.
        """
        waiter = _FutureWaiter[None](self._session.loop)
        self._session.close(waiter)
        await waiter.future

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class ServiceHandler:
    """What a service implements; override the callbacks you need.

    Each callback may be a plain function or a coroutine function. ``init``
    runs first: no request, broadcast or tunnel callback runs before it returned.
    """

    def init(self, connection: Connection) -> Awaitable[None] | None:
        """The connection is open; keep ``connection`` to make requests of your own."""

    def handle_request(self, request: bytes) -> bytes | Awaitable[bytes | None] | None:
        """Return the reply (``None`` is an empty reply); raise to send a fault.

        The fault's text is ``str(exception)`` (its type name if that is empty).
        """
        raise NotImplementedError("this service does not handle requests")

    def handle_broadcast(self, message: bytes) -> Awaitable[None] | None:
        """A broadcast to the cluster (including ones this service sent itself)."""

    def handle_tunnel(self, tunnel: Tunnel) -> Awaitable[None] | None:
        """A remote party opened ``tunnel``; it may be used for as long as it lives."""
        return tunnel.close()

    def handle_drop(self, reason: str) -> Awaitable[None] | None:
        """The connection ended abnormally (never called after a graceful close)."""


class Service:
    """A registered member of a cluster; ``close`` (or leaving ``async with``) unregisters it."""

    def __init__(self, session: _AioSession) -> None:
        self.connection = session.facade
        self._session = session

    @property
    def stats(self) -> HandlerStats:
        """Inbound work dropped because of the handler limits."""
        return self._session.stats

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def connect(
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    *,
    tunnel_window: int = core.DEFAULT_TUNNEL_WINDOW,
) -> Connection:
    """Connect as a plain client (it can send, but receives nothing unasked).

    Raises ``ConnectionDenied`` if the node refuses the protocol version,
    ``ConnectionClosed`` if the node cannot be reached or hangs up.
    """
    session = await _open(port, host, "", None, None, tunnel_window)
    return session.facade


async def register(
    cluster: str,
    handler: ServiceHandler,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    *,
    limits: ServiceLimits | None = None,
    tunnel_window: int = core.DEFAULT_TUNNEL_WINDOW,
) -> Service:
    """Connect as a member of ``cluster`` and run ``handler.init``; returns when both are done.

    If ``init`` fails, the connection is closed and its error is raised.
    """
    if not isinstance(cluster, str) or not cluster:
        raise ValueError("empty cluster name")
    return Service(await _open(port, host, cluster, handler, limits, tunnel_window))


async def _open(
    port: int,
    host: str,
    cluster: str,
    handler: ServiceHandler | None,
    limits: ServiceLimits | None,
    tunnel_window: int,
) -> _AioSession:
    loop = asyncio.get_running_loop()
    ready = _FutureWaiter[None](loop)
    session = _AioSession(
        loop, core.ClientCore(cluster, tunnel_window=tunnel_window), ready, handler, limits
    )
    try:
        await loop.create_connection(lambda: _RelayProtocol(session), host, port)
    except OSError as error:
        raise errors.ConnectionClosed(f"cannot reach the node at {host}:{port}: {error}") from error
    try:
        await ready.future
    except asyncio.CancelledError:
        session.disconnect(abort=True)
        raise
    return session
