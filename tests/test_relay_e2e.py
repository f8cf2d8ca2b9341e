"""A real node on loopback, spoken to in raw relay packets: every scheme and failure path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher

from irisnode.node import Node, NodeConfig
from relay import codec
from relay.codec import (
    Accepted,
    Broadcast,
    BroadcastDelivered,
    Close,
    Closed,
    Denied,
    Fault,
    Faulted,
    Init,
    Publish,
    Replied,
    Reply,
    Request,
    RequestDelivered,
    Subscribe,
    TimedOut,
    TunnelAllow,
    TunnelClose,
    TunnelClosed,
    TunnelConfirm,
    TunnelConfirmed,
    TunnelFailed,
    TunnelInit,
    TunnelOffered,
    TunnelTransfer,
)
from relay.server import RelayLimits
from tests.support import RawClient, raw_connect, reactor, wait_for

CHUNK = 65536


@pytest_twisted.async_yield_fixture
async def node() -> AsyncIterator[Node]:
    running = Node(reactor, NodeConfig(relay_port=0, relay_limits=RelayLimits()))
    running.start()
    yield running
    await running.stop()


@pytest.fixture
def log_events() -> Any:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# -- conformance: the spec's bytes, exactly ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_spec_section_13_bytes_on_the_wire(node: Node) -> None:
    service = await raw_connect(node.relay_port, None)
    service.send_raw(bytes.fromhex("00 11") + b"iris-client-magic" + b"\x0b" + b"v1.0-draft2")
    service.send_raw(bytes.fromhex("04 65 63 68 6f"))  # cluster "echo"
    expected_accept = bytes.fromhex("00 10") + b"iris-relay-magic" + b"\x0bv1.0-draft2"
    await wait_for(lambda: len(service.raw) >= 30)
    assert bytes(service.raw) == expected_accept
    assert len(expected_accept) == 30

    client = await raw_connect(node.relay_port, None)
    client.send_raw(bytes.fromhex("00 11") + b"iris-client-magic" + b"\x0bv1.0-draft2\x00")
    await wait_for(lambda: len(client.raw) >= 30)
    client.raw.clear()
    service.raw.clear()

    client.send_raw(bytes.fromhex("04 00 04 65 63 68 6f 02 68 69 e8 07"))  # §13.2
    await wait_for(lambda: len(service.raw) >= 7)
    assert service.raw[0] == 0x04 and service.raw[-5:] == bytes.fromhex("02 68 69 e8 07")
    node_id = service.raw[1:-5]
    service.send_raw(b"\x05" + node_id + bytes.fromhex("01 02 68 69"))
    await wait_for(lambda: len(client.raw) >= 6)
    assert bytes(client.raw) == bytes.fromhex("05 00 00 01 02 68 69")  # §13.3

    client.raw.clear()
    client.send_raw(bytes.fromhex("02"))  # §13.9
    await wait_for(lambda: client.closed)
    assert bytes(client.raw) == bytes.fromhex("02 00")


@pytest_twisted.ensureDeferred
async def test_unsupported_version_is_denied_with_the_spec_reason(node: Node) -> None:
    client = await raw_connect(node.relay_port, None)
    client.send(Init(version="v1.0-draft1"))
    assert await client.next() == Denied(
        "Unsupported protocol. Client: v1.0-draft1. Iris: v1.0-draft2."
    )
    await wait_for(lambda: client.closed)


# -- request / reply -------------------------------------------------------------------


async def serve_once(service: RawClient, answer: Any) -> RequestDelivered:
    delivered = await service.next()
    assert isinstance(delivered, RequestDelivered)
    service.send(answer(delivered.request_id))
    return delivered


@pytest_twisted.ensureDeferred
async def test_request_outcomes(node: Node) -> None:
    client = await raw_connect(node.relay_port)
    service = await raw_connect(node.relay_port, "echo")

    client.send(Request(1, "echo", b"hi", 1000))
    delivered = await serve_once(service, lambda i: Reply(i, b"ho"))
    assert (delivered.request, delivered.timeout_ms) == (b"hi", 1000)
    assert await client.next() == Replied(1, b"ho")

    client.send(Request(2, "echo", b"x", 1000))
    await serve_once(service, lambda i: Fault(i, "boom"))
    assert await client.next() == Faulted(2, "boom")

    client.send(Request(3, "echo", b"x", 1000))
    await serve_once(service, lambda i: Reply(i, b""))
    assert await client.next() == Replied(3, b"")

    client.send(Request(4, "echo", b"x", 1000))
    await serve_once(service, lambda i: Fault(i, ""))
    assert await client.next() == Faulted(4, "")


@pytest_twisted.ensureDeferred
async def test_request_timeouts(node: Node) -> None:
    client = await raw_connect(node.relay_port)
    service = await raw_connect(node.relay_port, "slow")

    started = reactor.seconds()
    client.send(Request(1, "slow", b"x", 100))
    delivered = await service.next()
    assert await client.next() == TimedOut(1)
    assert reactor.seconds() - started >= 0.099
    service.send(Reply(delivered.request_id, b"too late"))  # dropped quietly

    client.send(Request(2, "nobody", b"x", 100))
    assert await client.next() == TimedOut(2)

    client.send(Request(3, "slow", b"x", 0))
    assert await client.next() == TimedOut(3)
    assert service.packets == [] and not service.closed


@pytest_twisted.ensureDeferred
async def test_member_disconnecting_mid_request_gives_a_prompt_timeout(node: Node) -> None:
    client = await raw_connect(node.relay_port)
    service = await raw_connect(node.relay_port, "flaky")
    client.send(Request(9, "flaky", b"x", 60_000))
    await service.next()
    service.abort()
    assert await client.next(timeout=2.0) == TimedOut(9)


@pytest_twisted.ensureDeferred
async def test_requests_balanced_over_services(node: Node) -> None:
    client = await raw_connect(node.relay_port)
    services = [await raw_connect(node.relay_port, "pool") for _ in range(4)]
    for i in range(40):
        client.send(Request(i, "pool", b"x", 5000))
    await wait_for(lambda: sum(len(s.packets) for s in services) == 40)
    assert [len(s.packets) for s in services] == [10, 10, 10, 10]


# -- broadcast and publish ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_broadcast_reaches_all_members_once_including_sender(node: Node) -> None:
    members = [await raw_connect(node.relay_port, "crowd") for _ in range(3)]
    outsider = await raw_connect(node.relay_port, "elsewhere")
    members[0].send(Broadcast("crowd", b"hello all"))
    for member in members:
        assert await member.next() == BroadcastDelivered(b"hello all")
    client = await raw_connect(node.relay_port)
    client.send(Broadcast("crowd", b"second"))
    for member in members:
        assert await member.next() == BroadcastDelivered(b"second")
    assert outsider.packets == []
    assert all(m.packets == [] for m in members)


@pytest_twisted.ensureDeferred
async def test_publish_subscribe(node: Node) -> None:
    subscribers = [await raw_connect(node.relay_port) for _ in range(3)]
    for subscriber in subscribers:
        subscriber.send(Subscribe("news"))
    publisher = subscribers[0]
    await wait_for(lambda: node.broker.subscribers("news") == 3)
    publisher.send(Publish("news", b"extra!"))
    for subscriber in subscribers:
        assert await subscriber.next() == Publish("news", b"extra!")
    subscribers[1].send(codec.Unsubscribe("news"), codec.Unsubscribe("never-subscribed"))
    # Packets of different connections have no order: publish once the unsubscribe is in.
    await wait_for(lambda: node.broker.subscribers("news") == 2)
    publisher.send(Publish("news", b"again"))
    assert await subscribers[2].next() == Publish("news", b"again")
    assert await subscribers[0].next() == Publish("news", b"again")
    assert subscribers[1].packets == [] and not subscribers[1].closed


# -- tunnels -----------------------------------------------------------------------------


class RawTunnel:
    """One side of a tunnel over a RawClient, honouring the chunk limit and credit."""

    def __init__(self, client: RawClient, tunnel_id: int, window: int) -> None:
        self.client = client
        self.tunnel_id = tunnel_id
        self.credit = window
        self.received: list[bytes] = []
        self._partial = bytearray()
        self._size = 0

    def absorb(self) -> None:
        """Take this tunnel's packets out of the client's queue."""
        rest = []
        for packet in self.client.packets:
            if isinstance(packet, TunnelAllow) and packet.tunnel_id == self.tunnel_id:
                self.credit += packet.size
            elif isinstance(packet, TunnelTransfer) and packet.tunnel_id == self.tunnel_id:
                if packet.size_or_cont:
                    self._size = packet.size_or_cont
                    self._partial = bytearray()
                self._partial += packet.chunk
                if len(self._partial) == self._size:
                    self.received.append(bytes(self._partial))
                    self.client.send(TunnelAllow(self.tunnel_id, self._size))
            else:
                rest.append(packet)
        self.client.packets = rest

    async def send(self, message: bytes) -> None:
        for offset in range(0, len(message), CHUNK):
            chunk = message[offset : offset + CHUNK]

            def has_credit(chunk: bytes = chunk) -> bool:
                self.absorb()
                return self.credit >= len(chunk)

            await wait_for(has_credit, 10.0, "tunnel credit")
            self.credit -= len(chunk)
            size = len(message) if offset == 0 else 0
            self.client.send(TunnelTransfer(self.tunnel_id, size, chunk))

    async def recv(self) -> bytes:
        def arrived() -> bool:
            self.absorb()
            return bool(self.received)

        await wait_for(arrived, 10.0, "a tunnel message")
        return self.received.pop(0)


async def open_raw_tunnel(node: Node) -> tuple[RawTunnel, RawTunnel]:
    client = await raw_connect(node.relay_port)
    service = await raw_connect(node.relay_port, "tunnels")
    client.send(TunnelInit(1, "tunnels", 1000))
    offer = await service.next()
    assert offer == TunnelOffered(offer.build_id, CHUNK)
    service.send(TunnelConfirm(offer.build_id, 77), TunnelAllow(77, 64 << 20))
    assert await client.next() == TunnelConfirmed(1, CHUNK)
    assert await client.next() == TunnelAllow(1, 4 << 20)
    client.send(TunnelAllow(1, 64 << 20))
    assert await service.next() == TunnelAllow(77, 4 << 20)
    return RawTunnel(client, 1, 4 << 20), RawTunnel(service, 77, 4 << 20)


@pytest_twisted.ensureDeferred
async def test_tunnel_carries_10_mib_messages_both_ways_in_order(node: Node) -> None:
    near, far = await open_raw_tunnel(node)
    big = bytes(range(256)) * (10 * 4096)  # 10 MiB
    assert len(big) == 10 << 20
    small = [f"message {i}".encode() for i in range(20)]
    await near.send(big)
    for message in small:
        await near.send(message)
    assert await far.recv() == big
    assert [await far.recv() for _ in small] == small
    await far.send(big[::-1])
    assert await near.recv() == big[::-1]


@pytest_twisted.ensureDeferred
async def test_tunnel_close_acknowledged_and_unknown_close_answered(node: Node) -> None:
    near, far = await open_raw_tunnel(node)
    await near.send(b"last words")
    near.client.send(TunnelClose(1))
    assert await far.recv() == b"last words"
    assert await far.client.next() == TunnelClosed(77, "")
    await wait_for(lambda: near.client.packets)
    near.absorb()  # the grant for "last words" may come first
    assert await near.client.next() == TunnelClosed(1, "")
    near.client.send(TunnelClose(1))  # already closed: still answered
    assert await near.client.next() == TunnelClosed(1, "")


@pytest_twisted.ensureDeferred
async def test_tunnel_failures(node: Node) -> None:
    client = await raw_connect(node.relay_port)
    client.send(TunnelInit(5, "nobody", 100))
    assert await client.next() == TunnelFailed(5)

    service = await raw_connect(node.relay_port, "shy")
    client.send(TunnelInit(6, "shy", 200))
    assert isinstance(await service.next(), TunnelOffered)  # never confirmed
    assert await client.next() == TunnelFailed(6)
    assert not service.closed


# -- robustness ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_silent_client_does_not_block_others_and_times_out() -> None:
    limits = RelayLimits(handshake_seconds=0.3)
    node = Node(reactor, NodeConfig(relay_port=0, relay_limits=limits))
    node.start()
    try:
        silent = await raw_connect(node.relay_port, None)
        other = await raw_connect(node.relay_port)  # handshake completes at once
        assert not other.closed
        await wait_for(lambda: silent.closed, 2.0, "the silent client to be dropped")
        assert silent.raw == b""
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_garbage_after_handshake_drops_only_that_connection(
    node: Node, log_events: list[dict[str, Any]]
) -> None:
    victim = await raw_connect(node.relay_port, "svc")
    bystander = await raw_connect(node.relay_port, "svc")
    victim.send_raw(b"\xff\x00\x01garbage")
    assert await victim.next() == Closed("unknown opcode 0xff")
    await wait_for(lambda: victim.closed)
    reasons = [e.get("reason") for e in log_events if "reason" in e]
    assert "unknown opcode 0xff" in reasons
    bystander.send(Broadcast("svc", b"still here"))
    assert await bystander.next() == BroadcastDelivered(b"still here")


@pytest_twisted.ensureDeferred
async def test_hundred_concurrent_connects_and_graceful_closes(node: Node) -> None:
    base = node.broker.endpoints  # the node's own services are endpoints too
    clients = [await raw_connect(node.relay_port, None) for _ in range(100)]
    for client in clients:
        client.send(Init("many"))
    for client in clients:
        assert await client.next() == Accepted()
    await wait_for(lambda: node.broker.endpoints == base + 100)
    clients[0].send(Broadcast("many", b"x"))
    for client in clients:
        assert await client.next() == BroadcastDelivered(b"x")
    for client in clients:
        client.send(Close())
    for client in clients:
        assert await client.next() == Closed("")
    await wait_for(lambda: all(c.closed for c in clients))
    await wait_for(lambda: node.broker.endpoints == base and not node.relay.connections)


def _node_buffered_bytes(node: Node) -> int:
    total = 0
    for connection in node.relay.connections:
        transport: Any = connection.transport
        total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return total


@pytest_twisted.ensureDeferred
async def test_reader_that_stops_reading_stalls_the_sender_with_bounded_memory() -> None:
    limits = RelayLimits(high_water=256 * 1024, max_backlog=1 << 40)  # no dropping here
    node = Node(reactor, NodeConfig(relay_port=0, relay_limits=limits))
    node.start()
    try:
        sleeper = await raw_connect(node.relay_port)
        sleeper.send(Subscribe("firehose"))
        publisher = await raw_connect(node.relay_port)
        await wait_for(lambda: node.broker.subscribers("firehose") == 1)
        sleeper.transport.pauseProducing()  # type: ignore[union-attr]  # stop reading

        event = bytes(16 * 1024)
        sent = 0
        for _ in range(2000):  # 32 MiB in all
            publisher.send(Publish("firehose", event))
            sent += 1
        # The node must stop reading the publisher instead of buffering everything.
        await wait_for(lambda: node.relay.counters.paused_reads >= 1, 10.0, "a paused sender")
        publisher_transport: Any = publisher.transport
        await wait_for(
            lambda: (
                publisher_transport._tempDataLen + len(publisher_transport.dataBuffer) > 8 << 20
            ),
            10.0,
            "the publisher's own buffer to fill",
        )
        assert _node_buffered_bytes(node) < 4 << 20

        sleeper.transport.resumeProducing()  # type: ignore[union-attr]
        await wait_for(lambda: len(sleeper.packets) == sent, 30.0, "every event")
        assert all(p == Publish("firehose", event) for p in sleeper.packets)
        assert node.relay.counters.dropped_deliveries == 0
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_shutdown_answers_pending_requests_and_closes_clients() -> None:
    node = Node(reactor, NodeConfig(relay_port=0))
    node.start()
    client = await raw_connect(node.relay_port)
    service = await raw_connect(node.relay_port, "busy")
    client.send(Request(1, "busy", b"x", 60_000), Request(2, "nobody", b"x", 60_000))
    await service.next()
    started = reactor.seconds()
    await node.stop()
    assert reactor.seconds() - started < 1.0
    assert await client.take(3) == [TimedOut(1), TimedOut(2), Closed("node shutting down")]
    assert await service.next() == Closed("node shutting down")
    await wait_for(lambda: client.closed and service.closed)


# -- limits (docs/backpressure.md) --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_closing_a_tunnel_being_built_cancels_it(node: Node) -> None:
    client = await raw_connect(node.relay_port)
    service = await raw_connect(node.relay_port, "tunnels")
    client.send(TunnelInit(1, "tunnels", 1000))
    offer = await service.next()
    client.send(TunnelClose(1))
    assert await client.next() == TunnelClosed(1, "")
    service.send(TunnelConfirm(offer.build_id, 77), TunnelAllow(77, 1 << 20))
    assert await service.next() == TunnelClosed(77, "tunnel offer expired")
    client.send(TunnelInit(1, "tunnels", 1000))  # the id is free again, and works
    offer = await service.next()
    service.send(TunnelConfirm(offer.build_id, 78))
    assert await client.next() == TunnelConfirmed(1, CHUNK)
    assert not client.closed and not service.closed


@pytest_twisted.ensureDeferred
async def test_names_starting_with_a_dollar_are_the_nodes(node: Node) -> None:
    for name in ("$", "$foo", "$NODE.status", "\uff04node.status"):
        refused = await raw_connect(node.relay_port, None)
        refused.send(Init(name))
        denied = await refused.next()
        assert isinstance(denied, Denied) and "reserved" in denied.reason
        await refused.lost
    client = await raw_connect(node.relay_port)
    client.send(Request(1, "$node.nothing", b"", 60_000))
    assert await client.next() == Faulted(1, "no node service named '$node.nothing'")


@pytest_twisted.ensureDeferred
async def test_pending_status_requests_time_out_at_shutdown() -> None:
    node = Node(reactor, NodeConfig(relay_port=0))
    node.start()
    client = await raw_connect(node.relay_port)
    stopping: list[Deferred[None]] = []
    request = node.broker.request

    def request_then_stop(*args: Any) -> None:
        request(*args)
        if node.broker.counters["requests"] == 300:  # stop while answers are still queued
            stopping.append(Deferred.fromCoroutine(node.stop()))

    node.broker.request = request_then_stop  # type: ignore[method-assign,assignment]
    client.send(*[Request(i, "$node.status", b"", 60_000) for i in range(300)])
    await wait_for(lambda: stopping, what="the stop")
    await stopping[0]
    answers = await client.take(301)
    assert answers[-1] == Closed("node shutting down")
    kinds = {type(packet) for packet in answers[:-1]}
    assert kinds <= {Replied, TimedOut}  # never an internal error as a fault
    assert TimedOut in kinds


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_its_answers_is_not_read(node: Node) -> None:
    flooder = await raw_connect(node.relay_port)
    flooder.transport.pauseProducing()  # type: ignore[union-attr]  # stop reading
    batch = [Request(i, "$node.status", b"", 60_000) for i in range(200)]
    for _ in range(100):
        flooder.send(*batch)
    # Once the kernel's buffers are full, the answers wait in the node, and then the
    # node stops reading the flooder instead of answering more.
    (connection,) = await wait_for(
        lambda: [c for c in node.relay.connections if c.congested], 20.0, "a congested client"
    )
    assert connection._blockers > 0
    assert connection.backlog < 4 << 20
    bystander = await raw_connect(node.relay_port)
    bystander.send(Request(1, "$node.status", b"", 5000))
    assert isinstance(await bystander.next(), Replied)  # others are served meanwhile
