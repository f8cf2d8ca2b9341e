"""The Twisted adapter over an in-memory LAN and a fake clock: no sockets, no sleeps.

:class:`FakeLan` stands in for the kernel: a write on one channel reaches, after a
millisecond, every open channel of the same address family on the same link
(including the sender's own, as IP_MULTICAST_LOOP does). One test at the end opens
real sockets on loopback to check the options they carry, and sends nothing.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import cast

import pytest
from twisted.internet.interfaces import IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs

from overlay.discovery import (
    Discovery,
    DiscoveryConfig,
    DiscoveryEvent,
    PeerSeen,
    Seed,
    SeedCandidate,
)
from overlay.discovery_twisted import (
    GROUP_V4,
    GROUP_V6,
    ChannelError,
    MulticastDiscovery,
    MulticastSockets,
)
from overlay.interfaces import Interface, list_interfaces

KEY = bytes(range(32))
LATENCY = 0.001


class FakePort:
    """The transport of one channel on the fake LAN."""

    def __init__(
        self, lan: FakeLan, link: str, family: int, source: str, protocol: DatagramProtocol
    ) -> None:
        self.lan, self.link, self.family, self.source = lan, link, family, source
        self.protocol = protocol
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.fail: OSError | None = None
        self.open = True

    def write(self, packet: bytes, addr: tuple[str, int]) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append((packet, addr))
        for port in self.lan.ports:
            if port.link == self.link and port.family == self.family:
                self.lan.clock.callLater(LATENCY, port.deliver, packet, (self.source, addr[1]))

    def deliver(self, packet: bytes, source: tuple[str, int]) -> None:
        if self.open:
            self.protocol.datagramReceived(packet, source)

    def stopListening(self) -> None:
        self.open = False
        self.lan.ports.remove(self)


@dataclass
class FakeLan:
    clock: Clock
    ports: list[FakePort] = field(default_factory=list)


@dataclass
class FakeSockets:
    """A SocketFactory on the fake LAN; ``links`` maps interface names to links."""

    lan: FakeLan
    links: dict[str, str]
    failures: dict[tuple[str, int], str] = field(default_factory=dict)
    opened: list[FakePort] = field(default_factory=list)

    def open(
        self, interface: Interface, family: socket.AddressFamily, protocol: DatagramProtocol
    ) -> tuple[str, int]:
        failure = self.failures.get((interface.name, family))
        if failure is not None:
            raise ChannelError(failure)
        v6 = family == socket.AF_INET6
        source = interface.ipv6_link_local[0] if v6 else interface.ipv4[0]
        port = FakePort(self.lan, self.links.get(interface.name, "lan"), family, source, protocol)
        self.lan.ports.append(port)
        self.opened.append(port)
        protocol.makeConnection(cast(IUDPTransport, port))
        return (GROUP_V6 if v6 else GROUP_V4), 47853

    def ports(self, name: str, family: int) -> list[FakePort]:
        return [
            p
            for p in self.opened
            if p.family == family and p.protocol.interface.name == name  # type: ignore[attr-defined]
        ]


@dataclass
class Node:
    adapter: MulticastDiscovery
    sockets: FakeSockets
    interfaces: list[Interface]
    events: list[tuple[float, DiscoveryEvent]]

    def seen(self) -> list[PeerSeen]:
        return [e for _, e in self.events if isinstance(e, PeerSeen)]


def make_node(
    lan: FakeLan,
    node_id: int,
    interfaces: list[Interface],
    links: dict[str, str] | None = None,
    config: DiscoveryConfig | None = None,
) -> Node:
    rng = random.Random(node_id)
    core = Discovery(KEY, node_id, 4000 + node_id, rng, rng.randbytes, config)
    sockets = FakeSockets(lan, links or {})
    events: list[tuple[float, DiscoveryEvent]] = []
    current = interfaces  # the test mutates this list to simulate changes
    adapter = MulticastDiscovery(
        core,
        lan.clock,
        sockets,
        lambda: list(current),
        lambda e: events.append((lan.clock.seconds(), e)),
    )
    return Node(adapter, sockets, current, events)


def iface(name: str, v6: str | None = None, v4: str | None = None, index: int = 2) -> Interface:
    return Interface(
        name,
        index,
        up=True,
        multicast=True,
        loopback=False,
        ipv4=(v4,) if v4 else (),
        ipv6_link_local=(v6,) if v6 else (),
    )


def run(clock: Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


@pytest.fixture
def lan() -> FakeLan:
    return FakeLan(Clock())


@pytest.fixture
def logs() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def test_two_nodes_find_each_other_and_a_peer_on_both_families_is_one_peer(lan: FakeLan) -> None:
    a = make_node(lan, 1, [iface("eth0", "fe80::a", "192.0.2.1")])
    b = make_node(lan, 2, [iface("eth0", "fe80::b", "192.0.2.2")])
    a.adapter.start()
    b.adapter.start()
    assert a.adapter.interfaces == {"eth0": ("IPv6", "IPv4")}
    run(lan.clock, 1.0)
    assert a.seen() == [PeerSeen(2, "fe80::b%eth0", 4002, "eth0", True, ("192.0.2.2",))]
    assert b.seen() == [PeerSeen(1, "fe80::a%eth0", 4001, "eth0", True, ("192.0.2.1",))]
    (v6,) = a.sockets.ports("eth0", socket.AF_INET6)
    (v4,) = a.sockets.ports("eth0", socket.AF_INET)
    assert [p for p, _ in v6.sent] == [p for p, _ in v4.sent], "one beacon, sent over both"
    assert {addr for _, addr in v6.sent} == {(GROUP_V6, 47853)}
    assert {addr for _, addr in v4.sent} == {(GROUP_V4, 47853)}
    assert a.adapter.core.stats.ignored_stale > 0, "the second copy of each beacon is dropped"


def test_ipv4_only_and_ipv6_only_interfaces_work(lan: FakeLan) -> None:
    v4_only = make_node(lan, 1, [iface("eth0", v4="192.0.2.1")])
    both = make_node(lan, 2, [iface("eth0", "fe80::b", "192.0.2.2")])
    v6_only = make_node(lan, 3, [iface("eth0", v6="fe80::c")])
    for node in (v4_only, both, v6_only):
        node.adapter.start()
    run(lan.clock, 1.0)
    assert v4_only.adapter.interfaces == {"eth0": ("IPv4",)}
    assert v6_only.adapter.interfaces == {"eth0": ("IPv6",)}
    assert {(e.node_id, e.address) for e in v4_only.seen()} == {(2, "fe80::b%eth0")}
    assert {(e.node_id, e.address) for e in v6_only.seen()} == {(2, "fe80::b%eth0")}
    assert {e.node_id for e in both.seen()} == {1, 3}


def test_a_newcomer_hears_a_settled_node_at_once(lan: FakeLan) -> None:
    """The settled node is in its slow phase; its prompt answer reaches the newcomer."""
    old = make_node(lan, 1, [iface("eth0", v4="192.0.2.1")])
    old.adapter.start()
    run(lan.clock, 3.0)
    new = make_node(lan, 2, [iface("eth0", v4="192.0.2.2")])
    new.adapter.start()
    started = lan.clock.seconds()
    run(lan.clock, 0.2, step=0.001)
    ((when, event),) = new.events
    assert isinstance(event, PeerSeen) and event.node_id == 1
    assert when - started <= 3 * LATENCY


def test_nodes_on_different_links_do_not_hear_each_other(lan: FakeLan) -> None:
    a = make_node(lan, 1, [iface("eth0", v4="192.0.2.1")], links={"eth0": "red"})
    b = make_node(lan, 2, [iface("eth0", v4="192.0.2.2")], links={"eth0": "blue"})
    a.adapter.start()
    b.adapter.start()
    run(lan.clock, 2.0)
    assert a.seen() == [] and b.seen() == []


def test_a_failing_channel_is_reported_and_the_others_go_on(
    lan: FakeLan, logs: list[LogEvent]
) -> None:
    a = make_node(lan, 1, [iface("eth0", "fe80::a", "192.0.2.1"), iface("eth1", v4="10.0.0.1")])
    a.sockets.failures[("eth0", socket.AF_INET)] = "IP_ADD_MEMBERSHIP failed: No such device"
    a.sockets.failures[("eth1", socket.AF_INET)] = "bind failed: Address in use"
    b = make_node(lan, 2, [iface("eth0", "fe80::b", "192.0.2.2")])
    a.adapter.start()
    b.adapter.start()
    run(lan.clock, 1.0)
    assert a.adapter.interfaces == {"eth0": ("IPv6",)}
    assert [e.node_id for e in a.seen()] == [2]
    warnings = [e for e in logs if e.get("interface") and "cannot use" in e["log_format"]]
    assert {(e["interface"], e["family"]) for e in warnings} == {("eth0", "IPv4"), ("eth1", "IPv4")}
    assert "No such device" in warnings[0]["error"]
    # Retried on each rescan, reported once; opened as soon as it works.
    run(lan.clock, 4.0)
    assert len([e for e in logs if "cannot use" in e.get("log_format", "")]) == 2
    del a.sockets.failures[("eth0", socket.AF_INET)]
    run(lan.clock, 2.0)
    assert a.adapter.interfaces == {"eth0": ("IPv6", "IPv4")}


def test_a_send_error_is_logged_once_and_other_channels_still_send(
    lan: FakeLan, logs: list[LogEvent]
) -> None:
    a = make_node(lan, 1, [iface("eth0", "fe80::a", "192.0.2.1")])
    a.adapter.start()
    (v4,) = a.sockets.ports("eth0", socket.AF_INET)
    (v6,) = a.sockets.ports("eth0", socket.AF_INET6)
    v4.fail = OSError(101, "Network is unreachable")
    run(lan.clock, 1.0)
    assert len(v6.sent) == 4 and len(v4.sent) == 1  # the first beacon left before the failure
    sends = [e for e in logs if "Cannot send" in e.get("log_format", "")]
    assert len(sends) == 1 and sends[0]["family"] == "IPv4"


def test_interfaces_that_come_change_and_go_are_followed(lan: FakeLan) -> None:
    peer = make_node(lan, 2, [iface("eth0", "fe80::b", "192.0.2.2")])
    peer.adapter.start()
    a = make_node(lan, 1, [])
    a.adapter.start()
    run(lan.clock, 1.0)
    assert a.adapter.interfaces == {} and a.seen() == []
    # eth0 comes up, its IPv6 link-local address still tentative (not listed yet).
    a.interfaces.append(iface("eth0", v4="192.0.2.1"))
    run(lan.clock, 2.0)
    assert a.adapter.interfaces == {"eth0": ("IPv4",)}
    assert peer.seen()[-1] == PeerSeen(1, "192.0.2.1", 4001, "eth0", True)
    # Duplicate address detection ends: IPv6 opens and is advertised first.
    a.interfaces[0] = replace(a.interfaces[0], ipv6_link_local=("fe80::a",))
    run(lan.clock, 2.0)
    assert a.adapter.interfaces == {"eth0": ("IPv6", "IPv4")}
    assert peer.seen()[-1] == PeerSeen(1, "fe80::a%eth0", 4001, "eth0", False, ("192.0.2.1",))
    # eth0 goes away: its channels are closed and nothing more is sent.
    ports = a.sockets.ports("eth0", socket.AF_INET) + a.sockets.ports("eth0", socket.AF_INET6)
    a.interfaces.clear()
    run(lan.clock, 2.0)
    assert a.adapter.interfaces == {} and a.adapter.core.interfaces == ()
    assert not any(p.open for p in ports)
    sent = sum(len(p.sent) for p in ports)
    run(lan.clock, 10.0)
    assert sum(len(p.sent) for p in ports) == sent


def test_rescans_are_quick_while_interfaces_settle_then_slow(lan: FakeLan) -> None:
    interfaces = [iface("eth0", v4="192.0.2.1")]
    scans: list[float] = []

    def scan() -> list[Interface]:
        scans.append(lan.clock.seconds())
        return list(interfaces)

    rng = random.Random(1)
    core = Discovery(KEY, 1, 4001, rng, rng.randbytes)
    adapter = MulticastDiscovery(core, lan.clock, FakeSockets(lan, {}), scan, lambda e: None)
    adapter.start()
    run(lan.clock, 15.0)
    assert len([t for t in scans if t < 5.0]) == 20  # every 0.25 s while settling
    assert len([t for t in scans if 5.0 <= t < 15.0]) == 5  # then every 2 s
    interfaces.append(iface("eth1", v6="fe80::1", index=3))  # a change: settle again
    run(lan.clock, 5.0)
    assert adapter.interfaces == {"eth0": ("IPv4",), "eth1": ("IPv6",)}
    assert len([t for t in scans if t >= 15.0]) > 10


def test_a_down_interface_gets_no_channel(lan: FakeLan) -> None:
    a = make_node(lan, 1, [replace(iface("eth0", v4="192.0.2.1"), up=False)])
    a.adapter.start()
    assert a.adapter.interfaces == {} and a.sockets.opened == []


def test_seeds_are_passed_on_at_start(lan: FakeLan) -> None:
    config = DiscoveryConfig(seeds=(Seed("seed.example", 4000),))
    a = make_node(lan, 1, [], config=config)
    a.adapter.start()
    assert [e for _, e in a.events] == [SeedCandidate("seed.example", 4000)]


def test_a_beacon_from_another_network_is_ignored_and_logged_for_debugging(
    lan: FakeLan, logs: list[LogEvent]
) -> None:
    a = make_node(lan, 1, [iface("eth0", v4="192.0.2.1")])
    a.adapter.start()
    rng = random.Random(5)
    stranger = MulticastDiscovery(
        Discovery(bytes(32), 5, 4005, rng, rng.randbytes),
        lan.clock,
        FakeSockets(lan, {"eth0": "lan"}),
        lambda: [iface("eth0", v4="192.0.2.5")],
        lambda e: None,
    )
    stranger.start()
    run(lan.clock, 1.0)
    assert a.seen() == []
    assert a.adapter.core.stats.ignored_unauthenticated == 4
    debug = [e for e in logs if "other network" in e.get("log_format", "")]
    assert debug and debug[0]["source"] == "192.0.2.5"


def test_stop_closes_every_channel_and_leaves_no_timer(lan: FakeLan) -> None:
    a = make_node(lan, 1, [iface("eth0", "fe80::a", "192.0.2.1")])
    a.adapter.start()
    run(lan.clock, 1.0)
    done = a.adapter.stop()
    assert done.called
    assert lan.ports == [] and not any(p.open for p in a.sockets.opened)
    assert lan.clock.getDelayedCalls() == []


# -- real sockets, nothing sent -------------------------------------------------------


class AdoptingReactor:
    """Keeps the sockets MulticastSockets hands over, instead of reading from them."""

    def __init__(self) -> None:
        self.adopted: list[socket.socket] = []

    def adoptDatagramPort(
        self, fd: int, family: int, protocol: DatagramProtocol, maxPacketSize: int = 8192
    ) -> None:
        self.adopted.append(socket.fromfd(fd, family, socket.SOCK_DGRAM))


def test_loopback_sockets_are_pinned_with_ttl_0_and_share_one_port() -> None:
    """Sets options on real sockets bound to the group on ``lo``; sends nothing."""
    (lo,) = [i for i in list_interfaces() if i.name == "lo"]
    reactor = AdoptingReactor()
    sockets = MulticastSockets(reactor, 0)  # type: ignore[arg-type]
    protocol = DatagramProtocol()
    first = sockets.open(lo, socket.AF_INET, protocol)
    second = sockets.open(lo, socket.AF_INET, protocol)
    try:
        assert first == second == (GROUP_V4, sockets.port) and sockets.port != 0
        for sock in reactor.adopted:
            assert sock.getsockname() == (GROUP_V4, sockets.port)
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 0
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 1
            interface = sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)
            assert socket.inet_ntoa(interface) == "127.0.0.1"
    finally:
        for sock in reactor.adopted:
            sock.close()


def test_an_unusable_interface_raises_a_channel_error_naming_the_step() -> None:
    ghost = Interface(
        "ghost0", 999_999, up=True, multicast=True, loopback=True, ipv4=("127.0.0.1",)
    )
    with pytest.raises(ChannelError, match="IP_ADD_MEMBERSHIP failed"):
        MulticastSockets(AdoptingReactor(), 0).open(  # type: ignore[arg-type]
            ghost, socket.AF_INET, DatagramProtocol()
        )
