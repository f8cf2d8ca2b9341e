"""Relay sessions and the broker as pure cores: bytes in, bytes out, time passed by hand."""

from __future__ import annotations

from typing import Any

import pytest

from irisnode.api import TUNNEL_WINDOW, is_reserved
from irisnode.broker import Broker
from irisnode.limits import MessagingLimits
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
    Unsubscribe,
)
from relay.session import RelaySession, State


class FakeWire:
    """Collects what a session writes and how it ends."""

    def __init__(self) -> None:
        self.decoder = codec.client_decoder()
        self.received: list[Any] = []
        self.closed = False
        self.aborted: str | None = None
        self.congested = False
        self.overloaded = False
        self.drops: list[str] = []

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.received += self.decoder.feed(data)

    def close(self) -> None:
        self.closed = True

    def abort(self, reason: str) -> None:
        self.aborted = reason
        self.closed = True

    def drop_delivery(self, kind: str) -> None:
        self.drops.append(kind)

    def take(self) -> list[Any]:
        out, self.received = self.received, []
        return out


class Harness:
    def __init__(self, limits: MessagingLimits | None = None) -> None:
        self.now = 1000.0
        self.broker = Broker(limits)

    def connect(self, cluster: str | None = "", **options: Any) -> tuple[RelaySession, FakeWire]:
        wire = FakeWire()
        options.setdefault("reserved", is_reserved)  # as the node composes it
        session = RelaySession(self.broker, wire, self.now, **options)
        if cluster is not None:
            self.send(session, Init(cluster))
            assert wire.take() == [Accepted()]
        return session, wire

    def send(self, session: RelaySession, *packets: Any) -> None:
        session.data_received(b"".join(p.encode() for p in packets), self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.broker.on_timer(self.now)


@pytest.fixture
def harness() -> Harness:
    return Harness()


# -- handshake ------------------------------------------------------------------------


def test_handshake_accepts_client_and_service(harness: Harness) -> None:
    client, _ = harness.connect("")
    service, _ = harness.connect("echo")
    assert client.state is State.OPEN
    assert service.cluster == "echo"


def test_wrong_version_is_denied(harness: Harness) -> None:
    session, wire = harness.connect(None)
    harness.send(session, Init(version="v1.0-draft1"))
    assert wire.take() == [Denied("Unsupported protocol. Client: v1.0-draft1. Iris: v1.0-draft2.")]
    assert wire.aborted is not None and "v1.0-draft1" in wire.aborted
    assert harness.broker.endpoints == 0


def test_wrong_magic_closes_without_a_word(harness: Harness) -> None:
    session, wire = harness.connect(None)
    harness.send(session, Init(magic="hello"))
    assert wire.take() == []
    assert wire.aborted == "bad magic 'hello'"


def test_first_packet_must_be_init(harness: Harness) -> None:
    session, wire = harness.connect(None)
    harness.send(session, Subscribe("x"))
    assert wire.take() == []
    assert wire.aborted == "expected INIT, got Subscribe"


def test_silent_handshake_times_out(harness: Harness) -> None:
    session, wire = harness.connect(None, handshake_seconds=5.0)
    assert session.next_deadline() == harness.now + 5.0
    session.on_timer(harness.now + 4.9)
    assert not wire.closed
    session.on_timer(harness.now + 5.0)
    assert wire.aborted == "no handshake before the deadline"


def test_handshake_split_byte_by_byte(harness: Harness) -> None:
    session, wire = harness.connect(None)
    for byte in Init("svc").encode():
        session.data_received(bytes([byte]), harness.now)
    assert wire.take() == [Accepted()]
    assert session.next_deadline() is None


# -- request / reply --------------------------------------------------------------------


def test_request_reply_round_trip(harness: Harness) -> None:
    client, cw = harness.connect()
    service, sw = harness.connect("echo")
    harness.send(client, Request(7, "echo", b"hi", 1000))
    (delivered,) = sw.take()
    assert isinstance(delivered, RequestDelivered)
    assert (delivered.request, delivered.timeout_ms) == (b"hi", 1000)
    harness.send(service, Reply(delivered.request_id, b"ho"))
    assert cw.take() == [Replied(7, b"ho")]
    harness.advance(2)  # the deadline passing later changes nothing
    assert cw.take() == []


def test_empty_reply_is_a_success_and_empty_fault_is_a_fault(harness: Harness) -> None:
    client, cw = harness.connect()
    service, sw = harness.connect("echo")
    harness.send(client, Request(1, "echo", b"a", 1000), Request(2, "echo", b"b", 1000))
    first, second = sw.take()
    harness.send(service, Reply(first.request_id, b""), Fault(second.request_id, ""))
    assert cw.take() == [Replied(1, b""), Faulted(2, "")]


def test_fault_text_passes_verbatim(harness: Harness) -> None:
    client, cw = harness.connect()
    service, sw = harness.connect("echo")
    harness.send(client, Request(1, "echo", b"a", 1000))
    (delivered,) = sw.take()
    harness.send(service, Fault(delivered.request_id, "boom \xff"))
    assert cw.take() == [Faulted(1, "boom \xff")]


def test_request_times_out_once_and_late_reply_is_dropped(harness: Harness) -> None:
    client, cw = harness.connect()
    service, sw = harness.connect("echo")
    harness.send(client, Request(3, "echo", b"x", 250))
    (delivered,) = sw.take()
    harness.advance(0.249)
    assert cw.take() == []
    harness.advance(0.001)
    assert cw.take() == [TimedOut(3)]
    harness.send(service, Reply(delivered.request_id, b"late"))
    assert cw.take() == []
    assert service.state is State.OPEN


def test_zero_timeout_times_out_at_once(harness: Harness) -> None:
    client, cw = harness.connect()
    harness.connect("echo")
    harness.send(client, Request(3, "echo", b"x", 0))
    assert cw.take() == [TimedOut(3)]


def test_request_without_members_waits_for_one_until_its_deadline(harness: Harness) -> None:
    client, cw = harness.connect()
    harness.send(client, Request(1, "late", b"x", 1000), Request(2, "none", b"y", 1000))
    harness.advance(0.5)
    service, sw = harness.connect(None)
    harness.send(service, Init("late"))
    accepted, delivered = sw.take()
    assert accepted == Accepted()
    assert delivered.request == b"x"
    harness.send(service, Reply(delivered.request_id, b"ok"))
    assert cw.take() == [Replied(1, b"ok")]
    harness.advance(0.5)
    assert cw.take() == [TimedOut(2)]
    assert harness.broker.next_deadline() is None


def test_member_leaving_mid_request_times_the_request_out_at_once(harness: Harness) -> None:
    client, cw = harness.connect()
    service, _sw = harness.connect("echo")
    harness.send(client, Request(1, "echo", b"x", 60_000))
    service.connection_lost()
    assert cw.take() == [TimedOut(1)]


def test_reply_from_another_member_is_ignored(harness: Harness) -> None:
    client, cw = harness.connect()
    service, sw = harness.connect("echo")
    intruder, _ = harness.connect("other")
    harness.send(client, Request(1, "echo", b"x", 1000))
    (delivered,) = sw.take()
    harness.send(intruder, Reply(delivered.request_id, b"forged"))
    assert cw.take() == []
    harness.send(service, Reply(delivered.request_id, b"real"))
    assert cw.take() == [Replied(1, b"real")]


def test_requests_spread_evenly_over_members(harness: Harness) -> None:
    client, _ = harness.connect()
    members = [harness.connect("echo") for _ in range(4)]
    for i in range(400):
        harness.send(client, Request(i, "echo", b"x", 1000))
        for service, wire in members:
            for delivered in wire.take():
                harness.send(service, Reply(delivered.request_id, b""))
                wire.received.append(delivered)
    counts = [len(wire.received) for _, wire in members]
    assert counts == [100, 100, 100, 100]


def test_requests_prefer_the_least_loaded_member(harness: Harness) -> None:
    client, _ = harness.connect()
    (fast, fast_wire), (_slow, slow_wire) = harness.connect("echo"), harness.connect("echo")
    for i in range(100):
        harness.send(client, Request(i, "echo", b"x", 60_000))
        for delivered in fast_wire.take():  # the fast member answers at once
            harness.send(fast, Reply(delivered.request_id, b""))
            fast_wire.received.append(delivered)
    # The slow member never answers, so it holds one request and gets no more.
    assert len(slow_wire.received) == 1
    assert len(fast_wire.received) == 99


def test_shutdown_times_out_pending_requests_and_says_goodbye(harness: Harness) -> None:
    client, cw = harness.connect()
    harness.connect("echo")
    harness.send(client, Request(1, "echo", b"x", 60_000), Request(2, "nobody", b"x", 60_000))
    harness.broker.shut_down()
    client.shut_down("node shutting down")
    assert cw.take() == [TimedOut(1), TimedOut(2), Closed("node shutting down")]
    assert cw.closed


# -- broadcast and publish ---------------------------------------------------------------


def test_broadcast_reaches_every_member_once_including_sender(harness: Harness) -> None:
    members = [harness.connect("group") for _ in range(3)]
    _other, ow = harness.connect("other")
    harness.send(members[0][0], Broadcast("group", b"hey"))
    for _, wire in members:
        assert wire.take() == [BroadcastDelivered(b"hey")]
    assert ow.take() == []


def test_publish_reaches_each_subscriber_once(harness: Harness) -> None:
    subscribers = [harness.connect() for _ in range(3)]
    for session, _ in subscribers:
        harness.send(session, Subscribe("news"), Subscribe("news"))  # twice is harmless
    publisher, pw = harness.connect()
    harness.send(publisher, Publish("news", b"e1"))
    for _, wire in subscribers:
        assert wire.take() == [Publish("news", b"e1")]
    assert pw.take() == []
    harness.send(subscribers[0][0], Unsubscribe("news"))
    harness.send(publisher, Publish("news", b"e2"))
    assert subscribers[0][1].take() == []
    assert subscribers[1][1].take() == [Publish("news", b"e2")]


def test_unsubscribing_an_unknown_topic_keeps_the_connection(harness: Harness) -> None:
    session, wire = harness.connect()
    harness.send(session, Unsubscribe("never"))
    assert session.state is State.OPEN
    assert wire.take() == []


def test_overloaded_client_loses_fan_out_deliveries_not_the_connection(harness: Harness) -> None:
    (_slow, slow_wire), (fine, fine_wire) = harness.connect("g"), harness.connect("g")
    slow_wire.overloaded = True
    harness.send(fine, Broadcast("g", b"x"))
    assert slow_wire.take() == []
    assert slow_wire.drops == ["broadcast"]
    assert fine_wire.take() == [BroadcastDelivered(b"x")]


# -- tunnels ---------------------------------------------------------------------------


def open_tunnel(harness: Harness) -> tuple[RelaySession, FakeWire, RelaySession, FakeWire]:
    client, cw = harness.connect()
    service, sw = harness.connect("svc")
    harness.send(client, TunnelInit(3, "svc", 1000))
    (offer,) = sw.take()
    assert isinstance(offer, TunnelOffered)
    assert offer.chunk_limit == 65536
    harness.send(service, TunnelConfirm(offer.build_id, 9))
    assert cw.take() == [TunnelConfirmed(3, 65536), TunnelAllow(3, TUNNEL_WINDOW)]
    assert sw.take() == [TunnelAllow(9, TUNNEL_WINDOW)]
    return client, cw, service, sw


def test_tunnel_data_flows_only_with_credit(harness: Harness) -> None:
    client, cw, service, sw = open_tunnel(harness)
    harness.send(client, TunnelTransfer(3, 5, b"hello"))
    assert sw.take() == []  # the service has not granted anything yet
    harness.send(service, TunnelAllow(9, 3))
    assert sw.take() == []  # a first chunk waits until it fits
    harness.send(service, TunnelAllow(9, 2))
    assert sw.take() == [TunnelTransfer(9, 5, b"hello")]
    assert cw.take() == [TunnelAllow(3, 5)]  # the bytes left the node: granted back


def test_tunnel_continuations_are_forced_through(harness: Harness) -> None:
    client, _cw, service, sw = open_tunnel(harness)
    harness.send(service, TunnelAllow(9, 4))
    harness.send(
        client,
        TunnelTransfer(3, 12, b"abcd"),
        TunnelTransfer(3, 0, b"efgh"),
        TunnelTransfer(3, 0, b"ijkl"),
        TunnelTransfer(3, 2, b"mn"),
    )
    assert sw.take() == [
        TunnelTransfer(9, 12, b"abcd"),
        TunnelTransfer(9, 0, b"efgh"),
        TunnelTransfer(9, 0, b"ijkl"),
    ]
    harness.send(service, TunnelAllow(9, 12))  # credit was -8: now 4, enough for "mn"
    assert sw.take() == [TunnelTransfer(9, 2, b"mn")]


def test_tunnel_sender_beyond_its_allowance_loses_the_tunnel(harness: Harness) -> None:
    client, cw, service, sw = open_tunnel(harness)
    chunk = bytes(65536)
    # The service grants nothing, so every chunk stays in the node: the window is used up...
    harness.send(client, *[TunnelTransfer(3, 65536, chunk)] * (TUNNEL_WINDOW // 65536))
    assert cw.take() == []
    assert client.state is State.OPEN
    # ...and one chunk more breaks the agreement: that tunnel closes, nothing else does.
    harness.send(client, TunnelTransfer(3, 65536, chunk))
    assert cw.take() == [TunnelClosed(3, "tunnel allowance exceeded")]
    assert sw.take() == []  # the service still has data to take before it hears of the close
    harness.send(service, TunnelAllow(9, TUNNEL_WINDOW))
    delivered = sw.take()
    assert len(delivered) == TUNNEL_WINDOW // 65536 + 1
    assert delivered[-1] == TunnelClosed(9, "tunnel allowance exceeded")
    assert client.state is State.OPEN


def test_tunnel_close_is_acknowledged_and_reaches_the_far_side_after_data(
    harness: Harness,
) -> None:
    client, cw, service, sw = open_tunnel(harness)
    harness.send(client, TunnelTransfer(3, 2, b"hi"), TunnelClose(3))
    assert cw.take() == [TunnelClosed(3, "")]
    assert sw.take() == []  # data first, and it waits for credit
    harness.send(service, TunnelAllow(9, 100))
    assert sw.take() == [TunnelTransfer(9, 2, b"hi"), TunnelClosed(9, "")]


def test_close_of_unknown_tunnel_is_answered(harness: Harness) -> None:
    client, cw = harness.connect()
    harness.send(client, TunnelClose(42))
    assert cw.take() == [TunnelClosed(42, "")]


def test_unconfirmed_tunnel_fails_alone(harness: Harness) -> None:
    client, cw = harness.connect()
    service, sw = harness.connect("svc")
    harness.send(client, TunnelInit(1, "svc", 10_000))
    (offer,) = sw.take()
    harness.advance(3.0)
    assert cw.take() == [TunnelFailed(1)]
    assert service.state is State.OPEN
    harness.send(service, TunnelConfirm(offer.build_id, 5))  # too late
    assert sw.take() == [TunnelClosed(5, "tunnel offer expired")]
    assert service.state is State.OPEN


def test_tunnel_to_empty_cluster_fails_at_its_timeout(harness: Harness) -> None:
    client, cw = harness.connect()
    harness.send(client, TunnelInit(1, "nobody", 500))
    harness.advance(0.499)
    assert cw.take() == []
    harness.advance(0.001)
    assert cw.take() == [TunnelFailed(1)]


def test_connection_loss_closes_its_tunnels_with_a_reason(harness: Harness) -> None:
    client, _cw, _service, sw = open_tunnel(harness)
    client.connection_lost()
    assert sw.take() == [TunnelClosed(9, "connection lost")]


def test_oversize_chunk_drops_the_connection(harness: Harness) -> None:
    client, cw, _service, sw = open_tunnel(harness)
    harness.send(client, TunnelTransfer(3, 70000, bytes(65537)))
    assert cw.aborted == "tunnel chunk of 65537 bytes exceeds the limit of 65536"
    assert cw.take()[-1] == Closed("tunnel chunk of 65537 bytes exceeds the limit of 65536")
    assert sw.take() == [TunnelClosed(9, "tunnel chunk of 65537 bytes exceeds the limit of 65536")]


# -- teardown ---------------------------------------------------------------------------


def test_graceful_close_is_acknowledged_and_detaches(harness: Harness) -> None:
    service, sw = harness.connect("svc")
    harness.send(service, Close(), Subscribe("ignored after close"))
    assert sw.take() == [Closed("")]
    assert sw.closed and sw.aborted is None
    assert harness.broker.endpoints == 0


def test_garbage_after_handshake_drops_with_reason(harness: Harness) -> None:
    session, wire = harness.connect("svc")
    other, _ow = harness.connect("svc")
    harness.send(session, Subscribe("ok"))
    session.data_received(b"\x0e\x00", harness.now)
    assert wire.aborted == "unknown opcode 0x0e"
    assert wire.take() == [Closed("unknown opcode 0x0e")]
    assert harness.broker.endpoints == 1
    assert other.state is State.OPEN
