"""A blocking facade for scripts: plain calls that return when the work is done.

::

    with connect(55555) as conn:
        print(conn.request("echo", b"hi", timeout=1.0))

Each connection runs the asyncio bindings on a private event loop in a
background thread; the calls here hand coroutines to that loop and wait.
Callbacks (topic handlers, service handlers) run in that connection's pool of
worker threads, so they may block and may call back into the connection. Errors
are those of :mod:`relay.client.errors`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from relay.client import aioclient, core
from relay.client._session import HandlerStats
from relay.client.pool import Limits, ServiceLimits

__all__ = [
    "BlockingConnection",
    "BlockingService",
    "BlockingTunnel",
    "ServiceHandler",
    "connect",
    "register",
]

T = TypeVar("T")

CALLBACK_THREADS = 64
"""Worker threads per connection; a tunnel handler holds one for the tunnel's lifetime."""


class _LoopThread:
    """A private event loop running in a daemon thread until :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix="iris-callback")
        self.loop.set_default_executor(self.executor)
        self._thread = threading.Thread(target=self._run, name="iris-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("blocking calls cannot be made from the client's own loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def in_worker(self, call: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run a blocking callback in the worker pool, as an awaitable for the loop."""
        return self.loop.run_in_executor(None, call, *args)

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()
                self.loop.close()
        self.executor.shutdown(wait=False)


class BlockingTunnel:
    """A tunnel whose calls block; ``with`` closes it."""

    def __init__(self, runner: _LoopThread, tunnel: aioclient.Tunnel) -> None:
        self._runner = runner
        self._tunnel = tunnel

    @property
    def closed(self) -> bool:
        return self._tunnel.closed

    def send(self, message: bytes, timeout: float | None = None) -> None:
        self._runner.run(self._tunnel.send(message, timeout))

    def recv(self, timeout: float | None = None) -> bytes:
        return self._runner.run(self._tunnel.recv(timeout))

    def close(self) -> None:
        self._runner.run(self._tunnel.close())

    def __enter__(self) -> BlockingTunnel:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class BlockingConnection:
    """A client connection whose calls block; ``with`` (or :meth:`close`) ends it."""

    def __init__(self, runner: _LoopThread, connection: aioclient.Connection) -> None:
        self._runner = runner
        self._connection = connection

    @property
    def closed(self) -> bool:
        return self._connection.closed

    def request(self, cluster: str, request: bytes, timeout: float) -> bytes:
        return self._runner.run(self._connection.request(cluster, request, timeout))

    def broadcast(self, cluster: str, message: bytes) -> None:
        self._runner.run(self._connection.broadcast(cluster, message))

    def publish(self, topic: str, event: bytes) -> None:
        self._runner.run(self._connection.publish(topic, event))

    def subscribe(
        self, topic: str, callback: Callable[[bytes], object], limits: Limits | None = None
    ) -> None:
        """Call ``callback(event)`` in a worker thread for every event on ``topic``."""
        if not callable(callback):
            raise TypeError("the subscription callback must be callable")
        runner = self._runner
        handle = functools.partial(runner.in_worker, callback)
        runner.run(self._connection.subscribe(topic, handle, limits))

    def unsubscribe(self, topic: str) -> None:
        self._runner.run(self._connection.unsubscribe(topic))

    def tunnel(self, cluster: str, timeout: float) -> BlockingTunnel:
        return BlockingTunnel(
            self._runner, self._runner.run(self._connection.tunnel(cluster, timeout))
        )

    def close(self) -> None:
        """Close gracefully and stop the background thread; safe to call twice."""
        try:
            if not self._runner.loop.is_closed():
                self._runner.run(self._connection.close())
        finally:
            self._runner.stop()

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def connect(
    port: int = aioclient.DEFAULT_PORT,
    host: str = "127.0.0.1",
    *,
    tunnel_window: int = core.DEFAULT_TUNNEL_WINDOW,
) -> BlockingConnection:
    """Connect as a plain client; raises like :func:`relay.client.aioclient.connect`."""
    runner = _LoopThread()
    try:
        connection = runner.run(aioclient.connect(port, host, tunnel_window=tunnel_window))
    except BaseException:
        runner.stop()
        raise
    return BlockingConnection(runner, connection)


class ServiceHandler:
    """What a blocking service implements; every callback runs in a worker thread.

    ``init`` runs first: no request, broadcast or tunnel callback runs before it
    returned. ``handle_tunnel`` may block for the tunnel's whole life.
    """

    def init(self, connection: BlockingConnection) -> None:
        """The connection is open; keep ``connection`` to make requests of your own."""

    def handle_request(self, request: bytes) -> bytes | None:
        """Return the reply (``None`` is an empty reply); raise to send a fault.

        The fault's text is ``str(exception)`` (its type name if that is empty).
        """
        raise NotImplementedError("this service does not handle requests")

    def handle_broadcast(self, message: bytes) -> None:
        """A broadcast to the cluster (including ones this service sent itself)."""

    def handle_tunnel(self, tunnel: BlockingTunnel) -> None:
        """A remote party opened ``tunnel``."""
        tunnel.close()

    def handle_drop(self, reason: str) -> None:
        """The connection ended abnormally (never called after a graceful close)."""


class _Bridge(aioclient.ServiceHandler):
    """Hands each asyncio callback to the blocking handler in a worker thread."""

    def __init__(self, runner: _LoopThread, handler: ServiceHandler) -> None:
        self._runner = runner
        self._handler = handler

    def init(self, connection: aioclient.Connection) -> Awaitable[None]:
        blocking_connection = BlockingConnection(self._runner, connection)
        return self._runner.in_worker(self._handler.init, blocking_connection)

    def handle_request(self, request: bytes) -> Awaitable[bytes | None]:
        return self._runner.in_worker(self._handler.handle_request, request)

    def handle_broadcast(self, message: bytes) -> Awaitable[None]:
        return self._runner.in_worker(self._handler.handle_broadcast, message)

    def handle_tunnel(self, tunnel: aioclient.Tunnel) -> Awaitable[None]:
        blocking_tunnel = BlockingTunnel(self._runner, tunnel)
        return self._runner.in_worker(self._handler.handle_tunnel, blocking_tunnel)

    def handle_drop(self, reason: str) -> Awaitable[None]:
        return self._runner.in_worker(self._handler.handle_drop, reason)


class BlockingService:
    """A registered member of a cluster; ``with`` (or :meth:`close`) unregisters it."""

    def __init__(self, runner: _LoopThread, service: aioclient.Service) -> None:
        self.connection = BlockingConnection(runner, service.connection)
        self._service = service

    @property
    def stats(self) -> HandlerStats:
        """Inbound work dropped because of the handler limits."""
        return self._service.stats

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> BlockingService:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def register(
    cluster: str,
    handler: ServiceHandler,
    port: int = aioclient.DEFAULT_PORT,
    host: str = "127.0.0.1",
    *,
    limits: ServiceLimits | None = None,
    tunnel_window: int = core.DEFAULT_TUNNEL_WINDOW,
) -> BlockingService:
    """Connect as a member of ``cluster`` and run ``handler.init``; returns when both are done."""
    runner = _LoopThread()
    bridge = _Bridge(runner, handler)
    try:
        service = runner.run(
            aioclient.register(
                cluster, bridge, port, host, limits=limits, tunnel_window=tunnel_window
            )
        )
    except BaseException:
        runner.stop()
        raise
    return BlockingService(runner, service)
