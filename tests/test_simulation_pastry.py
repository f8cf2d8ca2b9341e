"""Pastry at scale in the simulation: joins, routing, failures, leaves, reproducibility."""

from __future__ import annotations

import math
import random
from typing import cast

import pytest

from overlay import lookup, pastry
from overlay.ids import ID_DIGITS, random_id
from overlay.lookup import Lookup
from overlay.pastry import Deliver, PastryCore, PeerDead, Ready
from overlay.simulation import SimNetwork
from overlay.wire import MessageRegistry


def registry() -> MessageRegistry:
    registry = MessageRegistry()
    pastry.register(registry)
    lookup.register(registry)
    return registry


def keys(count: int, seed: int = 99) -> list[int]:
    rng = random.Random(seed)
    return [random_id(rng) for _ in range(count)]


def deaths(net: SimNetwork, since: float = 0.0) -> list[tuple[float, int, PeerDead]]:
    return [(t, n, e) for t, n, e in net.events if isinstance(e, PeerDead) and t >= since]


def assert_bounded(net: SimNetwork) -> None:
    half = net.config.leaf_half
    for node_id in net.live_ids():
        sizes = net.pastry(node_id).state_sizes()
        assert sizes["leaf_left"] <= half and sizes["leaf_right"] <= half
        assert sizes["leaf"] <= 2 * half
        assert sizes["table"] <= ID_DIGITS * 15
        assert sizes["peers"] <= sizes["leaf"] + sizes["table"]
        assert sizes["probes"] <= net.config.max_probes
        assert sizes["dead"] <= net.config.max_dead
        for row, members in net.pastry(node_id).routing_table().items():
            assert row < ID_DIGITS and len(members) <= 15


@pytest.fixture(scope="module")
def joined_200() -> SimNetwork:
    """200 nodes joined one by one (each waits for the last to be ready), then converged."""
    net = SimNetwork(2024)
    net.add_nodes(200)
    net.join_all(one_by_one=True)
    assert net.run_until_converged(10.0) is not None
    return net


def test_200_nodes_join_one_by_one_and_converge(joined_200: SimNetwork) -> None:
    net = joined_200
    assert len(net.live_ids()) == 200
    assert net.converged()
    ready = {n for _, n, e in net.events if isinstance(e, Ready)}
    assert ready == set(net.live_ids())
    assert not deaths(net)


def test_every_one_of_10000_keys_routes_to_the_closest_live_node(joined_200: SimNetwork) -> None:
    stats = joined_200.route_stats(keys(10_000))
    assert stats.keys == 10_000 and stats.lost == 0
    assert stats.correct == 10_000


def test_mean_hops_stay_within_log16_n_plus_one(joined_200: SimNetwork) -> None:
    stats = joined_200.route_stats(keys(2000, seed=5))
    assert stats.mean_hops <= math.log(200, 16) + 1
    assert stats.max_hops <= 5


def test_no_state_grows_past_its_bounds(joined_200: SimNetwork) -> None:
    assert_bounded(joined_200)


def test_real_messages_are_delivered_once_at_the_owner_through_the_codec() -> None:
    net = SimNetwork(11, codec=registry())
    net.add_nodes(60)
    net.join_all(one_by_one=False, interval=0.02)
    assert net.run_until_converged(10.0) is not None
    sent = keys(300, seed=1)
    live = net.live_ids()
    for i, key in enumerate(sent):
        net.route(live[i % len(live)], key, Lookup(i))
    net.run_for(1.0)
    delivered = {(e.route.key, n) for _, n, e in net.events if isinstance(e, Deliver)}
    assert delivered == {(key, net.true_owner(key)) for key in sent}
    nonces = [
        cast(Lookup, e.route.message).nonce for _, _, e in net.events if isinstance(e, Deliver)
    ]
    assert sorted(nonces) == list(range(300))


def test_routing_is_correct_again_within_10_s_after_20_percent_fail_at_once() -> None:
    net = SimNetwork(7)
    net.add_nodes(200)
    net.join_all(one_by_one=False, interval=0.01)
    assert net.run_until_converged(10.0) is not None
    victims = set(random.Random(3).sample(net.live_ids(), 40))
    killed_at = net.now
    for victim in victims:
        net.kill(victim)
    sample = keys(2000, seed=8)
    assert net.route_stats(sample).correct < 2000  # routes do break at first

    recovered = None
    while net.now - killed_at <= 10.0:
        net.run_for(0.5)
        if net.route_stats(sample).correct == 2000:
            recovered = net.now - killed_at
            break
    assert recovered is not None and recovered <= 10.0
    assert net.route_stats(keys(10_000)).correct == 10_000
    assert net.run_until_converged(10.0) is not None
    assert {e.peer_id for _, _, e in deaths(net, killed_at)} <= victims
    assert_bounded(net)


def test_a_dead_peer_is_noticed_within_3_s_by_every_node_that_knew_it() -> None:
    net = SimNetwork(12)
    net.add_nodes(40)
    net.join_all()
    assert net.run_until_converged(10.0) is not None
    victim = net.live_ids()[17]
    watchers = {n for n in net.live_ids() if victim in net.pastry(n).peers()}
    assert len(watchers) >= 16
    killed_at = net.now
    net.kill(victim)
    net.run_for(3.0)
    noticed = {n: t - killed_at for t, n, e in deaths(net, killed_at) if e.peer_id == victim}
    assert set(noticed) == watchers
    assert max(noticed.values()) <= 3.0
    assert all(e.peer_id == victim for _, _, e in deaths(net, killed_at))


