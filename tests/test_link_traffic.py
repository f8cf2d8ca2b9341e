"""Links carrying application traffic, on in-memory transports with a fake clock:
fragments, control before bulk, backpressure, dialling for ``send`` with a deadline,
messages given up (counted, logged in summary) and the inbound handshake rate limit."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent

from overlay.link import LinkStateError, Role
from overlay.link_frames import LinkLimits
from overlay.link_twisted import Link, LinkService
from tests.test_link_twisted import (
    End,
    creds,
    log_events,
    lost,
    memory_reactor,
    pump,
    reasons,
    refused,
    service,
)

__all__ = ["log_events"]  # the fixture

SMALL = LinkLimits(
    max_frame_size=1100,
    max_message_size=5000,
    fragment_size=1000,
    bulk_high_water=4000,
    bulk_low_water=2000,
    max_bulk_queued=10_000,
    max_control_queued=5000,
)


class TcpLikeTransport(StringTransport):
    """Pauses its streaming producer once more than ``size`` bytes wait, as TCP does."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and not self.full and len(self.value()) > self.size:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """What the kernel took; the producer may write again."""
        data: bytes = self.value()
        self.clear()
        if self.full and self.producer is not None:
            self.full = False
            self.producer.resumeProducing()
        return data


def linked(a: LinkService, b: LinkService, transport: Any = None) -> tuple[End, End]:
    """An established pair a -> b, the sender on ``transport`` (default: never full)."""
    link = Link(a, Role.INITIATOR)
    out = End.__new__(End)
    out.link, out.transport = link, transport if transport is not None else StringTransport()
    link.makeConnection(out.transport)
    inn = End(b, Role.RESPONDER)
    pump((out, inn))
    assert out.link.established and inn.link.established
    return out, inn


def deliver(out: End, inn: End) -> None:
    """Move bytes out -> in like a kernel that drains the sender's buffer, until quiet."""
    transport = out.transport
    while data := (transport.drain() if isinstance(transport, TcpLikeTransport) else out.take()):
        inn.link.dataReceived(data)


# -- fragments and classes


