"""Real multicast discovery: on loopback, and across a veth pair between namespaces.

Nothing here touches the host's real interfaces. Loopback runs pin beacons to
127.0.0.1 with a TTL of 0. When the host's ``lo`` lacks the MULTICAST flag the
loopback run moves into a network namespace of its own (the host is never
changed); the veth runs build two namespaces joined only to each other. Every
namespace is deleted, and every child process killed, even when a test fails.

Run as a module, this file is the child process of those tests::

    python -m tests.test_discovery_netns --ids 1,2,3 [--interface NAME] [--net] ...

runs discovery nodes in one process and prints what they see as JSON lines.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from overlay.discovery import Discovery, DiscoveryConfig, DiscoveryEvent, PeerSeen
from overlay.discovery_twisted import MulticastDiscovery, MulticastSockets
from overlay.interfaces import list_interfaces, select_interfaces

KEY = bytes(range(32))
ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 15.0
Report = dict[str, Any]


# -- the nodes (in this process, or in a child) ---------------------------------------


class Nodes:
    """Discovery nodes in one process, each PeerSeen reported as a JSON-able dict."""

    def __init__(
        self,
        reactor: Any,
        ids: Sequence[int],
        names: Sequence[str],
        network: bool,
        port: int,
        report: Callable[[Report], None],
    ) -> None:
        self.started = reactor.seconds()
        self._reactor = reactor
        self._report = report
        sockets = MulticastSockets(reactor, port)
        report({"started": self.started})
        self.adapters = []
        for node_id in ids:
            rng = random.Random(node_id)
            core = Discovery(KEY, node_id, 4000 + node_id, rng, os.urandom, DiscoveryConfig())
            adapter = MulticastDiscovery(
                core,
                reactor,
                sockets,
                lambda: select_interfaces(list_interfaces(), names, network=network),
                functools.partial(self._on_event, node_id),
            )
            self.adapters.append(adapter)
            adapter.start()
        self._announce_port(sockets)

    def _announce_port(self, sockets: MulticastSockets) -> None:
        """Tell the discovery port once the first channel has chosen it."""
        if sockets.port:
            self._report({"port": sockets.port})
        else:
            self._reactor.callLater(0.05, self._announce_port, sockets)

    def _on_event(self, node_id: int, event: DiscoveryEvent) -> None:
        if isinstance(event, PeerSeen):
            now = self._reactor.seconds()
            self._report(
                {
                    "node": node_id,
                    "peer": event.node_id,
                    "address": event.address,
                    "fallbacks": list(event.fallbacks),
                    "port": event.port,
                    "interface": event.interface,
                    "first_time": event.first_time,
                    "t": now - self.started,
                    "at": now,
                }
            )

    def stop(self) -> defer.Deferred[list[None]]:
        return defer.gatherResults([adapter.stop() for adapter in self.adapters])


def main(argv: Sequence[str] | None = None) -> None:
    """Run nodes until SIGTERM (or DEADLINE): the parent decides when all have met."""
    parser = argparse.ArgumentParser(description="Run discovery nodes; print JSON lines.")
    parser.add_argument("--ids", required=True, help="comma-separated node ids")
    parser.add_argument("--interface", action="append", default=[])
    parser.add_argument("--net", action="store_true", help="network mode")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    from twisted.internet import task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    def emit(line: Report) -> None:
        print(json.dumps(line), flush=True)

    def run(reactor: Any) -> defer.Deferred[object]:
        ids = [int(i) for i in args.ids.split(",")]
        nodes = Nodes(reactor, ids, args.interface, args.net, args.port, emit)
        return task.deferLater(reactor, DEADLINE, nodes.stop)

    task.react(run)


def everyone_met(lines: list[Report], ids: Sequence[int]) -> bool:
    return all(set(seen_by(lines, i)) >= set(ids) - {i} for i in ids)


def seen_by(lines: list[Report], node: int) -> dict[int, Report]:
    """The first PeerSeen each peer produced at ``node``."""
    found: dict[int, Report] = {}
    for line in lines:
        if line.get("node") == node:
            found.setdefault(line["peer"], line)
    return found


# -- fixtures -----------------------------------------------------------------------


def ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=10)


def need_root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to build network namespaces")


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Makes namespaces (loopback up) and deletes them all afterwards, whatever happened."""
    need_root()
    created: list[str] = []

    def make(tag: str) -> str:
        name = f"irisd-{os.getpid()}-{tag}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        created.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    yield make
    for name in created:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)