def test_a_slow_but_live_peer_is_never_declared_dead() -> None:
    net = SimNetwork(13)
    ids = net.add_nodes(40)
    slow = ids[20]
    net.set_delay(slow, (0.8, 1.2))  # about a second each way, on top of the LAN
    net.join_all()
    assert net.run_until_converged(20.0) is not None
    net.run_for(30.0)
    assert not deaths(net)
    assert net.converged()
    owned = [k for k in keys(3000) if net.true_owner(k) == slow]
    assert owned and all(net.route_owner(k) == slow for k in owned)


@pytest.mark.parametrize("latency", [(0.9, 1.1), (0.3, 1.0)])
def test_a_network_with_long_latency_declares_nobody_dead(latency: tuple[float, float]) -> None:
    net = SimNetwork(14, latency=latency)
    net.add_nodes(30)
    net.join_all()
    assert net.run_until_converged(20.0) is not None
    net.run_for(30.0)
    assert not deaths(net)
    assert net.converged()


def test_a_graceful_leave_is_repaired_at_once() -> None:
    net = SimNetwork(15)
    net.add_nodes(60)
    net.join_all(one_by_one=False, interval=0.02)
    assert net.run_until_converged(10.0) is not None
    leaver = net.live_ids()[30]
    holders = {n for n in net.live_ids() if leaver in net.pastry(n).peers()}
    leaf_neighbours = {
        n for n in holders if any(leaver in side for side in net.pastry(n).leaf_set())
    }
    left_at = net.now
    net.leave(leaver)
    repaired = net.run_until_converged(1.0, step=0.01)
    assert repaired is not None and repaired <= 0.1  # a few LAN round trips, no timeout
    told = {n for t, n, e in deaths(net, left_at) if e == PeerDead(leaver, "left")}
    assert len(leaf_neighbours) == 16 and leaf_neighbours <= told
    assert not [e for _, _, e in deaths(net, left_at) if e.reason == "silent"]
    # Nodes that only had it in their routing table and were not in its state
    # cannot be told; they notice the silence as for a crash.
    net.run_for(3.0)
    assert {n for _, n, e in deaths(net, left_at) if e.peer_id == leaver} == holders


def test_concurrent_joins_converge() -> None:
    net = SimNetwork(16)
    net.add_nodes(300)
    net.join_all(one_by_one=False, interval=0.002)  # 500 joins per second
    assert net.run_until_converged(10.0) is not None
    assert net.route_stats(keys(3000)).correct == 3000


def test_a_lossy_network_still_converges_and_routes_correctly() -> None:
    net = SimNetwork(17, loss=0.05, codec=registry())
    net.add_nodes(60)
    net.join_all()
    assert net.run_until_converged(20.0) is not None
    assert net.route_stats(keys(3000)).correct == 3000


def test_two_halves_merge_again_when_the_link_layer_reconnects_them() -> None:
    net = SimNetwork(18)
    net.add_nodes(40)
    net.join_all()
    assert net.run_until_converged(10.0) is not None
    live = net.live_ids()
    left, right = live[::2], live[1::2]
    net.partition(left, right)
    net.run_for(10.0)
    for group in (left, right):
        for n in group:
            assert set(net.pastry(n).peers()) <= set(group)
    net.heal()
    a, b = left[0], right[0]
    net.inject(a, lambda core, now: net.pastry(a).link_up(b, net.ref(b).address, now))
    net.inject(b, lambda core, now: net.pastry(b).link_up(a, net.ref(a).address, now))
    assert net.run_until_converged(30.0) is not None
    assert net.route_stats(keys(2000)).correct == 2000


def test_joining_does_not_block_a_node_from_routing() -> None:
    net = SimNetwork(19)
    first, second = net.add_nodes(2)
    net.start(first)
    net.start(second, [first])
    pastry: PastryCore = net.pastry(second)
    assert not pastry.is_ready
    net.route(second, 123, b"early")  # answered at once, from whatever state there is
    assert [e for _, n, e in net.events if n == second and isinstance(e, Deliver)]


def _scripted_run(
    seed: int,
) -> tuple[list[tuple[float, int, int, str]], list[tuple[float, int, object]]]:
    net = SimNetwork(seed, loss=0.02, record_trace=True)
    net.add_nodes(50)
    net.join_all(one_by_one=False, interval=0.01)
    net.run_for(3.0)
    for victim in net.live_ids()[:5]:
        net.kill(victim)
    for i, key in enumerate(keys(50)):
        net.route(net.live_ids()[i % 45], key)
    net.run_for(5.0)
    assert net.trace is not None
    return net.trace, net.events


def test_the_same_seed_replays_the_same_run_event_for_event() -> None:
    trace, events = _scripted_run(21)
    again, events_again = _scripted_run(21)
    assert len(trace) > 10_000
    assert trace == again and events == events_again
    other, _ = _scripted_run(22)
    assert other != trace


@pytest.mark.slow
def test_2000_nodes_join_converge_route_and_recover() -> None:
    net = SimNetwork(2000)
    net.add_nodes(2000)
    net.join_all(one_by_one=False, interval=0.005)
    assert net.run_until_converged(20.0, step=0.5) is not None
    stats = net.route_stats(keys(10_000))
    assert stats.correct == 10_000
    assert stats.mean_hops <= math.log(2000, 16) + 1
    assert_bounded(net)
    victims = random.Random(1).sample(net.live_ids(), 400)
    killed_at = net.now
    for victim in victims:
        net.kill(victim)
    net.run_for(10.0)
    assert net.route_stats(keys(10_000, seed=4)).correct == 10_000
    assert {e.peer_id for _, _, e in deaths(net, killed_at)} <= set(victims)
