"""Every scheme across real nodes on loopback: services on one node, clients on another.

The applications use the unchanged relay protocol (our bindings, and raw packets),
so they cannot tell whether a member is on their own node or elsewhere.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from irisnode.node import Node
from relay import codec
from relay.client import errors, txclient
from tests.cluster import Cluster, cluster
from tests.support import raw_connect, reactor, wait_for

__all__ = ["cluster"]  # the fixture


class Echo(txclient.ServiceHandler):
    """Echoes requests and tunnel messages; records broadcasts."""

    def __init__(self) -> None:
        self.broadcasts: list[bytes] = []
        self.requests = 0

    def handle_request(self, request: bytes) -> bytes:
        self.requests += 1
        if request.startswith(b"fail:"):
            raise ValueError(request[5:].decode())
        return request

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.append(message)

    async def handle_tunnel(self, tunnel: txclient.Tunnel) -> None:
        while True:
            try:
                message = await tunnel.recv()
            except errors.ConnectionClosed:
                return
            await tunnel.send(message)


async def linked(cluster: Cluster, count: int) -> list[Node]:
    first = await cluster.start()
    nodes = [first] + [await cluster.start(seed=first) for _ in range(count - 1)]
    for node in nodes:
        await wait_for(lambda n=node: n.overlay.pastry.is_ready, 5.0, "ready")  # type: ignore[misc]
        await wait_for(
            lambda n=node: len(n.overlay.pastry.peers()) >= count - 1,  # type: ignore[misc]
            5.0,
            "every node to know every other",
        )
    return nodes


async def failure_of(deferred: Deferred[Any]) -> BaseException:
    try:
        result = await deferred
    except BaseException as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")


async def eventually_served(conn: txclient.Connection, cluster: str, payload: bytes) -> bytes:
    """The first request after a service registers elsewhere may race its tree join."""
    reply: bytes = await conn.request(cluster, payload, 5.0)
    return reply


@pytest_twisted.ensureDeferred
async def test_bindings_on_one_node_use_a_service_on_another(cluster: Cluster) -> None:
    a, b, c = await linked(cluster, 3)
    echo = Echo()
    service = await txclient.register(reactor, "echo", echo, a.relay_port)
    conn = await txclient.connect(reactor, b.relay_port)

    assert await eventually_served(conn, "echo", b"hello") == b"hello"
    fault = await failure_of(conn.request("echo", b"fail:no such thing", 2.0))
    assert isinstance(fault, errors.RemoteFault) and str(fault) == "no such thing"
    nobody = await failure_of(conn.request("nobody", b"x", 0.2))
    assert isinstance(nobody, errors.Timeout)
    big = bytes(range(256)) * 4096 * 4  # 4 MiB each way
    assert await conn.request("echo", big, 10.0) == big

    conn.broadcast("echo", b"to all")
    await wait_for(lambda: echo.broadcasts == [b"to all"], 5.0, "the broadcast")

    events: list[bytes] = []
    listener = await txclient.connect(reactor, c.relay_port)
    listener.subscribe("news", events.append)
    await wait_for(lambda: c.messaging.status()["trees"].get("topic news"), 5.0)
    for n in range(3):
        conn.publish("news", b"event %d" % n)
    await wait_for(lambda: len(events) == 3, 5.0, "three events")
    assert events == [b"event 0", b"event 1", b"event 2"]

    tunnel = await conn.tunnel("echo", 5.0)
    message = bytes(range(256)) * 4096 * 40  # 10 MiB each way
    await tunnel.send(message)
    assert await tunnel.recv(timeout=30.0) == message
    await tunnel.close()

    assert b.messaging.status()["remote_replies"] >= 3
    await listener.close()
    await conn.close()
    await service.close()


@pytest_twisted.ensureDeferred
async def test_raw_packets_across_nodes_and_members_on_both_sides(cluster: Cluster) -> None:
    a, b = await linked(cluster, 2)
    remote_member = await raw_connect(a.relay_port, "work")
    local_member = await raw_connect(b.relay_port, "work")
    client = await raw_connect(b.relay_port, "")
    # Each node knows the other has a member too.
    for node in (a, b):
        await wait_for(
            lambda n=node: n.messaging.groups()["clusters"].get("work", {}).get("other_nodes"),  # type: ignore[misc]
            5.0,
            "both members known on both nodes",
        )
    served = {"remote": 0, "local": 0}
    for request_id in range(40):
        client.send(codec.Request(request_id, "work", b"%d" % request_id, 5000))

    def serve() -> int:
        for name, member in (("remote", remote_member), ("local", local_member)):
            while member.packets:
                delivered = member.packets.pop(0)
                assert isinstance(delivered, codec.RequestDelivered)
                served[name] += 1
                member.send(codec.Reply(delivered.request_id, delivered.request))
        return len(client.packets)

    await wait_for(lambda: serve() >= 40, 10.0, "40 replies")
    replies = await client.take(40)
    assert sorted(p.request_id for p in replies) == list(range(40))
    assert all(isinstance(p, codec.Replied) for p in replies)
    # Both members, on both nodes, took a share.
    assert served["remote"] >= 8 and served["local"] >= 8
    # A broadcast from the client reaches both members once.
    client.send(codec.Broadcast("work", b"all"))
    assert await remote_member.next() == codec.BroadcastDelivered(b"all")
    assert await local_member.next() == codec.BroadcastDelivered(b"all")