class Child:
    """One child process running nodes inside a namespace."""

    def __init__(self, netns: str, args: Sequence[str]) -> None:
        command = ["ip", "netns", "exec", netns, sys.executable, "-m", __name__, *args]
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.errors
        )
        self.lines: list[Report] = []
        self._partial = b""

    def pump(self) -> None:
        """Take in what the child has printed so far (call when its stdout is readable)."""
        assert self.process.stdout is not None
        data = os.read(self.process.stdout.fileno(), 65536)
        *complete, self._partial = (self._partial + data).split(b"\n")
        self.lines += [json.loads(line) for line in complete if line]

    def stop(self) -> str:
        """Terminate the child; return its log."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.errors.closed:
            return ""
        self.errors.seek(0)
        log = self.errors.read().decode(errors="replace")
        self.errors.close()
        return log


def collect(
    children: Sequence[Child], done: Callable[[list[Report]], bool], deadline: float
) -> list[Report]:
    """Every line the children print until ``done(lines)``; fails at ``deadline``."""
    streams = {child.process.stdout.fileno(): child for child in children if child.process.stdout}
    while True:
        lines = [line for child in children for line in child.lines]
        if done(lines):
            return lines
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            logs = "\n".join(child.stop() for child in children)
            raise AssertionError(f"timed out; children printed {lines}\nlogs:\n{logs}")
        ready, _, _ = select.select(list(streams), [], [], remaining)
        for stream in ready:
            streams[stream].pump()


@pytest.fixture
def spawn() -> Iterator[Callable[[str, Sequence[str]], Child]]:
    """Starts child processes and stops those still running afterwards (by their pid)."""
    children: list[Child] = []

    def start(netns: str, args: Sequence[str]) -> Child:
        children.append(Child(netns, args))
        return children[-1]

    yield start
    for child in children:
        child.stop()


def wait_for_dad(netns: str, deadline: float) -> None:
    """Until duplicate address detection has finished in ``netns``."""
    command = ["ip", "netns", "exec", netns, "ip", "-6", "addr", "show", "tentative"]
    while subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip():
        assert time.monotonic() < deadline, "IPv6 addresses stayed tentative"
        time.sleep(0.05)  # polling a condition, with a deadline


# -- loopback -----------------------------------------------------------------------


def loopback_has_multicast() -> bool:
    return any(i.loopback and i.multicast for i in list_interfaces())


def check_loopback_run(lines: list[Report]) -> None:
    for node in (1, 2, 3):
        peers = seen_by(lines, node)
        assert set(peers) == {1, 2, 3} - {node}
        for peer, line in peers.items():
            assert (line["address"], line["port"], line["interface"]) == (
                "127.0.0.1",
                4000 + peer,
                "lo",
            )
            assert line["first_time"] and line["fallbacks"] == []
            assert line["t"] < 1.0, "three nodes started together meet in the fast phase"


@pytest.mark.skipif(not loopback_has_multicast(), reason="lo lacks MULTICAST: see the netns test")
@pytest_twisted.inlineCallbacks
def test_three_nodes_in_this_process_meet_on_loopback() -> Iterator[defer.Deferred[object]]:
    from twisted.internet import reactor

    lines: list[Report] = []
    met: defer.Deferred[None] = defer.Deferred()

    def report(line: Report) -> None:
        lines.append(line)
        if everyone_met(lines, [1, 2, 3]) and not met.called:
            met.callback(None)

    nodes = Nodes(reactor, [1, 2, 3], [], False, 0, report)
    try:
        yield met.addTimeout(DEADLINE, reactor)
    finally:
        yield nodes.stop().addCallback(lambda _: None)
    check_loopback_run(lines)


@pytest.mark.netns
def test_three_nodes_meet_on_loopback_in_a_namespace(
    netns: Callable[[str], str], spawn: Callable[[str, Sequence[str]], Child]
) -> None:
    """The same run, in a namespace whose ``lo`` we may flag MULTICAST ourselves."""
    name = netns("lo")
    ip("link", "set", "lo", "multicast", "on", netns=name)
    child = spawn(name, ["--ids", "1,2,3"])
    lines = collect([child], lambda ls: everyone_met(ls, [1, 2, 3]), time.monotonic() + DEADLINE)
    check_loopback_run(lines)


# -- two namespaces joined by a veth pair -------------------------------------------


@pytest.mark.netns
@pytest.mark.parametrize("families", ["ipv6", "ipv4", "both"])
def test_two_namespaces_find_each_other_across_a_veth(
    families: str,
    netns: Callable[[str], str],
    spawn: Callable[[str, Sequence[str]], Child],
) -> None:
    """IPv6 link-local multicast (after duplicate address detection), IPv4, or both."""
    a, b = netns("a"), netns("b")
    # Created inside namespace a with its peer end moved straight into b: the pair
    # never exists in the host namespace.
    ip("link", "add", "irvA", "type", "veth", "peer", "name", "irvB", "netns", b, netns=a)
    for ns, dev, v4 in ((a, "irvA", "10.77.0.1/24"), (b, "irvB", "10.77.0.2/24")):
        if families == "ipv4":
            disable = f"net.ipv6.conf.{dev}.disable_ipv6=1"
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", disable], check=True)
        if families != "ipv6":
            ip("addr", "add", v4, "dev", dev, netns=ns)
        ip("link", "set", dev, "up", netns=ns)
    deadline = time.monotonic() + DEADLINE
    if families == "both":  # else IPv4 is found first, while IPv6 is still tentative
        for ns in (a, b):
            wait_for_dad(ns, deadline)
    first = spawn(a, ["--ids", "1", "--net", "--interface", "irvA"])
    (port,) = [
        line["port"]
        for line in collect([first], lambda ls: any("port" in line for line in ls), deadline)
        if "port" in line
    ]
    second = spawn(b, ["--ids", "2", "--net", "--interface", "irvB", "--port", str(port)])
    lines = collect([first, second], lambda ls: everyone_met(ls, [1, 2]), deadline)
    at_a, at_b = seen_by(lines, 1)[2], seen_by(lines, 2)[1]
    assert (at_a["port"], at_a["interface"], at_a["first_time"]) == (4002, "irvA", True)
    assert (at_b["port"], at_b["interface"], at_b["first_time"]) == (4001, "irvB", True)
    if families == "ipv4":
        assert (at_a["address"], at_b["address"]) == ("10.77.0.2", "10.77.0.1")
    else:
        assert at_a["address"].startswith("fe80:") and at_a["address"].endswith("%irvA")
        assert at_b["address"].startswith("fe80:") and at_b["address"].endswith("%irvB")
        assert at_a["fallbacks"] == (["10.77.0.2"] if families == "both" else [])


# -- five namespaces on a bridge ----------------------------------------------------


@pytest.mark.netns
@pytest.mark.parametrize(("families", "within"), [("both", 1.0), ("ipv6", 3.0)])
def test_five_namespaces_on_a_bridge_all_meet_quickly(
    families: str,
    within: float,
    netns: Callable[[str], str],
    spawn: Callable[[str, Sequence[str]], Child],
) -> None:
    """The LAN of the later multi-process tests, discovery alone: five processes
    started together, each on the default interfaces of network mode (its veth).

    With IPv4 they meet within a second of the last start; with IPv6 alone they
    also wait for duplicate address detection, which started with the links."""
    bridge = netns("br")
    ip("link", "add", "irbr0", "type", "bridge", netns=bridge)
    ip("link", "set", "irbr0", "up", netns=bridge)
    ids = range(1, 6)
    nodes = []
    for i in ids:
        ns = netns(f"n{i}")
        ip(
            "link",
            "add",
            f"irb{i}",
            "type",
            "veth",
            "peer",
            "name",
            "irv0",
            "netns",
            ns,
            netns=bridge,
        )
        ip("link", "set", f"irb{i}", "master", "irbr0", "up", netns=bridge)
        if families == "both":
            ip("addr", "add", f"10.78.0.{i}/24", "dev", "irv0", netns=ns)
        ip("link", "set", "irv0", "up", netns=ns)
        nodes.append(ns)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))  # any free number: the namespaces are empty anyway
        port = probe.getsockname()[1]
    children = [
        spawn(ns, ["--ids", str(i), "--net", "--port", str(port)])
        for i, ns in zip(ids, nodes, strict=True)
    ]
    lines = collect(children, lambda ls: everyone_met(ls, ids), time.monotonic() + DEADLINE)
    for i in ids:
        for peer, line in seen_by(lines, i).items():
            addresses = [line["address"], *line["fallbacks"]]
            if families == "both":
                assert f"10.78.0.{peer}" in addresses
            else:
                assert len(addresses) == 1 and addresses[0].startswith("fe80:")
            assert line["interface"] == "irv0"
    starts = [line["started"] for line in lines if "started" in line]
    met = max(line["at"] for line in lines if "at" in line)
    print(
        f"5 nodes ({families}): started over {max(starts) - min(starts):.3f} s;"
        f" all met {met - max(starts):.3f} s after the last start"
    )
    assert met - max(starts) < within


if __name__ == "__main__":
    main()
