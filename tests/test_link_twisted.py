"""The Twisted link adapter: in-memory transports with a fake clock, then real loopback."""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from overlay.identity import Credentials, NetworkKey, NodeIdentity
from overlay.link import DEFAULT_HANDSHAKE_TIMEOUT, Role
from overlay.link_twisted import Link, LinkService

NET = NetworkKey("home", bytes(range(32)))
OTHER_NET = NetworkKey("away", bytes(range(1, 33)))


def memory_reactor() -> Any:
    return MemoryReactorClock()


def string_transport() -> Any:
    return StringTransport()


def attach(link: Link) -> Any:
    """Connect a link to a fresh in-memory transport; returns the transport."""
    transport = string_transport()
    cast(Any, link).makeConnection(transport)
    return transport


def lost() -> Failure:
    return Failure(ConnectionDone())


def refused() -> Failure:
    return Failure(ConnectionRefusedError())


def port_of(listening: IListeningPort) -> int:
    return cast(IPv4Address, listening.getHost()).port


def reason_of(link: Link) -> str | None:
    return link.close_reason


def creds(seed: int, network: NetworkKey = NET) -> Credentials:
    return Credentials.for_network(network, NodeIdentity.from_seed(bytes([seed]) * 32))


class Recorder:
    """A LinkHandler that remembers everything it was told."""

    def __init__(self) -> None:
        self.established: list[Link] = []
        self.frames: list[tuple[Link, bytes]] = []
        self.lost: list[tuple[Link, str]] = []
        self.writable: list[Link] = []
        self.on_frame: Callable[[Link, bytes], None] | None = None

    def link_established(self, link: Link) -> None:
        self.established.append(link)

    def frame_received(self, link: Link, data: bytes) -> None:
        self.frames.append((link, data))
        if self.on_frame is not None:
            self.on_frame(link, data)

    def link_lost(self, link: Link, reason: str) -> None:
        self.lost.append((link, reason))

    def link_writable(self, link: Link) -> None:
        self.writable.append(link)


def service(
    credentials: Credentials, reactor: Any = None, **kwargs: Any
) -> tuple[LinkService, Recorder]:
    clock = reactor if reactor is not None else memory_reactor()
    handler = Recorder()
    svc = LinkService(
        clock, clock, credentials, handler, entropy=os.urandom, rng=random.Random(7), **kwargs
    )
    return svc, handler


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def reasons(events: list[LogEvent]) -> list[str]:
    return [
        e["reason"] for e in events if e.get("log_namespace") == "overlay.link" and "reason" in e
    ]


class End:
    """One side of an in-memory connection."""

    def __init__(self, svc: LinkService, role: Role, expected_peer: int | None = None) -> None:
        self.link = Link(svc, role, expected_peer=expected_peer)
        self.transport = attach(self.link)

    @classmethod
    def of(cls, link: Link) -> End:
        end = cls.__new__(cls)
        end.link, end.transport = link, attach(link)
        return end

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data


def pump(*pairs: tuple[End, End]) -> None:
    """Move bytes both ways until every pair is quiet."""
    moved = True
    while moved:
        moved = False
        for a, b in pairs:
            for src, dst in ((a, b), (b, a)):
                data = src.take()
                if data and not dst.transport.disconnecting:
                    dst.link.dataReceived(data)
                    moved = True


# -- in memory


def test_handshake_and_frames_through_the_handler() -> None:
    a, ha = service(creds(1))
    b, hb = service(creds(2))
    out, inn = End(a, Role.INITIATOR), End(b, Role.RESPONDER)
    pump((out, inn))
    assert ha.established == [out.link] and hb.established == [inn.link]
    assert out.link.peer_node_id == b.node_id and inn.link.peer_node_id == a.node_id
    assert a.links == {b.node_id: out.link} and b.links == {a.node_id: inn.link}
    assert out.link.send(b"ping") is True
    pump((out, inn))
    assert hb.frames == [(inn.link, b"ping")]
    inn.link.send(b"pong")
    pump((out, inn))
    assert ha.frames == [(out.link, b"pong")]


