"""The Twisted bindings against a scripted fake node on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher

from relay import codec
from relay.client import errors, txclient
from relay.client.pool import Limits, ServiceLimits
from tests.support import reactor, wait_for
from tests.test_client_fakenode import FakeNode, FakePeer, fake_node, free_port

__all__ = ["fake_node"]  # the fixture, imported for pytest


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def hx(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


async def connected(node: FakeNode) -> tuple[txclient.Connection, FakePeer]:
    connecting = txclient.connect(reactor, node.port)
    peer = await node.accept()
    await peer.handshake()
    return await connecting, peer


async def failure_of(deferred: Deferred[Any]) -> BaseException:
    try:
        result = await deferred
    except BaseException as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")


class Recorder(txclient.ServiceHandler):
    """Remembers every callback in order; requests are answered by ``reply``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.connection: txclient.Connection | None = None
        self.init_done: Deferred[None] | None = None
        self.reply: Any = lambda request: request.upper()
        self.tunnels: list[txclient.Tunnel] = []

    def init(self, connection: txclient.Connection) -> Deferred[None] | None:
        self.calls.append(("init", None))
        self.connection = connection
        return self.init_done

    def handle_request(self, request: bytes) -> Any:
        self.calls.append(("request", request))
        return self.reply(request)

    def handle_broadcast(self, message: bytes) -> None:
        self.calls.append(("broadcast", message))

    def handle_tunnel(self, tunnel: txclient.Tunnel) -> None:
        self.calls.append(("tunnel", tunnel.chunk_limit))
        self.tunnels.append(tunnel)

    def handle_drop(self, reason: str) -> None:
        self.calls.append(("drop", reason))


async def registered(
    node: FakeNode, handler: Recorder, limits: ServiceLimits | None = None
) -> tuple[txclient.Service, FakePeer]:
    registering = txclient.register(reactor, "echo", handler, node.port, limits=limits)
    peer = await node.accept()
    assert await peer.handshake() == codec.Init("echo")
    return await registering, peer


# ---- connecting --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_round_trip_puts_the_spec_bytes_on_the_wire(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    assert bytes(peer.raw) == hx(
        "00 | 11 69 72 69 73 2d 63 6c 69 65 6e 74 2d 6d 61 67 69 63"
        " | 0b 76 31 2e 30 2d 64 72 61 66 74 32 | 00"
    )
    peer.raw.clear()
    pending = conn.request("echo", b"hi", 1.0)
    await peer.next(codec.Request)
    assert bytes(peer.raw) == hx("04 | 00 | 04 65 63 68 6f | 02 68 69 | e8 07")
    peer.send_raw(hx("05 | 00 | 00 | 01 | 02 68 69"))
    assert await pending == b"hi"
    closing = conn.close()
    await peer.closed_by_binding()
    await closing
    assert conn.closed


