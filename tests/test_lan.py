"""Real LAN: ``irisnode`` processes in network namespaces on a bridge (root only).

Each test builds its own LAN with :class:`tests.lan.Lan` (a switch namespace
holding the bridge, one namespace per node; nothing in the host namespace) and
removes it afterwards, whatever happened; the fixture then checks that the host
has no interface it did not have before. Figures (convergence, detection time)
are printed: run with ``-s`` to see them.

The first tests check the fixture itself and need no node: connectivity over
the bridge, cleanup, and that the capture sees plaintext when there is some
(so that the encryption test below could fail).
"""

from __future__ import annotations

import base64
import json
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.ids import closest, id_to_bytes
from tests.lan import (
    BRIDGE,
    NODE_IF,
    Lan,
    LanError,
    host_links,
    leaf_set,
    netns_available,
    netns_names,
    own_id,
    peers_listed,
    peers_up,
    wait_until,
)

pytestmark = pytest.mark.netns

DETECTION_BOUND = 3.0
"""A dead peer is noticed within this long by default (the node's failure detector)."""
POLL_SLACK = 1.0
"""Added to bounds for the time the statuses take to gather."""
CONVERGE_DEADLINE = 15.0


def random_keys(count: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(128) for _ in range(count)]


@pytest.fixture
def make_lan() -> Iterator[Callable[..., Lan]]:
    """Builds LANs; afterwards closes each (kills its processes, deletes its
    namespaces) and checks that nothing is left, in the namespaces or the host."""
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    before = host_links()
    lans: list[Lan] = []

    def make(size: int, **options: Any) -> Lan:
        lan = Lan(size, tag=f"t{len(lans)}", **options)
        lans.append(lan)
        return lan.open()

    yield make
    errors = []
    for lan in lans:
        try:
            lan.close()
        except LanError as error:
            errors.append(str(error))
    assert not errors, errors
    assert host_links() <= before, f"new interfaces on the host: {host_links() - before}"


def start_converged(lan: Lan, count: int, keys: list[int]) -> dict[int, int]:
    """Start nodes 0..count-1 together and wait for convergence; their node ids."""
    lan.start_agents()
    for i in range(count):
        lan.start_node(i)
    lan.wait_all_ready()
    return lan.wait_converged(range(count), keys, CONVERGE_DEADLINE).node_ids


# -- the fixture itself ----------------------------------------------------------------


def test_the_lan_connects_every_namespace_and_leaves_nothing_behind(
    make_lan: Callable[..., Lan],
) -> None:
    before = host_links()
    lan = make_lan(3)
    names = {lan.switch, *lan.namespaces}
    assert names <= netns_names()
    assert not {BRIDGE, NODE_IF, "irp0"} & host_links(), "nothing of the LAN is on the host"
    for i in range(3):
        for j in range(3):
            if i != j:
                lan.check_connectivity(i, j)
    sleeper = lan.spawn(1, [sys.executable, "-c", "import time; time.sleep(60)"])
    assert sleeper.popen.poll() is None
    lan.close()
    assert sleeper.popen.poll() is not None
    assert not names & netns_names()
    assert host_links() == before
    lan.close()  # twice is harmless


def test_a_failure_inside_the_lan_still_removes_it() -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    lan = Lan(2, tag="fail")
    with pytest.raises(RuntimeError, match="boom"), lan:
        lan.spawn(0, [sys.executable, "-c", "import time; time.sleep(60)"])
        raise RuntimeError("boom")
    assert not {lan.switch, *lan.namespaces} & netns_names()
    assert all(not process.alive for process in lan.processes)


def test_processes_log_lines_and_die_by_pid(make_lan: Callable[..., Lan]) -> None:
    lan = make_lan(1)
    code = 'import sys, time; print(\'{"message": "hi", "n": 1}\', file=sys.stderr, flush=True)'
    process = lan.spawn(0, [sys.executable, "-c", code + "; time.sleep(60)"])
    record = process.wait_for_log(lambda r: r.get("n") == 1, timeout=10)
    assert record["message"] == "hi"
    with pytest.raises(AssertionError, match="no log line"):
        process.wait_for_log("never printed", timeout=0.2)
    assert process.kill(signal.SIGKILL) == -signal.SIGKILL


