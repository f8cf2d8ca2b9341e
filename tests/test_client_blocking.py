"""The blocking facade: scripts run in a worker thread while the fake node answers."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from relay import codec
from relay.client import blocking, errors
from tests.support import wait_for
from tests.test_client_fakenode import FakeNode, fake_node

__all__ = ["fake_node"]


@pytest_twisted.ensureDeferred
async def test_a_script_requests_publishes_and_closes(fake_node: FakeNode) -> None:
    def script() -> tuple[bytes, type[BaseException]]:
        with blocking.connect(fake_node.port) as conn:
            reply = conn.request("echo", b"hi", 1.0)
            conn.publish("news", b"done")
            conn.broadcast("echo", b"all")
            try:
                conn.request("echo", b"again", 1.0)
            except errors.IrisError as error:
                return reply, type(error)
        raise AssertionError("the second request should have failed")

    result = deferToThread(script)
    peer = await fake_node.accept()
    await peer.handshake()
    request = await peer.next(codec.Request)
    assert request == codec.Request(0, "echo", b"hi", 1000)
    peer.send(codec.Replied(0, b"HI"))
    assert await peer.next(codec.Publish) == codec.Publish("news", b"done")
    assert await peer.next(codec.Broadcast) == codec.Broadcast("echo", b"all")
    await peer.next(codec.Request)
    peer.send(codec.TimedOut(1))
    await peer.closed_by_binding()
    assert await result == (b"HI", errors.Timeout)


@pytest_twisted.ensureDeferred
async def test_callbacks_run_in_worker_threads_and_may_call_back(fake_node: FakeNode) -> None:
    seen: list[tuple[bytes, str]] = []
    got_event = threading.Event()
    may_close = threading.Event()

    def script() -> None:
        with blocking.connect(fake_node.port) as conn:

            def on_event(event: bytes) -> None:
                seen.append((event, threading.current_thread().name))
                conn.publish("answers", event.upper())  # blocking call from inside a callback
                got_event.set()

            conn.subscribe("questions", on_event)
            got_event.wait(5.0)
            may_close.wait(5.0)

    result = deferToThread(script)
    peer = await fake_node.accept()
    await peer.handshake()
    assert await peer.next(codec.Subscribe) == codec.Subscribe("questions")
    peer.send(codec.Publish("questions", b"why"))
    assert await peer.next(codec.Publish) == codec.Publish("answers", b"WHY")
    may_close.set()
    await peer.closed_by_binding()
    await result
    assert seen[0][0] == b"why"
    assert seen[0][1].startswith("iris-callback")


@pytest_twisted.ensureDeferred
async def test_a_blocking_tunnel(fake_node: FakeNode) -> None:
    def script() -> bytes:
        with blocking.connect(fake_node.port) as conn, conn.tunnel("echo", 1.0) as tunnel:
            tunnel.send(b"ping")
            return tunnel.recv(timeout=5.0)

    result = deferToThread(script)
    peer = await fake_node.accept()
    await peer.handshake()
    init = await peer.next(codec.TunnelInit)
    peer.send(codec.TunnelConfirmed(init.tunnel_id), codec.TunnelAllow(init.tunnel_id, 10))
    await peer.next(codec.TunnelAllow)
    assert await peer.next(codec.TunnelTransfer) == codec.TunnelTransfer(0, 4, b"ping")
    peer.send(codec.TunnelTransfer(0, 4, b"pong"))
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(0, 4)
    assert await peer.next(codec.TunnelClose) == codec.TunnelClose(0)
    peer.send(codec.TunnelClosed(0, ""))
    await peer.closed_by_binding()
    assert await result == b"pong"


@pytest_twisted.ensureDeferred
async def test_connect_failures_raise_and_leave_no_thread_behind(fake_node: FakeNode) -> None:
    before = {t.name for t in threading.enumerate()}

    def script() -> Any:
        with pytest.raises(errors.ConnectionDenied, match="too old"):
            blocking.connect(fake_node.port)

    result = deferToThread(script)
    peer = await fake_node.accept()
    await peer.next(codec.Init)
    peer.send(codec.Denied("too old"))
    await result
    await wait_for(lambda: "iris-client" not in {t.name for t in threading.enumerate()} - before)
