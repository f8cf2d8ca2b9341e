"""Scribe over Pastry in the simulation: whole networks of trees, as the issue's figures ask.

The experiment itself lives in :mod:`bench.scribe_sim` (``python -m bench.scribe_sim``
prints the same figures); these tests assert on them.
"""

from __future__ import annotations

import math

import pytest

from bench.scribe_sim import ScribeExperiment, build_network, run, scribe_of
from overlay.scribe import ScribeConfig


@pytest.fixture(scope="module")
def formed() -> ScribeExperiment:
    net = build_network(200, seed=3)
    experiment = ScribeExperiment(net, groups=20, seed=3)
    experiment.join_members()
    assert net.run_until(experiment.trees_complete, 5.0, step=0.1)
    return experiment


def test_every_multicast_reaches_every_member_node_exactly_once(formed: ScribeExperiment) -> None:
    for _ in range(3):
        round_, _ = formed.multicast_round()
        formed.net.run_for(0.5)
        expected, once, duplicates = formed.count_round(round_, expect_all=True)
        assert (once, duplicates) == (expected, 0)


def test_trees_are_shallow_and_fan_out_is_bounded(formed: ScribeExperiment) -> None:
    shape = formed.tree_shape()
    assert shape["mean_tree_depth"] <= math.log(200, 16) + 1
    assert shape["max_children"] <= ScribeConfig().max_children
    for node in formed.net.live_ids():
        sizes = scribe_of(formed.net, node).state_sizes()
        assert sizes["groups"] <= len(formed.keys)


def test_anycasts_spread_evenly_and_shift_away_from_a_busy_member(
    formed: ScribeExperiment,
) -> None:
    figures = formed.anycast_shares(per_member=40, sample=10)
    assert figures["anycast_groups"] >= 3
    assert figures["anycast_max_share_deviation"] <= 0.25
    # Reported at a tenth of the capacity, a member gets about a tenth of its share.
    assert figures["anycast_busy_share"] <= 0.3


def test_after_a_fifth_fail_at_once_every_group_is_repaired_within_5_s_without_duplicates() -> None:
    net = build_network(200, seed=5)
    experiment = ScribeExperiment(net, groups=20, seed=5)
    experiment.join_members()
    assert net.run_until(experiment.trees_complete, 5.0, step=0.1)
    figures = experiment.fail_and_repair(0.2)
    assert 0 <= figures["repair_seconds"] <= 5.0
    assert experiment.duplicates == 0
    assert experiment.deliveries == experiment.deliveries_expected > 0


@pytest.mark.parametrize("max_children", [16, 4])
def test_trees_do_not_depend_on_the_order_nodes_joined(max_children: int) -> None:
    """The same members joining in opposite orders end in the same trees (with a small
    fan-out limit too, so that children are pushed down)."""
    parents = []
    redirects = 0
    for reverse in (False, True):
        net = build_network(200, seed=9, scribe=ScribeConfig(max_children=max_children))
        experiment = ScribeExperiment(net, groups=12, seed=9)
        experiment.join_members(spread=1.0, reverse=reverse)
        assert net.run_until(experiment.trees_complete, 5.0, step=0.1)
        net.run_for(3.0)
        parents.append(
            {
                (node, key): group.parent
                for node in net.live_ids()
                for key, group in scribe_of(net, node).groups.items()
            }
        )
        redirects += sum(scribe_of(net, node).stats["redirects"] for node in net.live_ids())
    assert parents[0] == parents[1]
    assert (redirects > 0) == (max_children == 4)


@pytest.mark.slow
def test_a_thousand_nodes_with_fifty_clusters_and_fifty_topics() -> None:
    figures = run(1000, 100, 0.2, seed=1)
    assert figures["deliveries"] == figures["deliveries_expected"] > 0
    assert figures["duplicates"] == 0
    assert figures["mean_tree_depth"] <= math.log(1000, 16) + 1
    assert figures["max_children"] <= 32
    assert figures["anycast_max_share_deviation"] <= 0.25
    assert 0 <= figures["repair_seconds"] <= 5.0


def test_every_member_node_knows_how_many_other_member_nodes_there_are(
    formed: ScribeExperiment,
) -> None:
    formed.net.run_for(1.0)  # reports travel up and down the tree
    for index, key in enumerate(formed.keys):
        members = formed.members[index]
        for node in members:
            group = scribe_of(formed.net, node).group(key)
            assert group is not None and group.others() == len(members) - 1
