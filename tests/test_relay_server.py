"""The relay's Twisted adapter over in-memory transports and a fake clock: no sockets."""

from __future__ import annotations

import sys
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher

from irisnode.api import is_reserved
from irisnode.broker import Broker
from irisnode.limits import MessagingLimits
from overlay.timer import DeadlineTimer
from relay import codec
from relay.server import RelayConnection, RelayFactory, RelayLimits


class Harness:
    def __init__(self, messaging: MessagingLimits | None = None, **limits: Any) -> None:
        self.clock = MemoryReactorClock()
        self.timer = DeadlineTimer(self.clock, self._on_timer)
        self.broker = Broker(messaging, wake=self.timer.wake)
        self.factory = RelayFactory(
            self.broker,
            self.clock,
            RelayLimits(**limits),
            request_budget=self.broker.request_budget,
            reserved=is_reserved,
        )

    def _on_timer(self, now: float) -> float | None:
        self.broker.on_timer(now)
        return self.broker.next_deadline()

    def connect(self, cluster: str | None = "") -> tuple[RelayConnection, Any]:
        connection = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert connection is not None
        transport: Any = StringTransport()
        connection.makeConnection(transport)
        if cluster is not None:
            connection.dataReceived(codec.Init(cluster).encode())
            self.turn()
            assert self.read(transport) == [codec.Accepted()]
        return connection, transport

    def turn(self) -> None:
        """End the reactor turn: gathered writes go out."""
        self.clock.advance(0)

    @staticmethod
    def read(transport: StringTransport) -> list[object]:
        data = transport.value()
        transport.clear()
        return list(codec.client_decoder().feed(data))


def test_handshake_deadline_on_the_clock() -> None:
    harness = Harness(handshake_seconds=5.0)
    _, transport = harness.connect(None)
    harness.clock.advance(4.9)
    assert not transport.disconnecting
    harness.clock.advance(0.2)
    assert transport.disconnecting
    assert harness.factory.counters.drops == 1


def test_completed_handshake_cancels_the_deadline() -> None:
    harness = Harness(handshake_seconds=5.0)
    _, transport = harness.connect("svc")
    assert harness.clock.getDelayedCalls() == []
    harness.clock.advance(10)
    assert not transport.disconnecting
    assert harness.factory.counters.handshakes == 1


def test_writes_of_one_turn_leave_together() -> None:
    harness = Harness()
    _service, service_transport = harness.connect("svc")
    clients = [harness.connect() for _ in range(3)]
    for i, (client, _) in enumerate(clients):
        client.dataReceived(codec.Request(i, "svc", b"x", 1000).encode())
    assert service_transport.value() == b""  # nothing is written mid-turn...
    harness.turn()
    delivered = harness.read(service_transport)  # ...then all of it at once
    assert [type(p) for p in delivered] == [codec.RequestDelivered] * 3


def test_congested_reader_pauses_whoever_writes_to_it() -> None:
    harness = Harness(high_water=1000)
    sleeper, sleeper_transport = harness.connect("g")
    sender, sender_transport = harness.connect()
    sleeper.pauseProducing()  # what a TCP transport says when the client stops reading
    sender.dataReceived(codec.Broadcast("g", bytes(2000)).encode())
    assert sleeper.congested
    assert sender_transport.producerState == "paused"  # its input wrote to a congested one
    assert sleeper_transport.producerState == "paused"  # and the laggard adds no input either
    assert harness.factory.counters.paused_reads == 2
    harness.turn()
    assert sleeper.congested and sleeper.backlog > 2000  # the transport still holds it all
    sleeper.resumeProducing()  # the transport drained: the client caught up
    assert not sleeper.congested
    assert sender_transport.producerState == "producing"
    assert sleeper_transport.producerState == "producing"


def test_writes_from_a_timer_count_and_pause_the_laggard_itself() -> None:
    harness = Harness(high_water=1000)
    flooder, transport = harness.connect()
    flooder.pauseProducing()  # it does not read what it is sent
    flooder.dataReceived(b"".join(codec.Request(i, "nobody", b"", 1).encode() for i in range(300)))
    harness.turn()
    assert transport.producerState == "producing"  # nothing written to it yet
    harness.clock.advance(0.002)  # 500 timeouts, written by the broker's timer: no reader
    assert flooder.congested
    assert transport.producerState == "paused"


def test_a_connection_that_catches_up_within_the_turn_is_not_congested() -> None:
    harness = Harness(high_water=1000)
    member, member_transport = harness.connect("g")
    sender, sender_transport = harness.connect()
    sender.dataReceived(codec.Broadcast("g", bytes(2000)).encode())
    assert member.congested  # 2000 bytes queued this turn
    harness.turn()  # the transport took it all without saying it is full
    assert not member.congested
    assert sender_transport.producerState == "producing"
    assert member_transport.producerState == "producing"


def test_protocol_error_is_logged_counted_and_only_that_connection_closes() -> None:
    harness = Harness()
    bad, bad_transport = harness.connect("svc")
    good, good_transport = harness.connect("svc")
    bad.dataReceived(b"\x42")
    harness.turn()
    assert harness.read(bad_transport) == [codec.Closed("unknown opcode 0x42")]
    assert bad_transport.disconnecting
    assert not good_transport.disconnecting
    assert harness.factory.counters.drops == 1
    good.dataReceived(codec.Broadcast("svc", b"hi").encode())
    harness.turn()
    assert harness.read(good_transport) == [codec.BroadcastDelivered(b"hi")]


