"""The messaging core across nodes, in the simulation: every scheme, exactly once, bounded."""

from __future__ import annotations

from functools import partial

import pytest

from irisnode.api import TUNNEL_WINDOW
from relay.ports import TunnelEnd
from tests.messaging_sim import App, MessagingSim, at_scale, echo


@pytest.fixture(scope="module")
def sim() -> MessagingSim:
    return MessagingSim(12, seed=4)


def test_a_request_reaches_a_member_on_another_node_and_the_reply_comes_back(
    sim: MessagingSim,
) -> None:
    a, b = sim.ids[0], sim.ids[5]
    member = sim.app(a, "member", "echo-1", answer=echo)
    client = sim.app(b, "client")
    sim.run_for(1.0)
    sim.request(client, 1, "echo-1", b"hi", 1000)
    sim.run_for(0.5)
    assert client.outcomes == {1: ("reply", b"hi")}
    (_, body, timeout_ms) = member.requests[0]
    assert body == b"hi" and 0 < timeout_ms <= 1000


def test_the_member_hears_the_time_the_request_has_left() -> None:
    sim = MessagingSim(6, seed=5)
    client = sim.app(sim.ids[1], "client")
    # No member anywhere yet: the request waits (asking again) until one registers.
    sim.request(client, 7, "late", b"x", 1000)
    sim.run_for(0.6)
    member = sim.app(sim.ids[4], "member", "late", answer=echo)
    sim.run_for(0.5)
    assert client.outcomes == {7: ("reply", b"x")}
    (_, _, timeout_ms) = member.requests[0]
    assert timeout_ms <= 400  # it waited 600 ms of its 1,000


def test_a_request_nobody_serves_times_out_once_at_its_deadline() -> None:
    sim = MessagingSim(6, seed=6)
    client = sim.app(sim.ids[0], "client")
    sim.request(client, 1, "nobody", b"x", 300)
    sim.run_for(0.29)
    assert client.outcomes == {}
    sim.run_for(0.5)
    assert client.outcomes == {1: ("timeout", None)} and client.duplicates == 0
    assert sim.cores[sim.ids[0]].given_up == {"no member anywhere": 1}


def test_faults_and_late_replies() -> None:
    sim = MessagingSim(6, seed=7)
    a, b = sim.ids[0], sim.ids[3]
    member = sim.app(a, "member", "slow")
    client = sim.app(b, "client")
    sim.run_for(1.0)
    for request_id in (1, 2):
        sim.request(client, request_id, "slow", b"?", 500)
    sim.run_for(0.1)
    (h1, _, _), (h2, _, _) = member.requests
    sim.fault(member, h1, "broken")
    sim.run_for(0.1)
    assert client.outcomes[1] == ("fault", "broken")
    sim.run_for(0.5)  # the second times out at the origin...
    sim.reply(member, h2, b"too late")
    sim.run_for(0.1)  # ...and its late reply is dropped quietly
    assert client.outcomes[2] == ("timeout", None) and client.duplicates == 0
    assert sim.cores[b].given_up == {"no answer in time": 1}


def test_a_busy_local_member_loses_to_an_idle_remote_one() -> None:
    sim = MessagingSim(8, seed=8)
    here, there = sim.ids[2], sim.ids[6]
    busy = sim.app(here, "busy", "work")  # never answers: its load grows
    idle = sim.app(there, "idle", "work", answer=echo)
    client = sim.app(here, "client")
    sim.run_for(1.0)
    for request_id in range(40):
        sim.request(client, request_id, "work", b"j", 5000)
        sim.run_for(0.02)
    sim.run_for(0.5)
    assert len(idle.requests) > 3 * len(busy.requests)


def test_broadcasts_and_events_reach_every_member_once_in_order(sim: MessagingSim) -> None:
    members = [sim.app(node, f"m{node:x}", "chat") for node in sim.ids[:6]]
    subscribers = [sim.app(node, f"s{node:x}") for node in sim.ids[3:9]]
    for app in subscribers:
        sim.subscribe(app, "news")
    sim.run_for(1.0)
    sender = members[0]
    for n in range(5):
        sim.broadcast(sender.node, "chat", b"b%d" % n)
        sim.publish(sim.ids[10], "news", b"e%d" % n)
    sim.run_for(1.0)
    for app in members:
        assert app.broadcasts == [b"b%d" % n for n in range(5)], app.name
    for app in subscribers:
        assert app.events == [("news", b"e%d" % n) for n in range(5)], app.name


def _transfer(end: TunnelEnd, size_or_cont: int, chunk: bytes, core: object, now: float) -> None:
    end.transfer(size_or_cont, chunk)


