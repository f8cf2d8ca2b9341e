"""Scribe at scale, in the simulation: trees, multicast, anycast and repair, as figures.

    python -m bench.scribe_sim --nodes 1000 --groups 100 --fail 0.2 --seed 1 --json

Builds a network of Pastry + Scribe stacks (:class:`overlay.stack.OverlayStack`) whose
Pastry state is filled in by the oracle and then left to settle, gives each group
(half clusters, half topics) member nodes at random, and then measures, in
simulated time:

1. trees: every member node's path to the root (depth), children per node;
2. multicast: one message per group from a random node, every member node must
   get it exactly once;
3. anycast: a batch per group from random nodes, equal capacity: how far the
   busiest and idlest member nodes are from an even share; then one member node
   per group reports itself busy (a tenth of the capacity) and its share must fall;
4. control traffic in a quiet period (tree upkeep per node per second);
5. failure: a fraction of all nodes stop at once; how long until every surviving
   member node is reached again (the oracle checks every tree edge), with
   multicasts sent all through the repair, which must never deliver twice; then
   one more multicast per group must reach every surviving member node once.

Everything is seeded: the same arguments give the same figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from overlay.ids import key_for
from overlay.pastry import PastryConfig, PastryCore
from overlay.scribe import AnycastDelivered, GroupDelivered, ScribeConfig, ScribeCore
from overlay.scribe.messages import (
    ChildBeat,
    ParentBeat,
    Redirect,
    Subscribe,
    SubscribeAck,
    Unsubscribe,
)
from overlay.simulation import SimNetwork
from overlay.stack import OverlayStack

TREE_UPKEEP = (Subscribe, SubscribeAck, Redirect, Unsubscribe, ParentBeat, ChildBeat)


@dataclass(frozen=True, slots=True)
class Probe:
    """A multicast payload that names itself: (round, group index)."""

    round: int
    group: int


def scribe_of(net: SimNetwork, node_id: int) -> ScribeCore:
    core = net.core(node_id)
    assert isinstance(core, OverlayStack)
    return core.layer(ScribeCore)


def drive(
    net: SimNetwork, node_id: int, action: Callable[[ScribeCore, float], list[object]]
) -> None:
    """Call ``action`` on a node's Scribe now, and carry out its effects through the stack."""
    core = net.core(node_id)
    assert isinstance(core, OverlayStack)
    scribe = core.layer(ScribeCore)
    net.inject(node_id, lambda _core, now: core.run(action(scribe, now), now))


def build_network(
    nodes: int,
    seed: int,
    *,
    pastry: PastryConfig | None = None,
    scribe: ScribeConfig | None = None,
    latency: tuple[float, float] = (0.001, 0.01),
) -> SimNetwork:
    """``nodes`` Pastry + Scribe stacks with oracle-filled, settled Pastry state."""

    def factory(node_id: int, address: bytes, rng: random.Random) -> OverlayStack:
        core = PastryCore(node_id, address, rng, pastry)
        return OverlayStack(core, (ScribeCore(node_id, address, core, rng, scribe),))

    net = SimNetwork(seed, latency=latency, config=pastry, factory=factory)
    net.add_nodes(nodes)
    net.start_all_prefilled()
    net.run_for(2.0)
    return net


