"""Whole nodes with the overlay on, in one process on loopback (seeds instead of multicast)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, globalLogPublisher

from irisnode.node import Node
from overlay.identity import NetworkKey
from overlay.ids import closer, format_id
from relay import codec
from tests.cluster import Cluster, cluster
from tests.support import raw_connect, reactor, wait_for

__all__ = ["cluster"]  # the fixture


def owner_of(key: int, ids: list[int]) -> int:
    best = ids[0]
    for candidate in ids[1:]:
        if closer(key, candidate, best):
            best = candidate
    return best


async def lookups_agree(nodes: list[Node], keys: list[int]) -> bool:
    ids = [n.overlay.node_id for n in nodes]
    for node in nodes:
        for key in keys:
            try:
                found = await node.overlay.lookup(key, timeout=1.0)
            except TimeoutError:
                return False
            if found != owner_of(key, ids):
                return False
    return True


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = reactor.seconds() + timeout
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.05)


@pytest_twisted.ensureDeferred
async def test_nodes_join_through_a_seed_and_route_every_key_to_its_owner(
    cluster: Cluster,
) -> None:
    first = await cluster.start()
    for _ in range(4):
        await cluster.start(seed=first)
    keys = [random.Random(7).getrandbits(128) for _ in range(20)]
    await eventually(lambda: lookups_agree(cluster.nodes, keys), 10.0, "routing to converge")
    for node in cluster.nodes:
        state = node.overlay.status()
        assert state["ready"]
        assert len(state["leaf_set"]["left"]) + len(state["leaf_set"]["right"]) >= 4


@pytest_twisted.ensureDeferred
async def test_status_and_lookup_over_the_relay(cluster: Cluster) -> None:
    first = await cluster.start()
    second = await cluster.start(seed=first)
    await wait_for(
        lambda: second.overlay.node_id in first.overlay.pastry.peers(), 5.0, "first to know second"
    )
    client = await raw_connect(first.relay_port)
    client.send(codec.Request(1, "$node.status", b"", 2000))
    reply = await client.next()
    assert isinstance(reply, codec.Replied)
    state = json.loads(reply.reply)
    assert state["overlay"]["node_id"] == format_id(first.overlay.node_id)
    assert state["overlay"]["network"] == "testnet"
    assert state["relay"]["connections"] == 1

    key = second.overlay.node_id
    client.send(codec.Request(2, "$node.lookup", format_id(key).encode(), 2000))
    assert await client.next() == codec.Replied(2, format_id(key).encode())

    client.send(codec.Request(3, "$node.lookup", b"not a key", 2000))
    fault = await client.next()
    assert isinstance(fault, codec.Faulted) and "32 hex digits" in fault.fault


@pytest_twisted.ensureDeferred
async def test_applications_cannot_register_reserved_clusters(cluster: Cluster) -> None:
    node = await cluster.start()
    client = await raw_connect(node.relay_port, None)
    client.send(codec.Init("$node.status"))
    denied = await client.next()
    assert isinstance(denied, codec.Denied) and "reserved" in denied.reason


@pytest_twisted.ensureDeferred
async def test_node_of_another_network_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    import os

    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        first = await cluster.start()
        second = await cluster.start(seed=first)
        await wait_for(lambda: len(first.overlay.links.links) == 1, 5.0, "a link")
        other_key = tmp_path / "other.key"
        NetworkKey.generate("testnet", os.urandom).save(other_key)  # same name, other key
        stranger = await cluster.start(seed=first, key_file=other_key)
        await wait_for(
            lambda: any(e.get("reason") == "wrong-network" for e in events),
            5.0,
            "the refusal to be logged",
        )
    finally:
        globalLogPublisher.removeObserver(observer)
    assert set(first.overlay.links.links) == {second.overlay.node_id}
    assert dict(stranger.overlay.links.links) == {}
    assert stranger.overlay.node_id not in first.overlay.pastry.peers()


@pytest_twisted.ensureDeferred
async def test_a_vanished_node_is_routed_around(cluster: Cluster) -> None:
    first = await cluster.start()
    for _ in range(3):
        await cluster.start(seed=first)
    keys = [random.Random(11).getrandbits(128) for _ in range(20)]
    await eventually(lambda: lookups_agree(cluster.nodes, keys), 10.0, "routing to converge")
    victim = cluster.nodes.pop()
    victim_id = victim.overlay.node_id
    # Like SIGKILL: the sockets just close, no goodbye.
    for link in list(victim.overlay.links.links.values()):
        link.transport.abortConnection()
    victim.overlay.stack = victim.overlay.pastry = None
    victim.overlay._timer.stop()
    await victim.overlay.links.stop()
    started = reactor.seconds()
    await wait_for(
        lambda: all(victim_id not in n.overlay.pastry.peers() for n in cluster.nodes),
        4.0,
        "every survivor to notice",
    )
    assert reactor.seconds() - started <= 3.5  # 3 s bound, plus polling and scheduling slack
    # The keys it owned (its own id among them) now belong to a survivor.
    await eventually(
        lambda: lookups_agree(cluster.nodes, [*keys, victim_id]), 3.0, "routing around it"
    )
    await victim.stop()


@pytest_twisted.ensureDeferred
async def test_a_lookup_nobody_answers_times_out_and_is_forgotten(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await cluster.start()
    lookups = node.overlay._lookup
    assert lookups is not None
    monkeypatch.setattr(lookups, "upcall", lambda event, now: ())  # the probe gets lost
    started = reactor.seconds()
    with pytest.raises(TimeoutError):
        await node.overlay.lookup(12345, timeout=0.2)
    assert 0.19 <= reactor.seconds() - started < 1.0
    assert node.overlay._lookups == {}
