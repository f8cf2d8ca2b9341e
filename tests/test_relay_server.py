"""The relay's Twisted adapter over in-memory transports and a fake clock: no sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from irisnode.broker import Broker
from relay import codec
from relay.server import RelayConnection, RelayFactory, RelayLimits


class Harness:
    def __init__(self, **limits: Any) -> None:
        self.clock = MemoryReactorClock()
        self.broker = Broker()
        self.factory = RelayFactory(self.broker, self.clock, RelayLimits(**limits))

    def connect(self, cluster: str | None = "") -> tuple[RelayConnection, Any]:
        connection = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
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
    sleeper_transport.producer = sleeper  # StringTransport keeps what registerProducer gave
    # The client stops reading: pretend its transport holds more than the high-water mark.
    sleeper_transport.bufferSize = 0
    sleeper_transport._tempDataLen = 5000
    sleeper_transport.dataBuffer = b""
    sleeper_transport.offset = 0
    sleeper.pauseProducing()
    assert sleeper.congested
    sender.dataReceived(codec.Broadcast("g", b"payload").encode())
    assert sender_transport.producerState == "paused"
    assert harness.factory.counters.paused_reads == 1
    sleeper.resumeProducing()  # the client caught up
    assert not sleeper.congested
    assert sender_transport.producerState == "producing"


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