class ScribeExperiment:
    """One seeded run over ``groups`` groups; each step records its figures."""

    def __init__(self, net: SimNetwork, groups: int, seed: int) -> None:
        self.net = net
        self.rng = random.Random(seed ^ 0x5C1B)
        self.keys = [
            key_for("cluster" if i % 2 == 0 else "topic", f"group-{i}") for i in range(groups)
        ]
        self.members: list[set[int]] = []
        self.figures: dict[str, Any] = {"nodes": len(net.nodes), "groups": groups}
        self.multicasts = 0
        self.deliveries_expected = 0
        self.deliveries = 0
        self.duplicates = 0
        self._round = 0

    # -- building the trees --------------------------------------------------------------

    def join_members(self, *, spread: float = 1.0, reverse: bool = False) -> None:
        """Each group gets between 0.1 % and 10 % of the nodes (log-uniform), at least one,
        joining at random moments over ``spread`` seconds (in the opposite order with
        ``reverse``: the same members, the same network, another history)."""
        net, rng = self.net, self.rng
        live = net.live_ids()
        for key in self.keys:
            share = math.exp(rng.uniform(math.log(0.001), math.log(0.1)))
            count = max(1, min(len(live), round(len(live) * share)))
            chosen = set(rng.sample(live, count))
            self.members.append(chosen)
            for node in sorted(chosen):
                offset = rng.uniform(0.0, spread)
                at = net.now + (spread - offset if reverse else offset)
                net.clock.call_at(at, self._join, node, key)
        net.run_for(spread)

    def _join(self, node: int, key: int) -> None:
        if self.net.nodes[node].alive:
            drive(self.net, node, lambda scribe, now: scribe.join(key, now))

    def trees_complete(self) -> bool:
        return all(self.tree_ok(i) for i in range(len(self.keys)))

    def tree_ok(self, index: int) -> bool:
        """Every live member node has a chain of live, mutually agreeing edges to the root."""
        net, key = self.net, self.keys[index]
        root = net.true_owner(key)
        good: set[int] = set()
        for member in self.members[index]:
            if not net.nodes[member].alive:
                continue
            path: list[int] = []
            node = member
            while node not in good:
                group = scribe_of(net, node).group(key)
                if group is None or len(path) > 64:
                    return False
                path.append(node)
                parent = group.parent
                if parent is None:
                    if node != root or not group.root:
                        return False
                    break
                parent_group = scribe_of(net, parent).group(key)
                if (
                    not net.nodes[parent].alive
                    or parent_group is None
                    or node not in parent_group.children
                ):
                    return False
                node = parent
            good.update(path)
        return True

    def tree_shape(self) -> dict[str, float]:
        depths: list[int] = []
        for index, key in enumerate(self.keys):
            for member in self.members[index]:
                if not self.net.nodes[member].alive:
                    continue
                depth, node = 0, member
                while (group := scribe_of(self.net, node).group(key)) is not None and (
                    group.parent is not None
                ):
                    depth, node = depth + 1, group.parent
                depths.append(depth)
        children = [
            len(g.children)
            for n in self.net.live_ids()
            for g in scribe_of(self.net, n).groups.values()
        ]
        return {
            "mean_tree_depth": round(sum(depths) / max(1, len(depths)), 3),
            "max_tree_depth": max(depths, default=0),
            "max_children": max(children, default=0),
        }

    # -- multicast -----------------------------------------------------------------------

    def multicast_round(self) -> tuple[int, int]:
        """One multicast per group from a random live node; returns (sent round, count)."""
        self._round += 1
        net, rng = self.net, self.rng
        live = net.live_ids()
        for index, key in enumerate(self.keys):
            sender = rng.choice(live)
            probe = Probe(self._round, index)
            drive(net, sender, partial(_multicast, key, probe))
        self.multicasts += len(self.keys)
        return self._round, len(self.keys)

    def count_round(self, round_: int, *, expect_all: bool) -> tuple[int, int, int]:
        """(expected, delivered once, duplicates) for one round, from the recorded events."""
        got: Counter[tuple[int, int]] = Counter()
        for _, node, effect in self.net.events:
            if type(effect) is GroupDelivered:
                probe = effect.payload
                assert isinstance(probe, Probe)
                if probe.round == round_:
                    got[(node, probe.group)] += 1
        expected = {
            (node, index)
            for index, members in enumerate(self.members)
            for node in members
            if self.net.nodes[node].alive
        }
        once = sum(1 for pair in expected if got[pair] >= 1)
        duplicates = sum(count - 1 for count in got.values() if count > 1)
        if expect_all:
            self.deliveries_expected += len(expected)
            self.deliveries += once
        self.duplicates += duplicates
        return len(expected), once, duplicates

    # -- anycast -------------------------------------------------------------------------

    def anycast_shares(self, *, per_member: int = 40, sample: int = 20) -> dict[str, float]:
        """Equal capacity: largest deviation from an even share; then one busy member."""
        net, rng = self.net, self.rng
        candidates = [i for i, m in enumerate(self.members) if 3 <= len(m) <= 100]
        chosen = rng.sample(candidates, min(sample, len(candidates)))
        deviation = self._spread(chosen, per_member)
        busy: dict[int, int] = {}
        for index in chosen:
            node = min(self.members[index])
            busy[index] = node
            drive(net, node, partial(_set_capacity, self.keys[index], 0.1))
        net.run_for(1.0)
        start = len(net.events)
        self._send_anycasts(chosen, per_member)
        shares = []
        for index in chosen:
            counts = self._anycast_counts(index, start)
            total = sum(counts.values())
            even = total / len(self.members[index])
            shares.append(counts.get(busy[index], 0) / even if even else 0.0)
        return {
            "anycast_max_share_deviation": round(deviation, 4),
            "anycast_busy_share": round(max(shares, default=0.0), 4),
            "anycast_groups": len(chosen),
        }

    def _spread(self, chosen: Sequence[int], per_member: int) -> float:
        start = len(self.net.events)
        self._send_anycasts(chosen, per_member)
        worst = 0.0
        for index in chosen:
            counts = self._anycast_counts(index, start)
            total = sum(counts.values())
            even = total / len(self.members[index])
            for member in self.members[index]:
                worst = max(worst, abs(counts.get(member, 0) - even) / even)
        return worst

    def _send_anycasts(self, chosen: Sequence[int], per_member: int) -> None:
        net, rng = self.net, self.rng
        live = net.live_ids()
        for index in chosen:
            key = self.keys[index]
            for n in range(per_member * len(self.members[index])):
                drive(net, rng.choice(live), partial(_anycast, key, n))
        net.run_for(1.0)

    def _anycast_counts(self, index: int, start: int) -> Counter[int]:
        key = self.keys[index]
        counts: Counter[int] = Counter()
        for _, node, effect in self.net.events[start:]:
            if type(effect) is AnycastDelivered and effect.group == key:
                counts[node] += 1
        return counts

    # -- control traffic and failures ---------------------------------------------------------

    def control_traffic(self, seconds: float = 5.0) -> dict[str, float]:
        counts = self.net.message_counts
        before = {kind: counts.get(kind, 0) for kind in TREE_UPKEEP}
        pastry_before = self.net.messages_sent
        self.net.run_for(seconds)
        upkeep = sum(counts.get(kind, 0) - before[kind] for kind in TREE_UPKEEP)
        live = len(self.net.live_ids())
        return {
            "control_msgs_per_node_per_s": round(upkeep / live / seconds, 2),
            "all_msgs_per_node_per_s": round(
                (self.net.messages_sent - pastry_before) / live / seconds, 2
            ),
        }

    def fail_and_repair(self, fraction: float, *, timeout: float = 30.0) -> dict[str, float]:
        net, rng = self.net, self.rng
        live = net.live_ids()
        victims = rng.sample(live, int(len(live) * fraction))
        for victim in victims:
            net.kill(victim)
        started = net.now
        repaired: float | None = None
        rounds: list[int] = []
        next_round = net.now
        while net.now - started < timeout:
            if net.now >= next_round:
                rounds.append(self.multicast_round()[0])
                next_round = net.now + 0.5
            net.run_for(0.1)
            if self.trees_complete():
                repaired = net.now - started
                break
        net.run_for(1.0)
        for round_ in rounds:
            self.count_round(round_, expect_all=False)
        final, _ = self.multicast_round()
        net.run_for(1.0)
        self.count_round(final, expect_all=True)
        return {
            "failed": len(victims),
            "repair_seconds": round(repaired, 2) if repaired is not None else -1.0,
        }