@pytest.mark.parametrize("role", [Role.INITIATOR, Role.RESPONDER])
def test_handshake_deadline_fires(role: Role, log_events: list[LogEvent]) -> None:
    reactor = memory_reactor()
    a, handler = service(creds(1), reactor)
    end = End(a, role)
    reactor.advance(DEFAULT_HANDSHAKE_TIMEOUT - 0.01)
    assert reason_of(end.link) is None
    reactor.advance(0.02)
    assert reason_of(end.link) == "handshake-timeout"
    assert end.transport.disconnecting
    assert reasons(log_events) == ["handshake-timeout"]
    assert handler.established == [] and handler.lost == []
    assert end.link._timer is None
    a.stop()  # flushes the log summary (inbound failures) and cancels its timer
    assert reactor.getDelayedCalls() == []


def test_established_link_cancels_its_deadline() -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor)
    b, _ = service(creds(2), reactor)
    out, inn = End(a, Role.INITIATOR), End(b, Role.RESPONDER)
    pump((out, inn))
    assert reactor.getDelayedCalls() == []
    reactor.advance(3600)
    assert out.link.established and inn.link.established


def test_a_bad_link_never_affects_another(log_events: list[LogEvent]) -> None:
    b, hb = service(creds(2))
    a1, _ = service(creds(1))
    a3, _ = service(creds(3))
    garbage = End(b, Role.RESPONDER)
    good_out, good_in = End(a1, Role.INITIATOR), End(b, Role.RESPONDER)
    stranger_out, stranger_in = End(a3, Role.INITIATOR), End(b, Role.RESPONDER)
    object.__setattr__(
        a3.credentials, "certificate", OTHER_NET.issue(a3.credentials.identity.public)
    )
    garbage.link.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    pump((good_out, good_in), (stranger_out, stranger_in))
    assert garbage.link.close_reason == "oversize-handshake"
    assert stranger_in.link.close_reason == "wrong-network"
    assert not stranger_out.transport.value(), "a failure is never explained to the peer"
    assert b.links == {a1.credentials.identity.node_id: good_in.link}
    good_out.link.send(b"still fine")
    pump((good_out, good_in))
    assert hb.frames == [(good_in.link, b"still fine")]
    assert set(reasons(log_events)) == {"oversize-handshake", "wrong-network"}


def test_tampered_frame_drops_the_link_and_tells_the_handler(log_events: list[LogEvent]) -> None:
    a, _ = service(creds(1))
    b, hb = service(creds(2))
    out, inn = End(a, Role.INITIATOR), End(b, Role.RESPONDER)
    pump((out, inn))
    out.link.send(b"frame")
    data = bytearray(out.take())
    data[-1] ^= 1
    inn.link.dataReceived(bytes(data))
    assert hb.lost == [(inn.link, "tampered-frame")]
    assert b.links == {}
    assert inn.link.send(b"too late") is False
    assert b.given_up == {"link-lost": 1}, "a message for a closed link is given up, counted"
    assert reasons(log_events) == ["tampered-frame", "link-lost"]


def test_connection_lost_is_reported_once() -> None:
    a, ha = service(creds(1))
    b, _ = service(creds(2))
    out, inn = End(a, Role.INITIATOR), End(b, Role.RESPONDER)
    pump((out, inn))
    out.link.connectionLost(lost())
    out.link.connectionLost(lost())
    assert ha.lost == [(out.link, "connection-lost")]
    assert a.links == {}


