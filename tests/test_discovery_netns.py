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
import subprocess
import sys
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


def run_nodes(
    reactor: Any,
    ids: Sequence[int],
    names: Sequence[str],
    network: bool,
    port: int,
    expect: Sequence[int],
    report: Callable[[Report], None],
    rescan_interval: float = 0.2,
) -> defer.Deferred[None]:
    """Run one node per id until each has seen every other id and every ``expect``."""
    started = reactor.seconds()
    sockets = MulticastSockets(reactor, port)
    missing = {i: (set(ids) | set(expect)) - {i} for i in ids}
    done: defer.Deferred[None] = defer.Deferred()
    finishing: list[object] = []
    adapters = []

    def on_event(node_id: int, event: DiscoveryEvent) -> None:
        if not isinstance(event, PeerSeen):
            return
        report(
            {
                "node": node_id,
                "peer": event.node_id,
                "address": event.address,
                "fallbacks": list(event.fallbacks),
                "port": event.port,
                "interface": event.interface,
                "first_time": event.first_time,
                "t": reactor.seconds() - started,
            }
        )
        missing[node_id].discard(event.node_id)
        if not any(missing.values()) and not finishing:
            # On the next turn: the beacon that answers this peer is still to be sent.
            finishing.append(reactor.callLater(0, done.callback, None))

    def scan() -> list[Any]:
        return list(select_interfaces(list_interfaces(), names, network=network))

    def announce_port() -> None:
        if sockets.port:
            report({"port": sockets.port})
        else:
            reactor.callLater(0.05, announce_port)

    for node_id in ids:
        rng = random.Random(node_id)
        core = Discovery(KEY, node_id, 4000 + node_id, rng, os.urandom, DiscoveryConfig())
        adapter = MulticastDiscovery(
            core,
            reactor,
            sockets,
            scan,
            functools.partial(on_event, node_id),
            rescan_interval=rescan_interval,
        )
        adapters.append(adapter)
        adapter.start()
    announce_port()

    def stop(result: object) -> defer.Deferred[object]:
        closing = defer.gatherResults([a.stop() for a in adapters])
        return closing.addCallback(lambda _: result)

    done.addTimeout(DEADLINE, reactor)
    return done.addBoth(stop)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run discovery nodes; print JSON lines.")
    parser.add_argument("--ids", required=True, help="comma-separated node ids")
    parser.add_argument("--expect", default="", help="ids of nodes in other processes")
    parser.add_argument("--interface", action="append", default=[])
    parser.add_argument("--net", action="store_true", help="network mode")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    from twisted.internet import task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    def emit(line: Report) -> None:
        print(json.dumps(line), flush=True)

    def run(reactor: Any) -> defer.Deferred[None]:
        return run_nodes(
            reactor,
            [int(i) for i in args.ids.split(",")],
            args.interface,
            args.net,
            args.port,
            [int(i) for i in args.expect.split(",") if i],
            emit,
        )

    task.react(run)


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
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[Report] = []

    def read_until(self, predicate: Callable[[Report], bool], deadline: float) -> Report:
        """The first line matching ``predicate``, reading no later than ``deadline``."""
        assert self.process.stdout is not None
        for line in self.lines:
            if predicate(line):
                return line
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if not ready:
                continue
            text = self.process.stdout.readline()
            if not text:
                break
            self.lines.append(json.loads(text))
            if predicate(self.lines[-1]):
                return self.lines[-1]
        raise AssertionError(f"child gave no expected line; stderr:\n{self.stderr()}")

    def finish(self, deadline: float) -> list[Report]:
        """Wait for a clean exit (all peers seen) and return every line printed."""
        remaining = max(0.1, deadline - time.monotonic())
        out, err = self.process.communicate(timeout=remaining)
        self.lines += [json.loads(line) for line in out.splitlines()]
        assert self.process.returncode == 0, f"child failed:\n{err}"
        return self.lines

    def stderr(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.communicate()[1]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def spawn() -> Iterator[Callable[[str, Sequence[str]], Child]]:
    """Starts child processes and kills those still running afterwards (by their pid)."""
    children: list[Child] = []

    def start(netns: str, args: Sequence[str]) -> Child:
        children.append(Child(netns, args))
        return children[-1]

    yield start
    for child in children:
        child.kill()


def seen_by(lines: list[Report], node: int) -> dict[int, Report]:
    """The first PeerSeen each peer produced at ``node``."""
    found: dict[int, Report] = {}
    for line in lines:
        if line.get("node") == node:
            found.setdefault(line["peer"], line)
    return found


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
def test_three_nodes_in_this_process_meet_on_loopback() -> Iterator[defer.Deferred[None]]:
    from twisted.internet import reactor

    lines: list[Report] = []
    yield run_nodes(reactor, [1, 2, 3], [], False, 0, [], lines.append)
    check_loopback_run(lines)


@pytest.mark.netns
def test_three_nodes_meet_on_loopback_in_a_namespace(
    netns: Callable[[str], str], spawn: Callable[[str, Sequence[str]], Child]
) -> None:
    """The same run, in a namespace whose ``lo`` we may flag MULTICAST ourselves."""
    name = netns("lo")
    ip("link", "set", "lo", "multicast", "on", netns=name)
    child = spawn(name, ["--ids", "1,2,3"])
    lines = child.finish(time.monotonic() + DEADLINE + 5)
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
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"],
                check=True,
                timeout=10,
            )
        if families != "ipv6":
            ip("addr", "add", v4, "dev", dev, netns=ns)
        ip("link", "set", dev, "up", netns=ns)
    deadline = time.monotonic() + DEADLINE + 5
    if families == "both":  # else IPv4 is found first, while IPv6 is still tentative
        for ns in (a, b):
            wait_for_dad(ns, deadline)
    first = spawn(a, ["--ids", "1", "--expect", "2", "--net", "--interface", "irvA"])
    port = first.read_until(lambda line: "port" in line, deadline)["port"]
    second = spawn(
        b, ["--ids", "2", "--expect", "1", "--net", "--interface", "irvB", "--port", str(port)]
    )
    at_a = seen_by(first.finish(deadline), 1)[2]
    at_b = seen_by(second.finish(deadline), 2)[1]
    assert (at_a["port"], at_a["interface"], at_a["first_time"]) == (4002, "irvA", True)
    assert (at_b["port"], at_b["interface"], at_b["first_time"]) == (4001, "irvB", True)
    if families == "ipv4":
        assert (at_a["address"], at_b["address"]) == ("10.77.0.2", "10.77.0.1")
    else:
        assert at_a["address"].startswith("fe80:") and at_a["address"].endswith("%irvA")
        assert at_b["address"].startswith("fe80:") and at_b["address"].endswith("%irvB")
        expected = ["10.77.0.2"] if families == "both" else []
        assert at_a["fallbacks"] == expected


if __name__ == "__main__":
    main()