def test_the_capture_sees_plaintext_when_there_is_some(make_lan: Callable[..., Lan]) -> None:
    """The control for the encryption test: a raw TCP stream is visible in clear."""
    lan = make_lan(2)
    secret = b"plaintext-control-" * 20000  # many segments, so reassembly matters
    capture = lan.capture()
    with lan.socket(1) as server, lan.socket(0) as client:
        server.bind((lan.address(1), 0))
        server.listen(1)
        client.connect((lan.address(1), server.getsockname()[1]))
        accepted, _ = server.accept()
        client.sendall(secret)
        client.shutdown(socket.SHUT_WR)
        received = b""
        with accepted:
            while chunk := accepted.recv(1 << 16):
                received += chunk
    capture.stop()
    assert received == secret
    assert secret in capture.tcp_streams().values()


# -- nodes ---------------------------------------------------------------------------


def test_five_nodes_discover_each_other_and_converge(make_lan: Callable[..., Lan]) -> None:
    lan = make_lan(5)
    keys = random_keys(50)
    lan.start_agents()
    for i in range(5):
        lan.start_node(i)
    converged = lan.wait_converged(range(5), keys, CONVERGE_DEADLINE)  # polled from the start
    ready = [lan.nodes[i].wait_ready() for i in range(5)]
    last_ready = max(node.ready_at or 0.0 for node in lan.nodes.values())
    ids = converged.node_ids
    print(
        f"\n5 nodes started together: ready {min(ready):.3f}-{max(ready):.3f} s after spawning;"
        f" converged {converged.at - lan.nodes[4].started:.3f} s after the last start,"
        f" {converged.at - last_ready:.3f} s after the last ready line ({converged.rounds} polls)"
    )
    assert len(set(ids.values())) == 5
    assert converged.owners == [closest(key, ids.values()) for key in keys]
    assert set(converged.owners) - set(ids.values()) == set()
    for i, state in lan.statuses(range(5)).items():
        others = set(ids.values()) - {ids[i]}
        assert leaf_set(state) == others and others <= peers_up(state)
        overlay = state.get("overlay", state)
        assert overlay["network"] == lan.network and overlay["ready"] is True
    # Asked as a user would (a fresh process, exit code and stdout), from the last node.
    result = lan.cli(
        4, "lookup", f"{keys[0]:032x}", "--relay-port", str(lan.relay_port), fresh=True
    )
    assert result.returncode == 0 and int(result.stdout, 16) == converged.owners[0]


@pytest.mark.parametrize("name", ["same name", "another name"])
def test_a_node_with_another_key_is_refused_by_all(name: str, make_lan: Callable[..., Lan]) -> None:
    """A different key, under the same or another network name. Its beacons do not
    open for the others (nor theirs for it), so each side is pointed at the other
    with ``--seed``: the legitimate nodes dial it, see its certificate, refuse it."""
    lan = make_lan(6)
    intruder = 5
    intruder_link = f"{lan.address(intruder)}:{lan.link_port}"
    legit = range(5)
    lan.start_agents()
    for i in legit:
        lan.start_node(i, seeds=[intruder_link])
    network = lan.network if name == "same name" else "another-network"
    lan.start_node(
        intruder,
        key=lan.keygen(network),
        network=network,
        seeds=[f"{lan.address(i)}:{lan.link_port}" for i in legit],
    )
    lan.wait_all_ready()
    ids = lan.wait_converged(legit, random_keys(20), CONVERGE_DEADLINE).node_ids
    for i in legit:
        refusal = lan.nodes[i].wait_for_log(
            lambda r: (
                r.get("reason") == "wrong-network"
                and lan.address(intruder) in str(r.get("address", ""))
            ),
            timeout=10,
        )
        assert lan.address(intruder) in refusal["message"], "the line names the peer's address"
    alone = lan.status(intruder)
    intruder_id = own_id(alone)
    assert peers_up(alone) == set() and leaf_set(alone) == set()
    assert lan.nodes[intruder].refusals(), "it logged refusing them too"
    for i, state in lan.statuses(legit).items():
        assert intruder_id not in peers_listed(state) | leaf_set(state)
        assert leaf_set(state) == set(ids.values()) - {ids[i]}
    assert lan.lookup(intruder, ids[0]) == intruder_id, "it routes everything to itself"