def test_a_16_mib_message_crosses_in_fragments() -> None:
    a, _ = service(creds(1))
    b, hb = service(creds(2))
    out, inn = linked(a, b)
    big = os.urandom(16 << 20)
    assert out.link.send(big, bulk=True)
    wire = out.take()
    fragments = -(-len(big) // a.limits.fragment_size)
    assert len(wire) == len(big) + 4 + fragments * (1 + 28), "kind byte, length, seq, tag"
    inn.link.dataReceived(wire)
    assert [data for _, data in hb.frames] == [big]
    assert out.link.bytes_sent == a.bytes_sent and inn.link.bytes_received == b.bytes_received
    assert inn.link.bytes_received >= len(wire)


def test_oversize_send_is_the_callers_bug_and_counted() -> None:
    a, _ = service(creds(1), limits=SMALL)
    b, _ = service(creds(2), limits=SMALL)
    out, _inn = linked(a, b)
    with pytest.raises(LinkStateError):
        out.link.send(bytes(5001))
    with pytest.raises(LinkStateError):
        a.send(12345, bytes(5001), dial_to=("127.0.0.1", 1))
    assert a.given_up == {"oversize": 2}
    assert out.link.send(bytes(5000), bulk=True)


def test_oversize_message_from_the_peer_fails_that_link(log_events: list[LogEvent]) -> None:
    bigger = dataclasses.replace(SMALL, max_message_size=6000, max_control_queued=6000)
    a, _ = service(creds(1), limits=bigger)
    b, hb = service(creds(2), limits=SMALL)
    out, inn = linked(a, b)
    out.link.send(bytes(6000), bulk=True)
    deliver(out, inn)
    assert hb.lost == [(inn.link, "oversize-message")]
    assert "oversize-message" in reasons(log_events)


# -- control before bulk, backpressure


def test_full_transport_is_backpressure_and_control_goes_first() -> None:
    a, ha = service(creds(1), limits=SMALL)
    b, hb = service(creds(2), limits=SMALL)
    tcp = TcpLikeTransport(size=1500)
    out, inn = linked(a, b, tcp)
    link = out.link
    assert tcp.producer is link
    first, second, third = (bytes([n]) * 5000 for n in (1, 2, 3))
    assert link.send(first, bulk=True)
    assert link.writing_paused, "two fragments filled the transport"
    assert link.congested and link.queued_bytes == 3000
    waiter = link.wait_writable()
    assert link.send(second, bulk=True)
    assert link.send(third, bulk=True) is False, "over max_bulk_queued: refused, not dropped"
    assert a.given_up == {"send-buffer-full": 1}
    assert link.send(b"heartbeat"), "control is never refused for bulk backlog"
    assert link.established and not waiter.called and ha.writable == []
    deliver(out, inn)
    assert [data for _, data in hb.frames] == [b"heartbeat", first, second]
    assert ha.writable == [link] and waiter.called, "told once, below the low-water mark"
    assert not link.congested and link.queued_bytes == 0


def test_link_lost_with_messages_queued_counts_them() -> None:
    a, ha = service(creds(1), limits=SMALL)
    b, _ = service(creds(2), limits=SMALL)
    out, _inn = linked(a, b, TcpLikeTransport(size=100))
    for _ in range(3):
        out.link.send(bytes(3000), bulk=True)
    out.link.send(b"ping")
    out.link.connectionLost(lost())
    assert ha.lost == [(out.link, "connection-lost")]
    assert a.given_up == {"link-lost": 4}, "the half-sent message counts too"
    assert out.link.send(b"late") is False
    assert a.given_up == {"link-lost": 5}


def test_closing_on_purpose_writes_what_is_queued() -> None:
    a, _ = service(creds(1), limits=SMALL)
    b, hb = service(creds(2), limits=SMALL)
    out, inn = linked(a, b, TcpLikeTransport(size=100))
    out.link.send(bytes(3000), bulk=True)
    out.link.send(b"bye")
    out.link.close()
    inn.link.dataReceived(out.transport.value())
    assert [data for _, data in hb.frames] == [b"bye", bytes(3000)]
    assert a.given_up == {}


# -- dialling for send()


def dialled(reactor: Any, index: int, b: LinkService) -> tuple[End, End]:
    """Complete the index-th dial of the reactor against b."""
    link = reactor.tcpClients[index][2].buildProtocol(None)
    out = End.of(link)
    inn = End(b, Role.RESPONDER)
    pump((out, inn))
    return out, inn


def test_send_dials_and_flushes_in_order_once_the_link_is_up() -> None:
    reactor = memory_reactor()
    a, ha = service(creds(1), reactor)
    b, hb = service(creds(2), reactor)
    target = ("127.0.0.1", 4321)
    assert a.send(b.node_id, b"one", dial_to=target)
    assert a.send(b.node_id, b"two", bulk=True, dial_to=target)
    assert a.send(b.node_id, b"three")
    assert [c[:2] for c in reactor.tcpClients] == [target], "one dial for the peer"
    out, _inn = dialled(reactor, 0, b)
    assert [data for _, data in hb.frames] == [b"one", b"two", b"three"]
    assert ha.established == [out.link] and out.link.dialer is not None
    assert out.link.dialer.expected_peer == b.node_id
    assert a.given_up == {} and [c for c in reactor.getDelayedCalls() if c.active()] == []
    out.link.connectionLost(lost())
    assert reactor.getDelayedCalls() == [] and len(reactor.tcpClients) == 1, "one-shot"


def test_dial_deadline_gives_up_counted_and_logged_once(log_events: list[LogEvent]) -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor, dial_timeout=5.0, log_interval=10.0)
    peer = creds(2).identity.node_id
    for n in range(3):
        assert a.send(peer, b"m%d" % n, dial_to=("127.0.0.1", 4321))
    attempts = 0
    while reactor.seconds() < 5.0:
        while attempts < len(reactor.tcpClients):
            reactor.tcpClients[attempts][2].clientConnectionFailed(
                reactor.connectors[attempts], refused()
            )
            attempts += 1
        reactor.advance(0.1)
    assert attempts >= 3, "re-dialled with backoff until the deadline"
    assert a.given_up == {"dial-timeout": 3}
    assert reasons(log_events).count("dial-timeout") == 1
    reactor.advance(60)
    assert len(reactor.tcpClients) == attempts, "no dialling after the deadline"
    assert a.send(peer, b"again", dial_to=("127.0.0.1", 4321))
    assert len(reactor.tcpClients) == attempts + 1, "a later send dials afresh"


