"""All three binding APIs against a real irisnode on loopback (port 0)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from irisnode.node import Node, NodeConfig
from relay.client import aioclient, blocking, errors, txclient
from tests.support import reactor, wait_for


@pytest_twisted.async_yield_fixture
async def node() -> AsyncIterator[Node]:
    running = Node(reactor, NodeConfig(relay_port=0))
    running.start()
    yield running
    await running.stop()


async def failure_of(deferred: Deferred[Any]) -> BaseException:
    try:
        result = await deferred
    except BaseException as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")


class Echo(txclient.ServiceHandler):
    """Echoes requests, records broadcasts, echoes every tunnel message back."""

    def __init__(self) -> None:
        self.broadcasts: list[bytes] = []
        self.drops: list[str] = []
        self.echoed = 0

    def handle_request(self, request: bytes) -> bytes:
        if request.startswith(b"fail:"):
            raise ValueError(request[5:].decode())
        return b"" if request == b"empty" else request

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.append(message)

    async def handle_tunnel(self, tunnel: txclient.Tunnel) -> None:
        while True:
            try:
                message = await tunnel.recv()
            except errors.ConnectionClosed:
                return
            await tunnel.send(message)
            self.echoed += 1

    def handle_drop(self, reason: str) -> None:
        self.drops.append(reason)


@pytest_twisted.ensureDeferred
async def test_twisted_request_broadcast_topics_and_tunnel(node: Node) -> None:
    echo = Echo()
    service = await txclient.register(reactor, "echo", echo, node.relay_port)
    conn = await txclient.connect(reactor, node.relay_port)

    assert await conn.request("echo", b"hello", 1.0) == b"hello"
    assert await conn.request("echo", b"empty", 1.0) == b""
    fault = await failure_of(conn.request("echo", b"fail:no such thing", 1.0))
    assert isinstance(fault, errors.RemoteFault) and str(fault) == "no such thing"
    nobody = await failure_of(conn.request("nobody", b"x", 0.05))
    assert isinstance(nobody, errors.Timeout)

    conn.broadcast("echo", b"to all")
    await wait_for(lambda: echo.broadcasts == [b"to all"])

    events: list[bytes] = []
    conn.subscribe("news", events.append)
    conn.publish("news", b"mine")  # processed after our own SUBSCRIBE
    await wait_for(lambda: events == [b"mine"])
    service.connection.publish("news", b"theirs")
    await wait_for(lambda: events == [b"mine", b"theirs"])

    tunnel = await conn.tunnel("echo", 1.0)
    big = bytes(range(256)) * 1000  # 256 000 bytes: four chunks each way
    await tunnel.send(big)
    await tunnel.send(b"small")
    assert await tunnel.recv(timeout=5.0) == big
    assert await tunnel.recv(timeout=5.0) == b"small"
    await tunnel.close()
    assert echo.echoed == 2

    await conn.close()
    await service.close()
    assert echo.drops == []  # graceful: no drop


@pytest_twisted.ensureDeferred
async def test_node_shutdown_is_a_drop_for_services_and_fails_pending_requests(
    node: Node,
) -> None:
    echo = Echo()
    await txclient.register(reactor, "echo", echo, node.relay_port)
    conn = await txclient.connect(reactor, node.relay_port)
    pending = conn.request("nobody", b"x", 30.0)
    await node.stop("maintenance")
    await wait_for(lambda: echo.drops)
    assert "maintenance" in echo.drops[0]
    error = await failure_of(pending)
    assert isinstance(error, errors.IrisError)  # timed out by the node, or closed: never hangs
    await wait_for(lambda: conn.closed)


class AsyncEcho(aioclient.ServiceHandler):
    async def handle_request(self, request: bytes) -> bytes:
        await asyncio.sleep(0)
        return request[::-1]

    async def handle_tunnel(self, tunnel: aioclient.Tunnel) -> None:
        async with tunnel:
            await tunnel.send(await tunnel.recv())


@pytest_twisted.ensureDeferred
async def test_asyncio_against_the_real_node(node: Node) -> None:
    port = node.relay_port

    async def scenario() -> tuple[bytes, bytes]:
        async with (
            await aioclient.register("rev", AsyncEcho(), port),
            await aioclient.connect(port) as conn,
        ):
            reply = await conn.request("rev", b"abc", 1.0)
            async with await conn.tunnel("rev", 1.0) as tunnel:
                await tunnel.send(b"x" * 100_000)
                echoed = await tunnel.recv(timeout=5.0)
            return reply, echoed

    reply, echoed = await Deferred.fromFuture(asyncio.ensure_future(scenario()))
    assert reply == b"cba"
    assert echoed == b"x" * 100_000


@pytest_twisted.ensureDeferred
async def test_blocking_against_the_real_node(node: Node) -> None:
    echo = Echo()
    service = await txclient.register(reactor, "echo", echo, node.relay_port)
    port = node.relay_port

    def script() -> tuple[bytes, str]:
        with blocking.connect(port) as conn:
            reply = conn.request("echo", b"from a script", 1.0)
            with pytest.raises(errors.RemoteFault) as fault:
                conn.request("echo", b"fail:bad input", 1.0)
            with conn.tunnel("echo", 1.0) as tunnel:
                tunnel.send(b"round trip")
                assert tunnel.recv(timeout=5.0) == b"round trip"
            return reply, str(fault.value)

    assert await deferToThread(script) == (b"from a script", "bad input")
    await service.close()


class BlockingEcho(blocking.ServiceHandler):
    def __init__(self) -> None:
        self.connection: blocking.BlockingConnection | None = None

    def init(self, connection: blocking.BlockingConnection) -> None:
        self.connection = connection
        connection.publish("started", b"echo")  # blocking calls work from callbacks

    def handle_request(self, request: bytes) -> bytes:
        return request.upper()

    def handle_tunnel(self, tunnel: blocking.BlockingTunnel) -> None:
        with tunnel:
            tunnel.send(tunnel.recv(timeout=5.0) * 2)


@pytest_twisted.ensureDeferred
async def test_a_blocking_service_and_client(node: Node) -> None:
    port = node.relay_port

    def script() -> tuple[bytes, bytes]:
        handler = BlockingEcho()
        with blocking.register("shout", handler, port), blocking.connect(port) as conn:
            assert handler.connection is not None
            reply = conn.request("shout", b"hey", 1.0)
            with conn.tunnel("shout", 1.0) as tunnel:
                tunnel.send(b"ab")
                doubled = tunnel.recv(timeout=5.0)
            return reply, doubled

    assert await deferToThread(script) == (b"HEY", b"abab")