def test_shutdown_says_goodbye_and_closes() -> None:
    harness = Harness()
    _, transport = harness.connect("svc")
    harness.factory.shut_down("node shutting down")
    assert harness.read(transport) == [codec.Closed("node shutting down")]
    assert transport.disconnecting


# -- node-wide budgets, deadlines and the connection cap -----------------------------------


def test_a_packet_that_does_not_fit_the_partial_budget_waits_for_room() -> None:
    harness = Harness(max_partial_bytes=150_000)
    first, first_transport = harness.connect()
    second, second_transport = harness.connect()
    big = codec.Publish("t", bytes(100_000)).encode()
    first.dataReceived(big[:1000])
    assert harness.factory.partial_budget.used == len(big)  # its whole size, before it arrives
    second.dataReceived(big[:1000])
    assert second_transport.producerState == "paused"  # 200,000 would not fit
    assert harness.factory.partial_budget.used == len(big)
    first.dataReceived(big[1000:])
    assert harness.factory.partial_budget.used == 0
    assert second_transport.producerState == "producing"  # its turn
    second.dataReceived(big[1000:])
    assert harness.factory.partial_budget.used == 0
    assert first_transport.producerState == "producing"


def test_requesters_beyond_their_share_are_not_read_while_the_request_budget_is_spent() -> None:
    harness = Harness(MessagingLimits(max_request_bytes=10_000, max_timeout_ms=500))
    client, transport = harness.connect()
    other, other_transport = harness.connect()
    third, third_transport = harness.connect()
    client.dataReceived(
        b"".join(codec.Request(i, "nobody", bytes(3000), 60_000).encode() for i in range(4))
    )
    assert harness.broker.request_budget.spent
    assert transport.producerState == "paused"
    # Another client still gets its share (10,000 / 2), even for a request still arriving...
    other.dataReceived(codec.Request(1, "nobody", bytes(3000), 60_000).encode()[:100])
    assert other_transport.producerState == "producing"
    # ...but not more than that share (10,000 / 3 now): that one waits for room.
    third.dataReceived(codec.Request(1, "nobody", bytes(4000), 60_000).encode()[:100])
    assert third_transport.producerState == "paused"
    harness.clock.advance(0.5)  # the node's longest timeout: the requests end
    harness.turn()
    assert transport.producerState == "producing"
    assert third_transport.producerState == "producing"
    assert [type(p) for p in harness.read(transport)] == [codec.TimedOut] * 4


def test_no_packet_deadline_while_the_node_is_not_reading() -> None:
    harness = Harness(high_water=1000, packet_seconds=10.0)
    sleeper, _ = harness.connect("g")
    sender, sender_transport = harness.connect()
    sleeper.pauseProducing()
    sender.dataReceived(codec.Broadcast("g", bytes(2000)).encode() + b"\x03\x01")  # + a partial
    assert sender_transport.producerState == "paused"
    harness.turn()
    harness.clock.advance(60)
    assert not sender_transport.disconnecting  # we are not reading it: not its fault
    sleeper.resumeProducing()
    harness.clock.advance(9.9)
    assert not sender_transport.disconnecting
    harness.clock.advance(0.2)
    assert sender_transport.disconnecting
    assert harness.read(sender_transport) == [
        codec.Closed("a packet took more than 10 s to arrive")
    ]


def test_connections_beyond_the_cap_are_refused_with_one_log_line_a_second() -> None:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        harness = Harness(max_connections=3)
        for _ in range(3):
            harness.connect()
        refused = [harness.factory.buildProtocol(None) for _ in range(50)]
        assert refused == [None] * 50
        harness.clock.advance(0.5)
        refused = [harness.factory.buildProtocol(None) for _ in range(50)]
        harness.clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [e for e in events if e.get("log_namespace") == "irisnode.relay"]
    assert [e["count"] for e in lines] == [1, 99]
    assert harness.factory.counters.refused_connections == 100


def test_no_fan_out_payload_outlives_its_turn() -> None:
    harness = Harness()
    members = [harness.connect("g") for _ in range(3)]
    payload = bytes(range(256)) * 4
    alone = sys.getrefcount(payload)
    harness.broker.broadcast("g", payload)  # one object to every member, encoded once
    assert sys.getrefcount(payload) > alone  # kept while the fan-out's turn lasts...
    harness.turn()
    assert sys.getrefcount(payload) == alone  # ...and not a moment longer
    for _, transport in members:
        assert harness.read(transport) == [codec.BroadcastDelivered(payload)]


def test_a_connection_gets_its_share_of_a_turn_and_the_rest_later() -> None:
    harness = Harness(packets_per_turn=100)
    _, echo_transport = harness.connect("echo")
    flooder, flooder_transport = harness.connect()
    other, _ = harness.connect()
    flooder.dataReceived(
        b"".join(codec.Request(i, "echo", b"%d" % i, 5000).encode() for i in range(250))
    )
    assert harness.broker.counters["requests"] == 100  # its share of this turn
    assert flooder_transport.producerState == "paused"  # no more reading until the rest is done
    other.dataReceived(codec.Request(1, "echo", b"other", 5000).encode())
    harness.turn()  # (the fake clock runs every later turn at once)
    delivered = [cast(codec.RequestDelivered, p).request for p in harness.read(echo_transport)]
    assert delivered == [b"%d" % i for i in range(100)] + [b"other"] + [
        b"%d" % i for i in range(100, 250)
    ]
    assert flooder_transport.producerState == "producing"
    assert harness.factory.counters.paused_reads == 0  # a fair share is not a pause