def _open_tunnel(sim: MessagingSim, cluster: str) -> tuple[App, App, int]:
    a, b = sim.ids[1], sim.ids[7]
    member = sim.app(a, "tmember", cluster)
    client = sim.app(b, "tclient")
    sim.run_for(1.0)
    sim.call(b, lambda core, now: core.open_tunnel(client, 5, cluster, 1000, now))
    sim.run_for(0.2)
    (offer,) = member.offers
    end = sim.call(a, lambda core, now: core.confirm_tunnel(member, offer, 50, now))
    assert end is not None
    member.tunnels[50] = end
    sim.run_for(0.2)
    assert 5 in client.tunnels and client.tunnel_credit[5] == TUNNEL_WINDOW
    return client, member, a


def test_a_tunnel_between_nodes_carries_chunks_in_order_with_end_to_end_credit(
    sim: MessagingSim,
) -> None:
    client, member, a = _open_tunnel(sim, "pipe")
    end = client.tunnels[5]
    message = bytes(range(256)) * 1024  # 256 KiB, in 4 chunks
    chunks = [message[i : i + 65536] for i in range(0, len(message), 65536)]
    for n, chunk in enumerate(chunks):
        sim.call(client.node, partial(_transfer, end, len(message) if n == 0 else 0, chunk))
    sim.run_for(0.2)
    assert 50 not in member.tunnel_data  # the member allowed nothing yet: nothing delivered
    sim.call(a, lambda core, now: member.tunnels[50].allow(len(message)))
    sim.run_for(0.2)
    got = member.tunnel_data[50]
    assert got[0][0] == len(message) and b"".join(c for _, c in got) == message
    # Bytes delivered to the member flow back as credit to the client.
    assert client.tunnel_credit[5] == TUNNEL_WINDOW + len(message)
    sim.call(client.node, lambda core, now: end.close())
    sim.run_for(0.2)
    assert member.closed == {50: ""} and client.closed == {5: ""}


def test_a_receiver_that_stops_reading_stalls_the_sender_within_bounded_memory() -> None:
    sim = MessagingSim(8, seed=9)
    client, _, _ = _open_tunnel(sim, "stall")
    end = client.tunnels[5]
    chunk = b"x" * 65536
    sent = 0
    first = True
    while client.tunnel_credit[5] - sent >= len(chunk):
        sim.call(client.node, partial(_transfer, end, 100 << 20 if first else 0, chunk))
        sent += len(chunk)
        first = False
        sim.run_for(0.001)
    sim.run_for(0.5)
    # The client used its whole window and got nothing back: it is stalled.
    assert sent >= TUNNEL_WINDOW and client.tunnel_credit[5] - sent < len(chunk)
    # The member's node holds at most one window, the client's node at most another.
    assert sent <= 2 * TUNNEL_WINDOW + len(chunk)


def test_a_dead_member_node_ends_requests_in_one_timeout_and_closes_tunnels() -> None:
    sim = MessagingSim(10, seed=10)
    client, _, a = _open_tunnel(sim, "fragile")
    sim.call(a, lambda core, now: core.attach(App("m2", a, sim=sim), "fragile2", now))
    sim.run_for(0.5)
    sim.request(client, 9, "fragile2", b"?", 2000)
    sim.run_for(0.05)
    sim.net.kill(a)
    sim.run_for(4.0)
    assert client.outcomes == {9: ("timeout", None)} and client.duplicates == 0
    assert client.closed[5]  # closed, with a reason


def test_at_scale_small() -> None:
    figures = at_scale(80, clusters=4, topics=4, seed=2, fail=0.2)
    assert figures.broadcasts_delivered == figures.broadcasts_expected > 0
    assert figures.events_delivered == figures.events_expected > 0
    assert (figures.duplicates, figures.out_of_order) == (0, 0)
    assert figures.max_share_deviation <= 0.25
    assert figures.slow_share <= 0.6
    assert figures.outcomes == figures.requests and figures.double_outcomes == 0


@pytest.mark.slow
def test_at_scale_a_thousand_nodes_fifty_clusters_fifty_topics() -> None:
    figures = at_scale(1000, clusters=50, topics=50, seed=1, fail=0.2)
    assert figures.broadcasts_delivered == figures.broadcasts_expected > 0
    assert figures.events_delivered == figures.events_expected > 0
    assert (figures.duplicates, figures.out_of_order) == (0, 0)
    assert figures.max_share_deviation <= 0.25
    assert figures.slow_share <= 0.6
    assert figures.outcomes == figures.requests and figures.double_outcomes == 0
