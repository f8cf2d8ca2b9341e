"""The Scribe core on its own: effects in, effects out, with a stand-in for Pastry's routing."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import lookup, pastry, scribe
from overlay.ids import ID_SPACE
from overlay.pastry import Deliver, Intercept, LeafSetChanged, PeerDead, Route, Send
from overlay.scribe import (
    AnycastDelivered,
    AnycastFailed,
    GroupDelivered,
    ScribeConfig,
    ScribeCore,
)
from overlay.scribe.group import material_change
from overlay.scribe.messages import (
    Anycast,
    AnycastFailure,
    ChildBeat,
    Multicast,
    ParentBeat,
    Redirect,
    Subscribe,
    SubscribeAck,
    Unsubscribe,
)
from overlay.stack import Forward, Received, RouteTo
from overlay.wire import MessageRegistry

KEY = 0x8000_0000_0000_0000_0000_0000_0000_0000
ME = 0x1000


@dataclass
class Router:
    """Pastry as Scribe sees it: where a key goes next (None: here)."""

    owner_here: bool = False
    next: int = 0x2000
    avoided: list[int | None] = field(default_factory=list)

    def next_hop(self, key: int, avoid: int | None = None) -> int | None:
        self.avoided.append(avoid)
        if self.owner_here or avoid == self.next:
            return None
        return self.next


def core(router: Router | None = None, **config: object) -> ScribeCore:
    return ScribeCore(
        ME,
        b"me",
        router or Router(),
        random.Random(1),
        ScribeConfig(**config),  # type: ignore[arg-type]
    )


def sends(effects: object) -> list[Send]:
    assert isinstance(effects, list | tuple)
    return [e for e in effects if isinstance(e, Send)]


def subscribe_route(child: int, capacity: float = 1.0) -> Route:
    return Route(KEY, child, b"c%x" % child, 1, True, Subscribe(KEY, b"c%x" % child, capacity, 1))


def with_parent(node: ScribeCore, parent: int = 0x2000, now: float = 0.0) -> None:
    node.join(KEY, now)
    node.upcall(Received(parent, SubscribeAck(KEY, b"p", 0)), now)
    group = node.group(KEY)
    assert group is not None and group.parent == parent


# --------------------------------------------------------------------------------
# Joining


def test_the_key_owner_is_the_root_and_sends_nothing() -> None:
    node = core(Router(owner_here=True))
    assert node.join(KEY, 0.0) == []
    group = node.group(KEY)
    assert group is not None and group.root and group.depth == 0


def test_a_member_subscribes_by_routing_towards_the_key_and_the_ack_makes_a_parent() -> None:
    node = core()
    assert node.join(KEY, 0.0, capacity=2.0) == [
        RouteTo(KEY, Subscribe(KEY, b"me", 2.0, 1), intercept=True)
    ]
    node.upcall(Received(0x2000, SubscribeAck(KEY, b"p", 3)), 0.1)
    group = node.group(KEY)
    assert group is not None
    assert (group.parent, group.depth, group.joining) == (0x2000, 4, False)


def test_a_node_on_the_way_adopts_the_child_answers_and_joins_itself() -> None:
    node = core()
    effects = node.upcall(Intercept(subscribe_route(0x5000), 0x5000, 0x2000), 0.0)
    assert Send(0x5000, b"c5000", SubscribeAck(KEY, b"me", 0)) in effects
    assert RouteTo(KEY, Subscribe(KEY, b"me", 1.0, 1), intercept=True) in effects
    group = node.group(KEY)
    assert group is not None and not group.member and set(group.children) == {0x5000}


def test_a_subscription_from_our_own_parent_is_passed_on_not_adopted() -> None:
    node = core()
    with_parent(node, 0x5000)
    route = subscribe_route(0x5000)
    assert node.upcall(Intercept(route, 0x5000, 0x2000), 0.0) == [Forward(route)]


def test_delivery_at_the_key_owner_makes_it_root_and_leaves_an_old_parent() -> None:
    node = core()
    with_parent(node, 0x2000)
    effects = node.upcall(Deliver(subscribe_route(0x5000)), 1.0)
    assert Send(0x2000, b"p", Unsubscribe(KEY)) in effects
    group = node.group(KEY)
    assert group is not None and group.root and group.parent is None


def test_a_second_parent_is_refused() -> None:
    node = core()
    with_parent(node, 0x2000)
    assert node.upcall(Received(0x3000, SubscribeAck(KEY, b"q", 0)), 1.0) == [
        Send(0x3000, b"q", Unsubscribe(KEY))
    ]


# --------------------------------------------------------------------------------
# Bounded fan-out


def _children_after(order: list[int]) -> tuple[set[int], dict[int, int]]:
    node = core(Router(owner_here=True), max_children=3)
    node.join(KEY, 0.0)
    redirected: dict[int, int] = {}
    for child in order:
        for send in sends(node.upcall(Deliver(subscribe_route(child)), 0.0)):
            if isinstance(send.message, Redirect):
                redirected[send.dst_id] = send.message.to_id
    group = node.group(KEY)
    assert group is not None
    return set(group.children), redirected


def test_excess_children_are_pushed_down_whatever_order_they_came_in() -> None:
    children = [KEY + 1, KEY - 2, KEY + 0x30, KEY + (1 << 100), KEY - (1 << 120), KEY + (5 << 90)]
    results = {
        frozenset(_children_after(list(order))[0]) for order in itertools.permutations(children)
    }
    assert results == {frozenset({KEY + 1, KEY - 2, KEY + 0x30})}  # the three nearest the key
    kept, redirected = _children_after(children)
    # Each pushed child goes under a kept child picked by its id: the excess spreads out.
    assert set(redirected) == set(children) - kept
    assert set(redirected.values()) <= kept and len(set(redirected.values())) > 1


def test_a_redirected_child_subscribes_straight_to_its_new_parent() -> None:
    node = core()
    node.join(KEY, 0.0)
    effects = node.upcall(Received(0x2000, Redirect(KEY, 0x7000, b"s")), 0.1)
    assert effects == [Send(0x7000, b"s", Subscribe(KEY, b"me", 1.0, 1))]
    node.upcall(Received(0x7000, SubscribeAck(KEY, b"s", 1)), 0.2)
    group = node.group(KEY)
    assert group is not None and group.parent == 0x7000 and group.depth == 2


def test_a_pushed_down_node_sends_the_children_pushed_to_it_back_up() -> None:
    node = core()
    with_parent(node, 0x2000)
    node.upcall(Intercept(subscribe_route(0x5000), 0x5000, 0x2000), 0.0)  # by its route
    node.upcall(Received(0x6000, Subscribe(KEY, b"c6000", 1.0, 1)), 0.0)  # pushed down to us
    effects = node.upcall(Received(0x2000, Redirect(KEY, 0x7000, b"s")), 1.0)
    assert Send(0x6000, b"c6000", Redirect(KEY, 0x2000, b"p")) in effects
    assert Send(0x7000, b"s", Subscribe(KEY, b"me", 2.0, 2)) in effects
    group = node.group(KEY)
    assert group is not None and set(group.children) == {0x5000}


# --------------------------------------------------------------------------------
# Multicast


def test_a_multicast_goes_to_the_root_then_down_once_to_each_child() -> None:
    sender = core()
    (route,) = sender.multicast(KEY, b"hello", 0.0)
    assert isinstance(route, RouteTo) and isinstance(route.message, Multicast)
    root = core(Router(owner_here=True))
    root.join(KEY, 0.0)
    root.upcall(Deliver(subscribe_route(0x5000)), 0.0)
    root.upcall(Deliver(subscribe_route(0x6000)), 0.0)
    message = route.message
    effects = root.upcall(Deliver(Route(KEY, ME, b"me", 2, False, message)), 0.1)
    assert sorted(s.dst_id for s in sends(effects)) == [0x5000, 0x6000]
    assert GroupDelivered(KEY, ME, b"hello") in effects
    # The same message again (a repair path): neither delivered nor passed on.
    assert root.upcall(Received(0x9000, message), 0.2) == []
    assert root.stats["duplicates"] == 1


def test_multicast_numbers_are_per_sender_and_an_older_one_is_not_delivered() -> None:
    node = core()
    with_parent(node, 0x2000)
    newer = Multicast(KEY, 0x9999, 7, 5, b"new")
    older = Multicast(KEY, 0x9999, 7, 4, b"old")
    other_run = Multicast(KEY, 0x9999, 8, 1, b"after a restart")
    assert node.upcall(Received(0x2000, newer), 0.0) == [GroupDelivered(KEY, 0x9999, b"new")]
    assert node.upcall(Received(0x2000, older), 0.0) == []
    assert node.upcall(Received(0x2000, other_run), 0.0) == [
        GroupDelivered(KEY, 0x9999, b"after a restart")
    ]


def test_a_multicast_for_a_group_without_a_tree_here_is_counted_and_dropped() -> None:
    node = core()
    assert node.upcall(Received(0x2000, Multicast(KEY, 1, 1, 1, b"x")), 0.0) == []
    assert node.stats["no_tree"] == 1


# --------------------------------------------------------------------------------
# Anycast


def test_anycasts_split_in_proportion_to_capacity() -> None:
    root = core(Router(owner_here=True))
    root.join(KEY, 0.0, capacity=1.0)
    root.upcall(Deliver(subscribe_route(0x5000, capacity=2.0)), 0.0)
    root.upcall(Deliver(subscribe_route(0x6000, capacity=1.0)), 0.0)
    picks: list[int] = []
    for tag in range(400):
        (effect,) = root.anycast(KEY, b"job", tag, 0.0)
        picks.append(ME if isinstance(effect, AnycastDelivered) else effect.dst_id)  # type: ignore[attr-defined]
    assert (picks.count(ME), picks.count(0x5000), picks.count(0x6000)) == (100, 200, 100)


def test_an_anycast_sent_down_stays_in_that_subtree() -> None:
    node = core()
    with_parent(node, 0x2000)
    node.set_capacity(KEY, 0.0, 0.0)
    node.upcall(Received(0x2000, ParentBeat(b"p", ((KEY, 0, 5.0, 3),))), 0.0)
    down = Anycast(KEY, 0x9999, b"o", 7, True, b"job")
    # Nothing below and it may not go back up: it fails, back to its origin.
    assert node.upcall(Received(0x2000, down), 0.0) == [Send(0x9999, b"o", AnycastFailure(KEY, 7))]
    # Started here, it may go up.
    (up,) = node.anycast(KEY, b"job", 8, 0.0)
    assert isinstance(up, Send) and up.dst_id == 0x2000


def test_a_failed_anycast_of_our_own_is_reported_here() -> None:
    node = core(Router(owner_here=True))
    node.join(KEY, 0.0, capacity=0.0)
    assert node.anycast(KEY, b"job", 3, 0.0) == [AnycastFailed(KEY, 3)]
    assert node.upcall(Received(0x2000, AnycastFailure(KEY, 4)), 0.0) == [AnycastFailed(KEY, 4)]


def test_a_node_outside_the_tree_routes_its_anycast_and_passes_others_on() -> None:
    node = core()
    message = Anycast(KEY, 0x9999, b"o", 7, False, b"job")
    route = Route(KEY, 0x9999, b"o", 1, True, message)
    assert node.upcall(Intercept(route, 0x9999, 0x2000), 0.0) == [Forward(route)]
    assert node.anycast(KEY, b"job", 1, 0.0) == [
        RouteTo(KEY, Anycast(KEY, ME, b"me", 1, False, b"job"), intercept=True)
    ]


def test_a_capacity_change_that_matters_is_reported_at_once() -> None:
    node = core()
    with_parent(node, 0x2000)
    assert sends(node.set_capacity(KEY, 0.9, 1.0)) == []  # a small drift waits for the beat
    assert sends(node.set_capacity(KEY, 0.1, 1.0)) == [
        Send(0x2000, b"p", ChildBeat(b"me", ((KEY, 0.1, 1),)))
    ]
    assert material_change(0.0, 0.01) and material_change(1.0, 0.0)
    assert not material_change(1.0, 0.8)


# --------------------------------------------------------------------------------
# Repair


def test_a_silent_parent_is_given_up_and_routed_around() -> None:
    router = Router()
    node = core(router)
    with_parent(node, 0x2000, now=0.0)
    node.on_timer(10.0)
    group = node.group(KEY)
    assert group is not None and group.parent is None
    # Avoiding the dead parent, this node owns the key now (the router says so).
    assert group.root and router.avoided[-1] == 0x2000


def test_silent_children_are_dropped_and_an_empty_forwarder_leaves() -> None:
    node = core()
    node.upcall(Intercept(subscribe_route(0x5000), 0x5000, 0x2000), 0.0)
    node.upcall(Received(0x2000, SubscribeAck(KEY, b"p", 0)), 0.0)
    node.upcall(Received(0x2000, ParentBeat(b"p", ((KEY, 0, 0.0, 0),))), 9.9)  # the parent lives
    effects = node.on_timer(10.0)
    assert Send(0x2000, b"p", Unsubscribe(KEY)) in effects
    assert node.group(KEY) is None


def test_beats_flow_both_ways_with_capacities() -> None:
    node = core()
    with_parent(node, 0x2000)
    node.upcall(Intercept(subscribe_route(0x5000, capacity=3.0), 0x5000, 0x2000), 0.0)
    node.upcall(Received(0x2000, ParentBeat(b"p", ((KEY, 0, 10.0, 4),))), 0.1)
    effects = node.on_timer(1.0)
    assert Send(0x2000, b"p", ChildBeat(b"me", ((KEY, 4.0, 2),))) in effects
    assert Send(0x5000, b"c5000", ParentBeat(b"me", ((KEY, 1, 11.0, 5),))) in effects


def test_a_beat_from_a_stranger_is_corrected_or_adopted() -> None:
    node = core()
    with_parent(node, 0x2000)
    assert node.upcall(Received(0x3000, ParentBeat(b"q", ((KEY, 0, 1.0, 1),))), 0.0) == [
        Send(0x3000, b"q", Unsubscribe(KEY))
    ]
    effects = node.upcall(Received(0x5000, ChildBeat(b"c", ((KEY, 2.0, 1),))), 0.0)
    assert Send(0x5000, b"c", SubscribeAck(KEY, b"me", 1)) in effects
    group = node.group(KEY)
    assert group is not None and group.children[0x5000].subtree == 2.0


def test_a_loop_shows_as_depth_and_the_node_starts_over() -> None:
    node = core(max_depth=10)
    with_parent(node, 0x2000)
    effects = node.upcall(Received(0x2000, ParentBeat(b"p", ((KEY, 10, 1.0, 1),))), 0.0)
    assert Send(0x2000, b"p", Unsubscribe(KEY)) in effects
    group = node.group(KEY)
    assert group is not None and group.parent is None


def test_peer_death_and_goodbyes_end_tree_edges() -> None:
    node = core()
    with_parent(node, 0x2000)
    node.upcall(Intercept(subscribe_route(0x5000), 0x5000, 0x2000), 0.0)
    node.upcall(PeerDead(0x5000, "silent"), 1.0)
    group = node.group(KEY)
    assert group is not None and not group.children
    node.upcall(Received(0x2000, Unsubscribe(KEY)), 1.0)
    assert group.parent is None


def test_roots_follow_their_keys_when_the_leaf_set_changes() -> None:
    router = Router()
    node = core(router)
    with_parent(node, 0x2000)
    router.owner_here = True
    assert node.upcall(LeafSetChanged(), 1.0) == [Send(0x2000, b"p", Unsubscribe(KEY))]
    group = node.group(KEY)
    assert group is not None and group.root
    router.owner_here = False
    effects = node.upcall(LeafSetChanged(), 2.0)
    assert effects == [RouteTo(KEY, Subscribe(KEY, b"me", 1.0, 1), intercept=True)]
    assert not group.root and group.joining


def test_leaving_prunes_and_the_state_is_bounded() -> None:
    node = core(max_groups=2)
    with_parent(node, 0x2000)
    assert node.leave(KEY, 1.0) == [Send(0x2000, b"p", Unsubscribe(KEY))]
    node.join(1, 1.0)
    node.join(2, 1.0)
    assert node.join(3, 1.0) == []
    assert node.stats["groups_refused"] == 1
    assert node.state_sizes()["groups"] == 2


def test_config_mistakes_fail_loudly() -> None:
    with pytest.raises(ValueError):
        ScribeConfig(beat_interval=2.0, parent_timeout=1.0)
    with pytest.raises(ValueError):
        ScribeConfig(max_children=1)


# --------------------------------------------------------------------------------
# On the wire


def registry() -> MessageRegistry:
    registry = MessageRegistry()
    for family in (pastry, lookup, scribe):
        family.register(registry)
    return registry


keys = st.integers(0, ID_SPACE - 1)
capacities = st.floats(min_value=0.0, max_value=1e9)
scribe_messages = st.one_of(
    st.builds(Subscribe, keys, st.binary(max_size=50), capacities, st.integers(0, 2**32 - 1)),
    st.builds(SubscribeAck, keys, st.binary(max_size=50), st.integers(0, 255)),
    st.builds(Redirect, keys, keys, st.binary(max_size=50)),
    st.builds(Unsubscribe, keys),
    st.builds(
        ParentBeat,
        st.binary(max_size=50),
        st.lists(
            st.tuples(keys, st.integers(0, 255), capacities, st.integers(0, 2**32 - 1)),
            max_size=20,
        ).map(tuple),
    ),
    st.builds(
        ChildBeat,
        st.binary(max_size=50),
        st.lists(st.tuples(keys, capacities, st.integers(0, 2**32 - 1)), max_size=20).map(tuple),
    ),
    st.builds(
        Multicast,
        keys,
        keys,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**64 - 1),
        st.builds(lookup.Lookup, st.integers(0, 2**64 - 1)),
    ),
    st.builds(
        Anycast,
        keys,
        keys,
        st.binary(max_size=50),
        st.integers(0, 2**64 - 1),
        st.booleans(),
        st.builds(lookup.Lookup, st.integers(0, 2**64 - 1)),
    ),
    st.builds(AnycastFailure, keys, st.integers(0, 2**64 - 1)),
)


@given(scribe_messages)
def test_every_scribe_message_round_trips(message: object) -> None:
    codec = registry()
    assert codec.decode(codec.encode(message)) == message
    routed = Route(1, 2, b"a", 0, True, message)
    assert codec.decode(codec.encode(routed)) == routed


def test_only_data_is_bulk() -> None:
    assert pastry.is_bulk(Multicast(KEY, 1, 1, 1, b"x"))
    assert pastry.is_bulk(Route(KEY, 1, b"a", 0, False, Anycast(KEY, 1, b"a", 1, False, b"x")))
    assert not pastry.is_bulk(Subscribe(KEY, b"a", 1.0, 1))
    assert not pastry.is_bulk(ParentBeat(b"a", ()))