def test_dialing_each_other_at_once_leaves_one_link() -> None:
    a, ha = service(creds(1))
    b, hb = service(creds(2))
    low, high = sorted([(a, ha), (b, hb)], key=lambda pair: pair[0].node_id)
    low_out, high_in = End(low[0], Role.INITIATOR), End(high[0], Role.RESPONDER)
    high_out, low_in = End(high[0], Role.INITIATOR), End(low[0], Role.RESPONDER)
    pump((low_out, high_in), (high_out, low_in))
    # Both keep the link the lower id initiated; the other is closed at both ends.
    assert low[0].links == {high[0].node_id: low_out.link}
    assert high[0].links == {low[0].node_id: high_in.link}
    assert high_out.link.close_reason == "duplicate-link"
    assert low_in.link.close_reason == "duplicate-link" or low_in.transport.disconnecting
    assert low[1].lost == [] and high[1].lost == []
    assert low[1].established[-1] is low_out.link and high[1].established[-1] is high_in.link
    low_out.link.send(b"over the survivor")
    pump((low_out, high_in))
    assert high[1].frames[-1] == (high_in.link, b"over the survivor")


def test_pause_reading_pushes_back_on_the_transport() -> None:
    a, _ = service(creds(1))
    end = End(a, Role.INITIATOR)
    end.link.pause_reading()
    assert end.transport.producerState == "paused"
    end.link.resume_reading()
    assert end.transport.producerState == "producing"


def test_dialer_retries_with_jittered_backoff_and_resets_on_success() -> None:
    reactor = memory_reactor()
    a, ha = service(creds(1), reactor)
    b, _ = service(creds(2), reactor)
    dialer = a.connect("127.0.0.1", 4321, expected_peer=b.node_id)
    assert a.connect("127.0.0.1", 4321) is dialer, "one dial loop per address"
    bounds = [(0.25, 0.5), (0.5, 1.0), (1.0, 2.0)]
    for attempt, (low, high) in enumerate(bounds):
        host, port, factory, *_ = reactor.tcpClients[attempt]
        assert (host, port) == ("127.0.0.1", 4321)
        assert isinstance(factory, ClientFactory)
        factory.clientConnectionFailed(reactor.connectors[attempt], refused())
        (call,) = reactor.getDelayedCalls()
        assert low <= call.getTime() - reactor.seconds() <= high
        reactor.advance(high)
    factory = reactor.tcpClients[3][2]
    link = factory.buildProtocol(None)
    assert isinstance(link, Link) and link.role is Role.INITIATOR
    out = End.of(link)
    inn = End(b, Role.RESPONDER)
    pump((out, inn))
    assert ha.established == [link] and dialer.backoff.attempts == 0
    link.connectionLost(lost())
    (call,) = reactor.getDelayedCalls()
    assert 0.25 <= call.getTime() - reactor.seconds() <= 0.5, "backoff was reset"
    dialer.stop()
    assert reactor.getDelayedCalls() == []


def test_handshake_failure_is_retried_too() -> None:
    reactor = memory_reactor()
    a, _ = service(creds(1), reactor)
    a.connect("127.0.0.1", 4321)
    link = reactor.tcpClients[0][2].buildProtocol(None)
    attach(link)
    link.dataReceived(struct.pack(">I", 5000))
    assert link.close_reason == "oversize-handshake"
    link.connectionLost(lost())
    delays = [c for c in reactor.getDelayedCalls() if c.active()]
    assert len(delays) == 1


# -- real loopback


def wait_for(
    condition: Callable[[], bool], timeout: float = 5.0, clock: IReactorTime | None = None
) -> Deferred[None]:
    """Poll a condition every few milliseconds; fail if it is not true by the deadline."""
    clock = clock or global_reactor
    assert clock is not None
    done: Deferred[None] = Deferred()
    deadline = clock.seconds() + timeout

    def check() -> None:
        if condition():
            done.callback(None)
        elif clock.seconds() > deadline:
            done.errback(AssertionError(f"condition not met within {timeout}s"))
        else:
            clock.callLater(0.005, check)

    check()
    return done


