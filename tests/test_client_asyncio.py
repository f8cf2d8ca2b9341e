"""The asyncio bindings against the scripted fake node.

The test reactor runs on asyncio, so the client's coroutines run as asyncio
tasks on the same loop (:func:`aio`) while the test scripts the fake node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from relay import codec
from relay.client import aioclient, errors
from relay.client.pool import Limits
from tests.support import wait_for
from tests.test_client_fakenode import FakeNode, FakePeer, fake_node, free_port

__all__ = ["fake_node"]

T = TypeVar("T")


def aio(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    """Run an asyncio coroutine as a task on the reactor's loop."""
    return Deferred.fromFuture(asyncio.ensure_future(coroutine))


async def failure_of(deferred: Deferred[Any]) -> BaseException:
    try:
        result = await deferred
    except BaseException as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")


async def connected(node: FakeNode) -> tuple[aioclient.Connection, FakePeer]:
    connecting = aio(aioclient.connect(node.port))
    peer = await node.accept()
    await peer.handshake()
    return await connecting, peer


@pytest_twisted.ensureDeferred
async def test_request_round_trip_and_async_with_closes(fake_node: FakeNode) -> None:
    async def client() -> bytes:
        async with await aioclient.connect(fake_node.port) as conn:
            return await conn.request("echo", b"hi", 1.0)

    result = aio(client())
    peer = await fake_node.accept()
    await peer.handshake()
    peer.raw.clear()
    request = await peer.next(codec.Request)
    assert bytes(peer.raw) == bytes.fromhex("04 00 04 65 63 68 6f 02 68 69 e8 07")
    peer.send(codec.Replied(request.request_id, b"HI"))
    await peer.closed_by_binding()
    assert await result == b"HI"