def run(nodes: int, groups: int, fail: float, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    net = build_network(nodes, seed)
    experiment = ScribeExperiment(net, groups, seed)
    joined_at = net.now
    experiment.join_members()
    net.run_until(experiment.trees_complete, 10.0, step=0.25)
    trees_formed_in = net.now - joined_at
    figures = experiment.figures
    round_, _ = experiment.multicast_round()
    net.run_for(1.0)
    experiment.count_round(round_, expect_all=True)
    figures.update(experiment.tree_shape())
    figures["mean_hops"] = round(net.route_stats(_sample_keys(seed, 500)).mean_hops, 3)
    figures.update(experiment.anycast_shares())
    figures.update(experiment.control_traffic())
    if fail > 0:
        figures.update(experiment.fail_and_repair(fail))
    figures.update(
        {
            "member_nodes": sum(len(m) for m in experiment.members),
            "trees_formed_in": round(trees_formed_in, 2),
            "multicasts": experiment.multicasts,
            "deliveries_expected": experiment.deliveries_expected,
            "deliveries": experiment.deliveries,
            "duplicates": experiment.duplicates,
            "simulated_seconds": round(net.now, 2),
            "messages": net.messages_sent,
            "wall_seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )
    return figures


def _multicast(key: int, probe: Probe, scribe: ScribeCore, now: float) -> list[object]:
    return scribe.multicast(key, probe, now)


def _set_capacity(key: int, capacity: float, scribe: ScribeCore, now: float) -> list[object]:
    return scribe.set_capacity(key, capacity, now)


def _anycast(key: int, tag: int, scribe: ScribeCore, now: float) -> list[object]:
    return scribe.anycast(key, Probe(-1, tag), tag, now)


def _sample_keys(seed: int, count: int) -> list[int]:
    rng = random.Random(seed ^ 0xBEEF)
    return [rng.getrandbits(128) for _ in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scribe_sim", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--fail", type=float, default=0.2, help="fraction of nodes that fail")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object, nothing else")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.groups < 1 or not 0 <= args.fail < 1:
        parser.error("need --nodes >= 2, --groups >= 1 and 0 <= --fail < 1")
    figures = run(args.nodes, args.groups, args.fail, args.seed)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