def test_dial_queue_is_bounded_by_count_and_bytes() -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor, limits=SMALL, max_dial_queue=2, max_dial_queue_bytes=6000)
    target = ("127.0.0.1", 4321)
    assert a.send(7, b"a", dial_to=target) and a.send(7, b"b")
    assert a.send(7, b"c") is False
    assert a.send(8, bytes(5000), dial_to=target)
    assert a.send(8, bytes(1001)) is False
    assert a.given_up == {"dial-queue-full": 2}


def test_no_link_and_nowhere_to_dial_is_given_up() -> None:
    a, _ = service(creds(1))
    assert a.send(99, b"lost") is False
    assert a.given_up == {"no-link": 1}


def test_an_inbound_link_while_dialling_carries_the_queue_and_stops_the_dial() -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor)
    b, hb = service(creds(2), reactor)
    a.send(b.node_id, b"queued", dial_to=("127.0.0.1", 4321))
    b_out, a_in = End(b, Role.INITIATOR), End(a, Role.RESPONDER)
    pump((b_out, a_in))
    assert [data for _, data in hb.frames] == [b"queued"]
    assert reactor.connectors[0].stoppedConnecting, "no second link to resolve"
    assert [c for c in reactor.getDelayedCalls() if c.active()] == []
    assert a.given_up == {}


def test_close_peer_gives_up_what_waits_for_it() -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor)
    a.send(5, b"x", dial_to=("127.0.0.1", 4321))
    a.send(5, b"y")
    a.close_peer(5)
    assert a.given_up == {"closed": 2}
    reactor.advance(10)
    assert a.given_up == {"closed": 2} and len(reactor.tcpClients) == 1


# -- inbound handshake rate limit


def test_inbound_handshakes_are_rate_limited_per_source(log_events: list[LogEvent]) -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor, handshake_rate=1.0, handshake_burst=3, log_interval=10)
    factory = a.factory()
    noisy = IPv4Address("TCP", "127.0.0.2", 5555)
    quiet = IPv4Address("TCP", "127.0.0.3", 5555)
    built = [factory.buildProtocol(noisy) is not None for _ in range(6)]
    assert built == [True, True, True, False, False, False]
    assert factory.buildProtocol(quiet) is not None, "another source has its own bucket"
    reactor.advance(1.0)
    assert factory.buildProtocol(noisy) is not None, "one token a second"
    assert factory.buildProtocol(noisy) is None
    assert a.handshakes_refused == 4
    refusals = [e for e in log_events if e.get("reason") == "rate-limited"]
    assert len(refusals) == 1, "the first refusal is logged at once, the rest counted"
    reactor.advance(10)
    summaries = [e for e in log_events if "counts" in e]
    assert [e["counts"] for e in summaries] == [{"rate-limited": {"127.0.0.2": 3}}]
    reactor.advance(60)
    assert len([e for e in log_events if "counts" in e]) == 1, "quiet intervals say nothing"


def test_failed_inbound_handshakes_are_logged_in_summary(log_events: list[LogEvent]) -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor, log_interval=10)
    for _ in range(5):
        stranger = End(a, Role.RESPONDER)
        stranger.link.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        assert stranger.link.close_reason == "oversize-handshake"
    assert reasons(log_events) == ["oversize-handshake"]
    reactor.advance(10)
    (summary,) = [e for e in log_events if "counts" in e]
    assert summary["counts"] == {"oversize-handshake": {"192.168.1.1": 4}}