class _Tap(Protocol):
    """A TCP forwarder that records every byte it carries (to look at the wire)."""

    def __init__(self, record: bytearray, target: tuple[str, int], tcp: IReactorTCP) -> None:
        self.record = record
        self.target = target
        self.tcp = tcp
        self.peer: _Tap | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        if self.peer is not None:  # the outgoing half
            self.peer.peer = self
            for chunk in self.peer.pending:
                self.transport.write(chunk)  # type: ignore[union-attr]
            self.peer.pending.clear()
            return
        self.transport.pauseProducing()  # type: ignore[union-attr]
        outgoing = ClientFactory()
        outgoing.protocol = lambda: self._outgoing()
        self.tcp.connectTCP(*self.target, outgoing)

    def _outgoing(self) -> _Tap:
        half = _Tap(self.record, self.target, self.tcp)
        half.peer = self
        self.transport.resumeProducing()  # type: ignore[union-attr]
        return half

    def dataReceived(self, data: bytes) -> None:
        self.record += data
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_loopback_link_carries_frames_and_hides_the_plaintext() -> None:
    reactor: Any = global_reactor
    a, ha = service(creds(1), reactor)
    b, hb = service(creds(2), reactor)
    listening = b.listen(0, "127.0.0.1")
    record = bytearray()
    tap_factory = Factory()
    tap_factory.protocol = lambda: _Tap(record, ("127.0.0.1", port_of(listening)), reactor)
    tap = reactor.listenTCP(0, tap_factory, interface="127.0.0.1")
    try:
        a.connect("127.0.0.1", port_of(tap), expected_peer=b.node_id)
        await wait_for(lambda: bool(ha.established and hb.established))
        secret = b"the eagle lands at midnight " * 4
        big = os.urandom(256 * 1024)
        link_a = a.links[b.node_id]
        for payload in (secret, big, b""):
            assert link_a.send(payload)
        b.links[a.node_id].send(secret)
        await wait_for(lambda: len(hb.frames) == 3 and len(ha.frames) == 1)
        assert [data for _, data in hb.frames] == [secret, big, b""]
        assert ha.frames[0][1] == secret
        assert len(record) > len(big)
        assert secret not in bytes(record)
        assert secret[:16] not in bytes(record)
    finally:
        await a.stop()
        await b.stop()
        await tap.stopListening()
    await wait_for(lambda: bool(ha.lost and hb.lost))


@pytest_twisted.ensureDeferred
async def test_loopback_simultaneous_dial_ends_with_one_shared_link() -> None:
    reactor: Any = global_reactor
    a, ha = service(creds(1), reactor)
    b, hb = service(creds(2), reactor)
    port_a = port_of(a.listen(0, "127.0.0.1"))
    port_b = port_of(b.listen(0, "127.0.0.1"))
    try:
        a.connect("127.0.0.1", port_b)
        b.connect("127.0.0.1", port_a)

        def settled() -> bool:
            if len(a.links) != 1 or len(b.links) != 1:
                return False
            la, lb = a.links[b.node_id], b.links[a.node_id]
            if la.transport is None or lb.transport is None:
                return False
            same = la.transport.getHost() == lb.transport.getPeer()
            return same and len(a._all) == 1 and len(b._all) == 1

        await wait_for(settled)
        la, lb = a.links[b.node_id], b.links[a.node_id]
        lower = min(a.node_id, b.node_id)
        initiator = la if la.initiated_locally else lb
        assert initiator.service.node_id == lower
        assert ha.lost == [] and hb.lost == []
        la.send(b"hello over the one link")
        await wait_for(lambda: bool(hb.frames))
        assert hb.frames[-1][1] == b"hello over the one link"
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_loopback_wrong_network_is_refused_and_retried() -> None:
    reactor: Any = global_reactor
    a, ha = service(creds(1), reactor, backoff_initial=0.05, backoff_cap=0.1)
    b, hb = service(creds(2, OTHER_NET), reactor)
    port_b = port_of(b.listen(0, "127.0.0.1"))
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        dialer = a.connect("127.0.0.1", port_b)
        await wait_for(lambda: dialer.backoff.attempts >= 2)
        assert "wrong-network" in reasons(events)
        assert ha.established == [] and hb.established == []
    finally:
        globalLogPublisher.removeObserver(observer)
        await a.stop()
        await b.stop()