@pytest_twisted.ensureDeferred
async def test_each_request_outcome_has_its_own_type(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    replies = [conn.request("echo", b"x", 1.0) for _ in range(3)]
    for _ in replies:
        await peer.next(codec.Request)
    peer.send(codec.TimedOut(0), codec.Faulted(1, "boom"), codec.Replied(2, b""))
    timeout = await failure_of(replies[0])
    assert isinstance(timeout, errors.Timeout) and isinstance(timeout, TimeoutError)
    fault = await failure_of(replies[1])
    assert isinstance(fault, errors.RemoteFault)
    assert str(fault) == "boom" and fault.fault == "boom"
    assert await replies[2] == b""  # an empty reply is a success


@pytest_twisted.ensureDeferred
async def test_argument_errors_raise_at_once_and_send_nothing(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    with pytest.raises(ValueError, match="empty cluster"):
        conn.request("", b"x", 1.0)
    with pytest.raises(ValueError, match="1 ms"):
        conn.request("echo", b"x", 0.0001)
    with pytest.raises(ValueError, match="empty message"):
        conn.broadcast("echo", b"")
    conn.publish("marker", b"m")  # the first thing the node sees must be this
    assert await peer.next(codec.Publish) == codec.Publish("marker", b"m")


@pytest_twisted.ensureDeferred
async def test_late_and_unknown_replies_do_not_disturb_the_connection(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    peer.send(codec.Replied(41, b"stray"), codec.TimedOut(42))
    pending = conn.request("echo", b"x", 1.0)
    request = await peer.next(codec.Request)
    peer.send(codec.Replied(request.request_id, b"ok"))
    assert await pending == b"ok"


@pytest_twisted.ensureDeferred
async def test_denial_is_connection_denied_with_the_reason(fake_node: FakeNode) -> None:
    connecting = txclient.connect(reactor, fake_node.port)
    peer = await fake_node.accept()
    await peer.next(codec.Init)
    peer.send(codec.Denied("Unsupported protocol. Client: x. Iris: v1.0-draft2."))
    denied = await failure_of(connecting)
    assert isinstance(denied, errors.ConnectionDenied)
    assert denied.reason == "Unsupported protocol. Client: x. Iris: v1.0-draft2."
    await peer.wait_lost()


@pytest_twisted.ensureDeferred
async def test_a_garbled_acceptance_is_a_protocol_violation(fake_node: FakeNode) -> None:
    connecting = txclient.connect(reactor, fake_node.port)
    peer = await fake_node.accept()
    await peer.next(codec.Init)
    peer.send(codec.Accepted(magic="iris-bogus-magic"))
    assert isinstance(await failure_of(connecting), errors.ProtocolViolation)
    await peer.wait_lost()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_node_is_connection_closed() -> None:
    port = await free_port()
    error = await failure_of(txclient.connect(reactor, port))
    assert isinstance(error, errors.ConnectionClosed)
    assert f"127.0.0.1:{port}" in str(error)


@pytest_twisted.ensureDeferred
async def test_pending_operations_fail_when_the_node_hangs_up(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    pending = conn.request("echo", b"x", 10.0)
    opening = conn.tunnel("echo", 10.0)
    await peer.next(codec.Request)
    await peer.next(codec.TunnelInit)
    peer.drop()
    assert isinstance(await failure_of(pending), errors.ConnectionClosed)
    assert isinstance(await failure_of(opening), errors.ConnectionClosed)
    assert conn.closed
    with pytest.raises(errors.ConnectionClosed):
        conn.publish("news", b"x")
    assert isinstance(await failure_of(conn.request("echo", b"x", 1.0)), errors.ConnectionClosed)
    await conn.close()  # closing a closed connection is fine, and immediate


@pytest_twisted.ensureDeferred
async def test_graceful_close_fails_pending_requests_with_closed(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    pending = conn.request("echo", b"x", 10.0)
    await peer.next(codec.Request)
    closing = conn.close()
    await peer.closed_by_binding()
    await closing
    assert isinstance(await failure_of(pending), errors.ConnectionClosed)


# ---- topics ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_subscriptions(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    events: list[bytes] = []
    conn.subscribe("news", events.append)
    assert await peer.next(codec.Subscribe) == codec.Subscribe("news")
    peer.send(codec.Publish("news", b"one"), codec.Publish("sport", b"not ours"))
    await wait_for(lambda: events)
    assert events == [b"one"]
    with pytest.raises(ValueError, match="already subscribed"):
        conn.subscribe("news", events.append)
    with pytest.raises(ValueError, match="not subscribed"):
        conn.unsubscribe("sport")
    conn.unsubscribe("news")
    # Neither refusal reached the node (spec B3): the UNSUBSCRIBE comes next.
    assert await peer.next(codec.Unsubscribe) == codec.Unsubscribe("news")


@pytest_twisted.ensureDeferred
async def test_a_failing_event_handler_is_logged_and_the_next_event_still_runs(
    fake_node: FakeNode, log_events: list[dict[str, Any]]
) -> None:
    conn, peer = await connected(fake_node)
    seen: list[bytes] = []

    def handler(event: bytes) -> None:
        seen.append(event)
        raise RuntimeError("handler bug")

    conn.subscribe("news", handler)
    await peer.next(codec.Subscribe)
    peer.send(codec.Publish("news", b"a"), codec.Publish("news", b"b"))
    await wait_for(lambda: len(seen) == 2)
    failures = [e for e in log_events if e.get("topic") == "news" and "log_failure" in e]
    assert len(failures) == 2
    assert failures[0]["log_failure"].value.args == ("handler bug",)
    failures[0]["log_failure"].cleanFailure()


# ---- services --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nothing_reaches_the_handler_before_init_returns(fake_node: FakeNode) -> None:
    handler = Recorder()
    handler.init_done = Deferred()
    registering = txclient.register(reactor, "echo", handler, fake_node.port)
    services: list[txclient.Service] = []

    def keep(service: txclient.Service) -> txclient.Service:
        services.append(service)
        return service

    registering.addCallback(keep)
    peer = await fake_node.accept()
    await peer.handshake()
    peer.send(codec.RequestDelivered(0, b"hi", 1000), codec.TunnelOffered(7, 1000))
    # The offer is confirmed and granted at once, although init is still running (B9, B10).
    assert await peer.next(codec.TunnelConfirm) == codec.TunnelConfirm(7, 0)
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(0, 64 * 1024 * 1024)
    assert handler.calls == [("init", None)]
    assert services == []
    handler.init_done.callback(None)
    service = await registering
    assert service.connection is handler.connection
    assert await peer.next(codec.Reply) == codec.Reply(0, b"HI")
    assert handler.calls == [("init", None), ("request", b"hi"), ("tunnel", 1000)]


@pytest_twisted.ensureDeferred
async def test_a_failing_init_closes_the_connection_and_fails_register(
    fake_node: FakeNode,
) -> None:
    handler = Recorder()
    handler.init_done = Deferred()
    registering = txclient.register(reactor, "echo", handler, fake_node.port)
    peer = await fake_node.accept()
    await peer.handshake()
    handler.init_done.errback(RuntimeError("no database"))
    error = await failure_of(registering)
    assert isinstance(error, RuntimeError) and str(error) == "no database"
    await peer.closed_by_binding()
    assert [name for name, _ in handler.calls] == ["init"]  # no drop: we closed it ourselves


@pytest_twisted.ensureDeferred
async def test_handler_results_become_replies_and_faults(fake_node: FakeNode) -> None:
    handler = Recorder()
    outcomes: dict[bytes, Any] = {
        b"plain": lambda: b"done",
        b"none": lambda: None,
        b"deferred": lambda: Deferred.fromCoroutine(_later(b"deferred")),
        b"raise": lambda: _raise(KeyError("missing key")),
        b"empty": lambda: _raise(RuntimeError()),
        b"str": lambda: "not bytes",
    }
    handler.reply = lambda request: outcomes[request]()
    service, peer = await registered(fake_node, handler)
    for request_id, request in enumerate(outcomes):
        peer.send(codec.RequestDelivered(request_id, request, 1000))
    answers = {}
    for _ in outcomes:
        packet = await peer.next_any()
        assert isinstance(packet, codec.Reply | codec.Fault)
        answers[packet.request_id] = packet
    assert answers == {
        0: codec.Reply(0, b"done"),
        1: codec.Reply(1, b""),
        2: codec.Reply(2, b"deferred"),
        3: codec.Fault(3, "'missing key'"),  # str(KeyError) is the fault text
        4: codec.Fault(4, "RuntimeError"),  # never an empty fault (it would become a timeout)
        5: codec.Fault(5, "reply must be bytes, got str"),
    }
    closing = service.close()
    await peer.closed_by_binding()
    await closing


async def _later(value: bytes) -> bytes:
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.001)
    return value


def _raise(error: BaseException) -> bytes:
    raise error


@pytest_twisted.ensureDeferred
async def test_handler_limits_drop_what_does_not_fit_and_count_it(fake_node: FakeNode) -> None:
    handler = Recorder()
    gates: list[Deferred[bytes]] = []

    def slow(request: bytes) -> Deferred[bytes]:
        gates.append(Deferred())
        return gates[-1]

    handler.reply = slow
    limits = ServiceLimits(requests=Limits(handlers=1, memory=4))
    service, peer = await registered(fake_node, handler, limits)
    peer.send(
        codec.RequestDelivered(0, b"aaaa", 5000),
        codec.RequestDelivered(1, b"bbbb", 5000),  # waits: 4 of 4 bytes
        codec.RequestDelivered(2, b"c", 5000),  # does not fit: dropped, never answered
    )
    await wait_for(lambda: service.stats.requests_dropped == 1)
    assert [call for call in handler.calls if call[0] == "request"] == [("request", b"aaaa")]
    gates[0].callback(b"A")
    assert await peer.next(codec.Reply) == codec.Reply(0, b"A")
    await wait_for(lambda: len(gates) == 2)
    gates[1].callback(b"B")
    assert await peer.next(codec.Reply) == codec.Reply(1, b"B")
    assert service.stats.requests_dropped == 1


@pytest_twisted.ensureDeferred
async def test_a_request_that_expired_while_queued_is_never_run(fake_node: FakeNode) -> None:
    handler = Recorder()
    gate: Deferred[bytes] = Deferred()
    handler.reply = lambda request: gate if request == b"first" else request
    limits = ServiceLimits(requests=Limits(handlers=1))
    service, peer = await registered(fake_node, handler, limits)
    peer.send(codec.RequestDelivered(0, b"first", 5000), codec.RequestDelivered(1, b"short", 1))
    await wait_for(lambda: handler.calls[-1] == ("request", b"first"))
    passed = reactor.seconds() + 0.005
    await wait_for(lambda: reactor.seconds() > passed, what="the second request's 1 ms budget")
    gate.callback(b"F")
    assert await peer.next(codec.Reply) == codec.Reply(0, b"F")
    await wait_for(lambda: service.stats.requests_expired == 1)
    assert ("request", b"short") not in handler.calls


@pytest_twisted.ensureDeferred
async def test_broadcasts_reach_the_handler(fake_node: FakeNode) -> None:
    handler = Recorder()
    service, peer = await registered(fake_node, handler)
    service.connection.broadcast("echo", b"hey")
    assert await peer.next(codec.Broadcast) == codec.Broadcast("echo", b"hey")
    peer.send_raw(hx("03 | 03 68 65 79"))
    await wait_for(lambda: ("broadcast", b"hey") in handler.calls)


@pytest_twisted.ensureDeferred
async def test_drop_is_reported_only_for_abnormal_ends(fake_node: FakeNode) -> None:
    graceful = Recorder()
    service, peer = await registered(fake_node, graceful)
    closing = service.close()
    await peer.closed_by_binding()
    await closing
    assert [name for name, _ in graceful.calls] == ["init"]

    dropped = Recorder()
    service, peer = await registered(fake_node, dropped)
    peer.send(codec.Closed("node is shutting down"))
    await wait_for(lambda: len(dropped.calls) == 2)
    assert dropped.calls[1] == ("drop", "node is shutting down")
    assert service.connection.closed


# ---- tunnels ---------------------------------------------------------------------------------------


async def opened_tunnel(
    conn: txclient.Connection, peer: FakePeer, chunk_limit: int = 65536, credit: int = 4 << 20
) -> tuple[txclient.Tunnel, int]:
    opening = conn.tunnel("echo", 1.0)
    init = await peer.next(codec.TunnelInit)
    peer.send(codec.TunnelConfirmed(init.tunnel_id, chunk_limit))
    tunnel = await opening
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(init.tunnel_id, 64 << 20)
    if credit:
        peer.send(codec.TunnelAllow(init.tunnel_id, credit))
    return tunnel, init.tunnel_id


@pytest_twisted.ensureDeferred
async def test_tunnel_send_recv_close(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    tunnel, tid = await opened_tunnel(conn, peer)
    assert tid == 0
    await tunnel.send(b"abc")
    assert await peer.next(codec.TunnelTransfer) == codec.TunnelTransfer(0, 3, b"abc")
    assert bytes(peer.raw).endswith(hx("0c | 00 | 03 | 03 61 62 63"))
    peer.send(codec.TunnelTransfer(0, 5, b"hel"), codec.TunnelTransfer(0, 0, b"lo"))
    assert await tunnel.recv(timeout=5.0) == b"hello"
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(0, 5)  # granted back on use
    timed_out = await failure_of(tunnel.recv(timeout=0.01))
    assert isinstance(timed_out, errors.Timeout)
    closing = tunnel.close()
    assert await peer.next(codec.TunnelClose) == codec.TunnelClose(0)
    peer.send(codec.TunnelClosed(0, ""))
    await closing
    assert tunnel.closed
    assert isinstance(await failure_of(tunnel.send(b"x")), errors.ConnectionClosed)


@pytest_twisted.ensureDeferred
async def test_tunnel_send_waits_for_credit_and_times_out(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    tunnel, tid = await opened_tunnel(conn, peer, chunk_limit=4, credit=0)
    sending = tunnel.send(b"abcdef")
    peer.send(codec.TunnelAllow(tid, 4))
    assert await peer.next(codec.TunnelTransfer) == codec.TunnelTransfer(tid, 6, b"abcd")
    assert not sending.called
    peer.send(codec.TunnelAllow(tid, 2))
    assert await peer.next(codec.TunnelTransfer) == codec.TunnelTransfer(tid, 0, b"ef")
    await sending
    stuck = await failure_of(tunnel.send(b"no credit left", timeout=0.02))
    assert isinstance(stuck, errors.Timeout)


@pytest_twisted.ensureDeferred
async def test_a_broken_tunnel_keeps_its_buffered_messages_then_reports_the_reason(
    fake_node: FakeNode,
) -> None:
    conn, peer = await connected(fake_node)
    tunnel, tid = await opened_tunnel(conn, peer)
    waiting = tunnel.recv()
    peer.send(codec.TunnelTransfer(tid, 1, b"a"), codec.TunnelTransfer(tid, 1, b"b"))
    peer.send(codec.TunnelClosed(tid, "link failed"))
    assert await waiting == b"a"
    await wait_for(lambda: tunnel.closed)
    assert await tunnel.recv() == b"b"
    error = await failure_of(tunnel.recv())
    assert isinstance(error, errors.ConnectionClosed) and error.reason == "link failed"
    closing = await failure_of(tunnel.close())
    assert isinstance(closing, errors.ConnectionClosed) and "link failed" in str(closing)


@pytest_twisted.ensureDeferred
async def test_tunnels_end_quietly_on_a_graceful_close(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    tunnel, _ = await opened_tunnel(conn, peer)
    waiting = tunnel.recv()
    closing = conn.close()
    await peer.closed_by_binding()
    await closing
    assert isinstance(await failure_of(waiting), errors.ConnectionClosed)
    await tunnel.close()  # succeeds: not "connection dropped" (B11)


@pytest_twisted.ensureDeferred
async def test_tunnel_set_up_failure_is_a_timeout(fake_node: FakeNode) -> None:
    conn, peer = await connected(fake_node)
    opening = conn.tunnel("nobody", 0.5)
    init = await peer.next(codec.TunnelInit)
    assert init == codec.TunnelInit(0, "nobody", 500)
    peer.send(codec.TunnelFailed(init.tunnel_id))
    assert isinstance(await failure_of(opening), errors.Timeout)


@pytest_twisted.ensureDeferred
async def test_an_inbound_tunnel_carries_data_both_ways(fake_node: FakeNode) -> None:
    handler = Recorder()
    _, peer = await registered(fake_node, handler)
    peer.send_raw(hx("09 | 07 | 80 80 04"))
    assert bytes(await _raw_after(peer, 2)) == hx("0a | 07 | 00") + hx("0b | 00 | 80 80 80 20")
    await wait_for(lambda: handler.tunnels)
    tunnel = handler.tunnels[0]
    peer.send(codec.TunnelAllow(0, 100), codec.TunnelTransfer(0, 4, b"ping"))
    assert await tunnel.recv() == b"ping"
    await tunnel.send(b"pong")
    assert await peer.next(codec.TunnelAllow) == codec.TunnelAllow(0, 4)
    assert await peer.next(codec.TunnelTransfer) == codec.TunnelTransfer(0, 4, b"pong")


async def _raw_after(peer: FakePeer, packets: int) -> bytes:
    """The raw bytes of the next ``packets`` packets (after the handshake's)."""
    start = len(codec.Init("echo").encode())
    await wait_for(lambda: len(peer.packets) >= packets)
    peer.packets.clear()
    return bytes(peer.raw[start:])