@pytest_twisted.ensureDeferred
async def test_outcomes_are_typed_exceptions(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    timed_out = aio(conn.request("echo", b"x", 1.0))
    faulted = aio(conn.request("echo", b"x", 1.0))
    empty = aio(conn.request("echo", b"x", 1.0))
    dropped = aio(conn.request("echo", b"x", 1.0))
    for _ in range(4):
        await peer.next(codec.Request)
    peer.send(codec.TimedOut(0), codec.Faulted(1, "boom"), codec.Replied(2, b""))
    assert isinstance(await failure_of(timed_out), errors.Timeout)
    fault = await failure_of(faulted)
    assert isinstance(fault, errors.RemoteFault) and str(fault) == "boom"
    assert await empty == b""
    peer.drop()
    assert isinstance(await failure_of(dropped), errors.ConnectionClosed)
    with pytest.raises(errors.ConnectionClosed):
        await conn.publish("news", b"x")


@pytest_twisted.ensureDeferred
async def test_argument_errors_are_value_errors(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    with pytest.raises(ValueError, match="1 ms"):
        await conn.request("echo", b"x", 0)
    with pytest.raises(ValueError, match="empty cluster"):
        await conn.tunnel("", 1.0)
    await conn.publish("marker", b"m")
    assert await peer.next(codec.Publish) == codec.Publish("marker", b"m")


@pytest_twisted.ensureDeferred
async def test_a_cancelled_request_ignores_its_late_reply(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    task = asyncio.ensure_future(conn.request("echo", b"x", 5.0))
    first = await peer.next(codec.Request)
    task.cancel()
    await wait_for(task.done)
    peer.send(codec.Replied(first.request_id, b"too late"))
    again = aio(conn.request("echo", b"y", 5.0))
    second = await peer.next(codec.Request)
    peer.send(codec.Replied(second.request_id, b"fine"))
    assert await again == b"fine"


@pytest_twisted.ensureDeferred
async def test_denied_and_unreachable(fake_node: FakeNode) -> None:
    connecting = aio(aioclient.connect(fake_node.port))
    peer = await fake_node.accept()
    await peer.next(codec.Init)
    peer.send(codec.Denied("go away"))
    denied = await failure_of(connecting)
    assert isinstance(denied, errors.ConnectionDenied) and denied.reason == "go away"
    port = await free_port()
    assert isinstance(await failure_of(aio(aioclient.connect(port))), errors.ConnectionClosed)


@pytest_twisted.ensureDeferred
async def test_subscribe_with_an_async_handler(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    events: list[bytes] = []

    async def handler(event: bytes) -> None:
        await asyncio.sleep(0)
        events.append(event)

    await aio(conn.subscribe("news", handler, Limits(handlers=2)))
    assert await peer.next(codec.Subscribe) == codec.Subscribe("news")
    peer.send(codec.Publish("news", b"a"), codec.Publish("news", b"b"))
    await wait_for(lambda: len(events) == 2)
    assert sorted(events) == [b"a", b"b"]
    with pytest.raises(ValueError, match="already subscribed"):
        await conn.subscribe("news", handler)
    await aio(conn.unsubscribe("news"))
    assert await peer.next(codec.Unsubscribe) == codec.Unsubscribe("news")


class EchoService(aioclient.ServiceHandler):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.may_start = asyncio.Event()
        self.tunnels: list[aioclient.Tunnel] = []

    async def init(self, connection: aioclient.Connection) -> None:
        self.calls.append("init")
        await self.may_start.wait()
        self.calls.append("init done")

    async def handle_request(self, request: bytes) -> bytes:
        self.calls.append("request")
        if request == b"fail":
            raise ValueError("cannot do that")
        return request.upper()

    def handle_tunnel(self, tunnel: aioclient.Tunnel) -> None:
        self.calls.append("tunnel")
        self.tunnels.append(tunnel)

    def handle_drop(self, reason: str) -> None:
        self.calls.append(f"drop: {reason}")


@pytest_twisted.ensureDeferred
async def test_a_service_runs_nothing_before_its_async_init(fake_node: FakeNode) -> None:
    handler = EchoService()
    registering = aio(aioclient.register("echo", handler, fake_node.port))
    peer = await fake_node.accept()
    assert await peer.handshake() == codec.Init("echo")
    peer.send(codec.RequestDelivered(0, b"hi", 1000), codec.TunnelOffered(3))
    assert await peer.next(codec.TunnelConfirm) == codec.TunnelConfirm(3, 0)  # at once
    assert handler.calls == ["init"]
    handler.may_start.set()
    service = await registering
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(0, 64 << 20)
    assert await peer.next(codec.Reply) == codec.Reply(0, b"HI")
    assert handler.calls[:2] == ["init", "init done"]
    assert sorted(handler.calls[2:]) == ["request", "tunnel"]
    peer.send(codec.RequestDelivered(1, b"fail", 1000))
    assert await peer.next(codec.Fault) == codec.Fault(1, "cannot do that")
    peer.send(codec.Closed("maintenance"))
    await wait_for(lambda: handler.calls[-1] == "drop: maintenance")
    assert service.connection.closed


@pytest_twisted.ensureDeferred
async def test_graceful_unregister_does_not_report_a_drop(fake_node: FakeNode) -> None:
    handler = EchoService()
    handler.may_start.set()

    async def serve() -> None:
        async with await aioclient.register("echo", handler, fake_node.port):
            pass

    serving = aio(serve())
    peer = await fake_node.accept()
    await peer.handshake()
    await peer.closed_by_binding()
    await serving
    assert handler.calls == ["init", "init done"]


@pytest_twisted.ensureDeferred
async def test_tunnels(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    waiting_for_two = asyncio.Event()

    async def client() -> list[bytes]:
        received = []
        async with await conn.tunnel("echo", 1.0) as tunnel:
            await tunnel.send(b"x" * 10)
            received.append(await tunnel.recv(timeout=5.0))
            with pytest.raises(errors.Timeout):
                await tunnel.recv(timeout=0.01)
            # A reader that gave up must not swallow the next message.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(tunnel.recv(), 0.01)
            waiting_for_two.set()
            received.append(await tunnel.recv(timeout=5.0))
        assert tunnel.closed
        return received

    result = aio(client())
    init = await peer.next(codec.TunnelInit)
    assert init == codec.TunnelInit(0, "echo", 1000)
    peer.send(codec.TunnelConfirmed(0, 4), codec.TunnelAllow(0, 100))
    await peer.next(codec.TunnelAllow)
    chunks = [await peer.next(codec.TunnelTransfer) for _ in range(3)]
    assert chunks == [
        codec.TunnelTransfer(0, 10, b"xxxx"),
        codec.TunnelTransfer(0, 0, b"xxxx"),
        codec.TunnelTransfer(0, 0, b"xx"),
    ]
    peer.send(codec.TunnelTransfer(0, 3, b"one"))
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(0, 3)
    await wait_for(waiting_for_two.is_set)
    peer.send(codec.TunnelTransfer(0, 3, b"two"))
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(0, 3)
    assert await peer.next(codec.TunnelClose) == codec.TunnelClose(0)
    peer.send(codec.TunnelClosed(0, ""))
    assert await result == [b"one", b"two"]


@pytest_twisted.ensureDeferred
async def test_a_tunnel_confirmed_after_the_caller_gave_up_is_closed(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    task = asyncio.ensure_future(conn.tunnel("echo", 5.0))
    init = await peer.next(codec.TunnelInit)
    task.cancel()
    await wait_for(task.done)
    peer.send(codec.TunnelConfirmed(init.tunnel_id))
    await peer.next(codec.TunnelAllow)
    assert await peer.next(codec.TunnelClose) == codec.TunnelClose(init.tunnel_id)