def test_dialer_whose_link_lost_the_duplicate_rule_waits_for_the_peer_to_go() -> None:
    reactor = memory_reactor()
    first, second = creds(1), creds(2)
    high, low = sorted([first, second], key=lambda c: c.identity.node_id, reverse=True)
    a, ha = service(high, reactor)  # a has the higher id: its own dial loses
    b, _ = service(low, reactor)
    dialer = a.connect("127.0.0.1", 4321)
    dialed = End.of(reactor.tcpClients[0][2].buildProtocol(None))
    b_in = End(b, Role.RESPONDER)
    b_out, a_in = End(b, Role.INITIATOR), End(a, Role.RESPONDER)
    pump((b_out, a_in))
    pump((dialed, b_in))
    assert dialed.link.close_reason == "duplicate-link"
    assert a.links == {b.node_id: a_in.link}
    dialed.link.connectionLost(lost())
    assert dialer.parked_on == b.node_id
    assert [c for c in reactor.getDelayedCalls() if c.active()] == [], "no redial while linked"
    a_in.link.connectionLost(lost())
    assert ha.lost == [(a_in.link, "connection-lost")]
    (redial,) = reactor.getDelayedCalls()
    reactor.advance(redial.getTime() - reactor.seconds())
    assert len(reactor.tcpClients) == 2, "dials again once the peer has no link"


@pytest_twisted.ensureDeferred
async def test_loopback_16_mib_message_with_control_traffic_alongside() -> None:
    """A 16 MiB bulk message over a real socket; control messages sent behind it arrive
    while it is still crossing (they do not wait for the whole of it)."""
    reactor: Any = global_reactor
    a, ha = service(creds(1), reactor)
    b, hb = service(creds(2), reactor)
    port_b = port_of(b.listen(0, "127.0.0.1"))
    try:
        a.connect("127.0.0.1", port_b)
        await wait_for(lambda: bool(ha.established and hb.established))
        link = a.links[b.node_id]
        handle = cast(Any, link.transport).getHandle()
        assert handle.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= a.socket_buffer
        assert handle.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * a.socket_buffer
        big = os.urandom(16 << 20)
        assert link.send(big, bulk=True)
        assert link.congested
        assert link.send(b"heartbeat")
        await wait_for(lambda: len(hb.frames) == 2, timeout=30.0)
        assert [data for _, data in hb.frames] == [b"heartbeat", big]
        await wait_for(lambda: ha.writable == [link])
        assert a.given_up == {} and b.given_up == {}
        assert b.links[a.node_id].bytes_received > len(big)
    finally:
        await a.stop()
        await b.stop()


def test_routine_closes_are_not_logged_as_failures(log_events: list[LogEvent]) -> None:
    from twisted.logger import LogLevel

    a, _ = service(creds(1))
    b, _ = service(creds(2))
    first_out, first_in = End(a, Role.INITIATOR), End(b, Role.RESPONDER)
    second_out, second_in = End(b, Role.INITIATOR), End(a, Role.RESPONDER)
    pump((first_out, first_in), (second_out, second_in))  # one of them loses: duplicate-link
    for link in list(a.links.values()):
        link.close()  # shutting down
    closes = [e for e in log_events if e.get("reason") in ("duplicate-link", "closed")]
    assert {e["reason"] for e in closes} == {"duplicate-link", "closed"}
    for event in closes:
        assert event["log_level"] is LogLevel.debug
        assert event["outcome"] == "closed"