@pytest.mark.parametrize("how", ["sigkill", "cable-pulled"])
def test_a_dead_node_is_noticed_and_routed_around(how: str, make_lan: Callable[..., Lan]) -> None:
    """SIGKILL: the kernel closes the victim's connections. Cable pulled (its switch
    port down, the process alive but cut off): only the failure detector can tell."""
    lan = make_lan(5)
    keys = random_keys(50)
    ids = start_converged(lan, 5, keys)
    victim, survivors = 2, [0, 1, 3, 4]
    killed_at = time.monotonic()
    if how == "sigkill":
        lan.nodes[victim].kill(signal.SIGKILL)
    else:
        lan.pull_cable(victim)

    def forgotten() -> bool:
        states = lan.statuses(survivors)
        return all(ids[victim] not in leaf_set(s) | peers_up(s) for s in states.values())

    wait_until(forgotten, DETECTION_BOUND + POLL_SLACK, "the survivors to drop the dead node")
    detected = time.monotonic() - killed_at
    print(f"\n{how}: survivors dropped the dead node after {detected:.3f} s")
    assert detected <= DETECTION_BOUND + POLL_SLACK
    owners = [closest(key, [ids[i] for i in survivors]) for key in keys]
    mismatches = lan.routes_agree(survivors, keys, owners, timeout=2.0)
    assert mismatches == dict.fromkeys(survivors), mismatches


def test_link_traffic_shows_nothing_in_clear(make_lan: Callable[..., Lan]) -> None:
    """Everything from discovery to lookups, captured on the switch: no network
    name, key, node id or node key in clear, and no looked-up key. The handshake's
    magic ``irislink`` and the beacons' ``IRB`` prove the capture saw the links."""
    network = "lan-secret-network-name"
    lan = make_lan(5, network=network)
    marker_key = int.from_bytes(b"LOOKUP-PLAINTEXT", "big")
    capture = lan.capture()
    try:
        ids = start_converged(lan, 5, random_keys(10))
        owner = closest(marker_key, ids.values())
        askers = [i for i in range(5) if ids[i] != owner]
        for i in askers:
            assert lan.lookup(i, marker_key) == owner
    finally:
        capture.stop()
    streams = capture.tcp_streams()
    links = {flow: data for flow, data in streams.items() if lan.link_port in (flow[1], flow[3])}
    beacons = capture.udp_payloads()
    assert len(links) >= 8 and sum(map(len, links.values())) > 4000, "link traffic was captured"
    assert any(data[4:12] == b"irislink" for data in links.values()), "msg1 (length, magic)"
    assert any(payload.startswith(b"IRB") for payload in beacons)

    secrets: dict[str, bytes] = {
        "network name": network.encode(),
        "looked-up key": id_to_bytes(marker_key),
        "looked-up key (hex)": f"{marker_key:032x}".encode(),
    }
    key_file = json.loads(Path(lan.key).read_text())
    secrets["network public key"] = base64.b64decode(key_file["public"])
    secrets["network seed"] = base64.b64decode(key_file["seed"])
    for i, node_id in ids.items():
        secrets[f"node {i} id"] = id_to_bytes(node_id)
        secrets[f"node {i} id (hex)"] = f"{node_id:032x}".encode()
        identity = json.loads((lan.tmp / f"state-{i}" / "node-identity.json").read_text())
        secrets[f"node {i} public key"] = base64.b64decode(identity["public"])
    everything = [*streams.values(), *beacons, *capture.frames]
    for what, secret in secrets.items():
        assert not any(secret in data for data in everything), f"{what} seen in clear"


def test_cli_status_and_lookup_without_a_node_fail_cleanly(make_lan: Callable[..., Lan]) -> None:
    lan = make_lan(1)
    status = lan.cli(0, "status", "--relay-port", str(lan.relay_port), "--json", fresh=True)
    assert status.returncode != 0 and status.stderr.strip()
    lookup = lan.cli(0, "lookup", "0" * 32, "--relay-port", str(lan.relay_port), fresh=True)
    assert lookup.returncode != 0 and lookup.stderr.strip()
    through_agent = lan.cli(0, "status", "--relay-port", str(lan.relay_port))
    assert through_agent.returncode == status.returncode and through_agent.stderr.strip()
