"""The Pastry core on its own: messages and ``now`` in, effects out (no network, no clock)."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.ids import ID_SPACE, closest, shared_prefix_digits
from overlay.pastry import (
    Deliver,
    Dropped,
    Effect,
    Heartbeat,
    Intercept,
    Join,
    JoinReply,
    LeafSetChanged,
    LeafSetReply,
    LeafSetRequest,
    Leave,
    NodeRef,
    PastryConfig,
    PastryCore,
    PeerDead,
    Ready,
    Route,
    RowReply,
    RowRequest,
    Send,
)
from overlay.pastry.leafset import LeafSet
from overlay.pastry.table import RoutingTable


def node(node_id: int, seed: int = 0, config: PastryConfig | None = None) -> PastryCore:
    return PastryCore(node_id, b"n%d" % node_id, random.Random(seed), config)


def ref(n: PastryCore) -> NodeRef:
    return NodeRef(n.node_id, n.address)


class Wires:
    """Carries Send effects between a few cores instantly, in order; keeps the rest."""

    def __init__(self, *nodes: PastryCore) -> None:
        self.nodes = {n.node_id: n for n in nodes}
        self.events: list[tuple[int, Effect]] = []
        self.sent: list[tuple[int, Send]] = []
        self.now = 0.0
        self.cut: set[int] = set()

    def feed(self, src: int, effects: list[Effect]) -> None:
        queue = deque((src, e) for e in effects)
        while queue:
            origin, effect = queue.popleft()
            if not isinstance(effect, Send):
                self.events.append((origin, effect))
                continue
            self.sent.append((origin, effect))
            dst = self.nodes.get(effect.dst_id)
            if dst is None or effect.dst_id in self.cut or origin in self.cut:
                continue
            assert effect.dst_address == dst.address
            queue.extend((dst.node_id, e) for e in dst.handle(origin, effect.message, self.now))

    def run_until(self, until: float) -> None:
        """Fire every core's timer in time order up to ``until``."""
        while True:
            due = [
                (deadline, n.node_id)
                for n in self.nodes.values()
                if n.node_id not in self.cut and (deadline := n.next_deadline()) is not None
            ]
            if not due or min(due)[0] > until:
                self.now = until
                return
            deadline, node_id = min(due)
            self.now = deadline
            self.feed(node_id, self.nodes[node_id].on_timer(deadline))

    def of(self, kind: type) -> list[tuple[int, Effect]]:
        return [(n, e) for n, e in self.events if isinstance(e, kind)]


def joined(*ids: int) -> Wires:
    """Nodes joined one by one through the first, with state exchange finished."""
    first, *rest = [node(i, seed=i) for i in ids]
    wires = Wires(first)
    wires.feed(first.node_id, first.start(0.0))
    for n in rest:
        wires.nodes[n.node_id] = n
        wires.feed(n.node_id, n.start(wires.now, [ref(first)]))
        wires.run_until(wires.now + 0.1)
    wires.run_until(wires.now + 3.0)
    return wires


# --------------------------------------------------------------------------------
# Alone, and joining


def test_a_node_alone_is_ready_at_once_and_owns_every_key() -> None:
    a = node(100)
    assert a.start(0.0) == [Ready()]
    assert a.is_ready
    assert a.route(5, b"hi", 0.0) == [Deliver(Route(5, 100, a.address, 0, False, b"hi"))]


def test_joining_sends_join_to_the_bootstrap_and_retries_the_next() -> None:
    a = node(1)
    boot = [NodeRef(2, b"b2"), NodeRef(3, b"b3")]
    assert a.start(0.0, boot) == [Send(2, b"b2", Join(1, a.address, 0))]
    assert not a.is_ready
    late = a.config.join_timeout + a.config.heartbeat_interval
    effects = a.on_timer(late)
    assert Send(3, b"b3", Join(1, a.address, 0)) in effects


def test_two_one_node_overlays_merge_through_join_via() -> None:
    a, b = node(1000), node(2000)
    wires = Wires(a, b)
    wires.feed(1000, a.start(0.0))
    wires.feed(2000, b.start(0.0))
    assert a.is_ready and b.is_ready and a.peers() == {} == b.peers()
    wires.feed(2000, b.join_via(ref(a), 0.0))
    assert b.leaf_set() == ([1000], [1000])  # a answered the join
    wires.run_until(1.0)  # b's first heartbeat introduces it to a
    assert a.leaf_set() == ([2000], [2000])
    assert b.join_via(ref(b), 0.0) == []


def test_hints_from_outside_are_probed_only_when_useful() -> None:
    a = node(5, config=PastryConfig(leaf_half=1))
    a.start(0.0)
    assert a.hint([NodeRef(6, b"n6")], 0.0) == [Send(6, b"n6", Heartbeat(b"n5", 0, False, True))]
    a.handle(6, Heartbeat(b"n6", 0, True, False), 0.0)
    a.handle(4, Heartbeat(b"n4", 0, True, False), 0.0)
    a.handle((2 << 100) | 5, Heartbeat(b"x", 0, True, False), 0.0)
    # Fits neither side of the (full) leaf set, and its table slot is taken by a better node.
    assert a.hint([NodeRef((2 << 100) | 3, b"y")], 0.0) == []


def test_start_twice_is_a_bug() -> None:
    a = node(1)
    a.start(0.0)
    with pytest.raises(RuntimeError):
        a.start(1.0)


def test_the_bootstrap_answers_with_its_state_and_the_joiner_becomes_ready() -> None:
    a, b = node(1000), node(2000)
    wires = Wires(a, b)
    wires.feed(1000, a.start(0.0))
    wires.feed(2000, b.start(0.0, [ref(a)]))
    replies = [e.message for _, e in wires.sent if isinstance(e.message, JoinReply)]
    assert replies == [JoinReply(a.address, (), True)]
    assert b.is_ready and (2000, Ready()) in wires.events
    assert b.leaf_set() == ([1000], [1000])
    wires.run_until(1.0)
    assert a.leaf_set() == ([2000], [2000])


def test_join_is_routed_towards_the_joiners_id_and_each_hop_answers() -> None:
    wires = joined(10, 1 << 127, (1 << 127) + (1 << 126))
    newcomer = node((1 << 127) + 5)
    wires.nodes[newcomer.node_id] = newcomer
    wires.sent.clear()
    wires.feed(newcomer.node_id, newcomer.start(wires.now, [NodeRef(10, b"n10")]))
    joins = [(src, e.dst_id) for src, e in wires.sent if isinstance(e.message, Join)]
    assert joins == [(newcomer.node_id, 10), (10, 1 << 127)]
    finals = [
        (src, e.message.final)
        for src, e in wires.sent
        if isinstance(e.message, JoinReply) and e.dst_id == newcomer.node_id
    ]
    assert finals == [(10, False), (1 << 127, True)]
    assert newcomer.is_ready


# --------------------------------------------------------------------------------
# Routing


def test_messages_are_delivered_at_the_numerically_closest_node() -> None:
    wires = joined(10, 20, 30)
    start = wires.nodes[10]
    for key, owner in [(24, 20), (26, 30), (25, 20), (ID_SPACE - 1, 10), (15, 10)]:
        wires.events.clear()
        wires.feed(10, start.route(key, b"p", wires.now))
        delivered = wires.of(Deliver)
        assert [n for n, _ in delivered] == [owner], key


def test_a_message_gives_up_at_the_hop_limit() -> None:
    message = Route(20, 10, b"n10", 2, False, b"p")
    limited = node(30, config=PastryConfig(max_hops=2))
    limited.start(0.0)
    limited.handle(20, Heartbeat(b"n20", 0, True, False), 0.0)
    assert limited.handle(99, message, 0.0) == [Dropped(message, "hop limit")]


def test_intercepted_routes_stop_at_each_hop_until_forwarded() -> None:
    wires = joined(10, 1 << 127, 20)
    origin = wires.nodes[10]
    key = (1 << 127) + 1
    effects = origin.route(key, b"join-tree", wires.now, intercept=True)
    # The origin does not intercept its own message; it forwards it.
    (send,) = [e for e in effects if isinstance(e, Send)]
    hop = wires.nodes[send.dst_id]
    assert isinstance(send.message, Route)
    upcalls = hop.handle(10, send.message, wires.now)
    if hop.node_id == 1 << 127:
        assert upcalls == [Deliver(Route(key, 10, b"n10", 1, True, b"join-tree"))]
    else:
        (upcall,) = upcalls
        assert isinstance(upcall, Intercept) and upcall.next_hop == 1 << 127
        assert upcall.src_id == 10
        onward = hop.forward(upcall.route, wires.now)
        assert [e.dst_id for e in onward if isinstance(e, Send)] == [1 << 127]


def test_unknown_messages_are_a_caller_bug() -> None:
    a = node(1)
    a.start(0.0)
    with pytest.raises(TypeError):
        a.handle(2, object(), 0.0)


# --------------------------------------------------------------------------------
# Knowledge: only first-hand contact enters the state


def test_second_hand_refs_are_probed_before_they_enter_the_state() -> None:
    a = node(1000)
    a.start(0.0)
    a.handle(2000, Heartbeat(b"n2000", 0, True, False), 0.0)
    effects = a.handle(2000, LeafSetReply(b"n2000", 1, (NodeRef(3000, b"n3000"),)), 0.0)
    assert Send(3000, b"n3000", Heartbeat(a.address, 1, False, True)) in effects
    assert 3000 not in a.peers()
    a.handle(3000, Heartbeat(b"n3000", 0, False, False), 0.1)
    assert 3000 in a.peers()


def test_a_dead_node_gossiped_by_others_is_not_readmitted() -> None:
    a = node(1000, config=PastryConfig(suspect_after=1.0, dead_after=2.0))
    a.start(0.0)
    a.handle(2000, Heartbeat(b"n2000", 0, True, False), 0.0)
    a.handle(3000, Heartbeat(b"n3000", 0, True, False), 0.0)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5):
        a.handle(3000, Heartbeat(b"n3000", 0, True, False), t)
        a.on_timer(t)
    assert 2000 not in a.peers()
    gossip = a.handle(3000, LeafSetReply(b"n3000", 5, (NodeRef(2000, b"n2000"),)), 2.6)
    assert not [e for e in gossip if isinstance(e, Send) and e.dst_id == 2000]
    # First-hand contact proves it alive again.
    a.handle(2000, Heartbeat(b"n2000", 0, True, False), 2.7)
    assert 2000 in a.peers()


def test_the_routing_table_prefers_the_node_nearest_each_slots_target() -> None:
    own = 0x1000 << 112
    table = RoutingTable(own)
    first = 0x5800 << 112  # row 0, digit 5: the slot's target is 0x5000...
    better = 0x5001 << 112
    worse = 0x5FFF << 112
    assert table.add(first) is None
    assert table.accepts(better) and not table.accepts(worse)
    assert table.add(better) == first
    assert table.row(0) == [better] and len(table) == 1
    assert not table.accepts(own)


@given(st.integers(0, ID_SPACE - 1), st.lists(st.integers(0, ID_SPACE - 1), max_size=300))
def test_routing_table_slots_hold_matching_prefixes_within_bounds(own: int, ids: list[int]) -> None:
    table = RoutingTable(own)
    for n in ids:
        if table.accepts(n):
            table.add(n)
    entries = list(table)
    assert len(entries) == len(table) == len(set(entries))
    for row, members in table.rows().items():
        assert 0 < len(members) <= 15
        for n in members:
            assert shared_prefix_digits(own, n) == row


@given(
    st.integers(0, ID_SPACE - 1),
    st.lists(st.integers(0, ID_SPACE - 1), max_size=60, unique=True),
    st.integers(1, 8),
)
def test_the_leaf_set_keeps_the_nearest_on_each_side(own: int, ids: list[int], half: int) -> None:
    others = [n for n in ids if n != own]
    leaf = LeafSet(own, half)
    for n in others:
        leaf.add(n)
    removed = set(others[::3])
    for n in removed:
        leaf.remove(n)
    rest = [n for n in others if n not in removed]
    expected_right = sorted(rest, key=lambda n: (n - own) % ID_SPACE)[:half]
    expected_left = sorted(rest, key=lambda n: (own - n) % ID_SPACE)[:half]
    # Removal leaves a gap (the core refills it from peers it knows): what is
    # left is a subset of the survivors, still in order and within bounds.
    assert set(leaf) <= set(rest)
    assert leaf.right() == sorted(leaf.right(), key=lambda n: (n - own) % ID_SPACE)
    assert len(leaf.right()) <= half and len(leaf.left()) <= half
    fresh = LeafSet(own, half)
    for n in rest:
        fresh.add(n)
    assert fresh.right() == expected_right and fresh.left() == expected_left
    assert set(fresh) == set(expected_left) | set(expected_right)
    assert len(fresh) <= 2 * half


@given(
    st.lists(st.integers(0, ID_SPACE - 1), min_size=1, max_size=16, unique=True),
    st.integers(0, ID_SPACE - 1),
)
def test_a_small_rings_leaf_set_covers_every_key(ids: list[int], key: int) -> None:
    """With at most 2*half nodes the sides overlap and the leaf set knows it has everyone.

    (With one more it cannot know there is nobody beyond its outermost members, and
    routing relies on the next hop's leaf set instead.)
    """
    own, *others = ids
    leaf = LeafSet(own, 8)
    for n in others:
        leaf.add(n)
    assert leaf.covers(key)
    assert leaf.closest(key) == closest(key, ids)


# --------------------------------------------------------------------------------
# Failure detection


def _pair() -> tuple[PastryCore, int]:
    a = node(1000)
    a.start(0.0)
    a.handle(2000, Heartbeat(b"n2000", 0, True, False), 0.0)
    assert a.leaf_set() == ([2000], [2000])
    return a, 2000


def test_a_silent_peer_is_suspected_pinged_then_declared_dead_on_time() -> None:
    a, b = _pair()
    effects: list[Effect] = []
    t = 0.0
    while not any(isinstance(e, PeerDead) for e in effects):
        deadline = a.next_deadline()
        assert deadline is not None
        t = deadline
        effects += a.on_timer(t)
    # Silent since it was admitted at 0.0, which earns one heartbeat interval of grace.
    assert t == pytest.approx(a.config.heartbeat_interval + a.config.dead_after)
    assert PeerDead(b, "silent") in effects
    pings = [e for e in effects if isinstance(e, Send) and isinstance(e.message, Heartbeat)]
    assert any(p.message.want_reply for p in pings if isinstance(p.message, Heartbeat))
    assert a.leaf_set() == ([], [])


def test_a_peer_that_keeps_talking_is_never_declared_dead() -> None:
    a, b = _pair()
    for step in range(1, 41):
        t = step * 0.5
        a.handle(b, Heartbeat(b"n2000", 0, True, False), t - 0.01)
        assert not [e for e in a.on_timer(t) if isinstance(e, PeerDead)]
    assert b in a.peers()


def test_a_dropped_link_shortens_the_grace_unless_the_peer_answers() -> None:
    a, b = _pair()
    effects = a.link_down(b, 1.0)
    assert effects == [Send(b, b"n2000", Heartbeat(a.address, a._leaf_version, True, True))]
    a.handle(b, Heartbeat(b"n2000", 0, True, False), 1.5)
    assert not [e for e in a.on_timer(2.0) if isinstance(e, PeerDead)]

    c, d = _pair()
    c.link_down(d, 1.0)
    grace = c.config.link_down_grace
    assert not [e for e in c.on_timer(1.0 + grace - 0.01) if isinstance(e, PeerDead)]
    assert c.next_deadline() == pytest.approx(1.0 + grace)
    assert PeerDead(d, "silent") in c.on_timer(1.0 + grace)


def test_a_ping_is_answered_and_a_stranger_is_told_we_do_not_watch_it() -> None:
    a, b = _pair()
    (answer,) = a.handle(b, Heartbeat(b"n2000", 0, True, True), 0.1)
    assert isinstance(answer, Send) and answer.message == Heartbeat(a.address, 1, True, False)

    full = node(5, config=PastryConfig(leaf_half=1))
    full.start(0.0)
    for n in (4, 6, (2 << 100) | 5):  # two leaves, and the best node for one table slot
        full.handle(n, Heartbeat(b"n%d" % n, 0, True, False), 0.0)
    stranger = (2 << 100) | 3  # same slot, farther from its target: fits nowhere
    reply = full.handle(stranger, Heartbeat(b"s", 0, False, True), 0.0)
    assert reply == [Send(stranger, b"s", Heartbeat(b"n5", full._leaf_version, False, False))]
    assert stranger not in full.peers()


def test_an_evicted_peer_is_told_and_pings_back_at_once() -> None:
    a = node(5, config=PastryConfig(leaf_half=1))
    a.start(0.0)
    far, near = (2 << 100) | 9, (2 << 100) | 7  # same table slot; near is better everywhere
    a.handle(4, Heartbeat(b"n4", 0, True, False), 0.0)
    a.handle(far, Heartbeat(b"far", 0, True, False), 0.0)
    assert far in a.peers()
    effects = a.handle(near, Heartbeat(b"near", 0, True, False), 0.1)
    unwatch = [e for e in effects if isinstance(e, Send) and e.dst_id == far]
    assert [e.message for e in unwatch] == [Heartbeat(b"n5", a._leaf_version, False, False)]
    assert far not in a.peers()

    b, peer = _pair()  # b watches peer, and peer said it watches b
    (ping,) = b.handle(peer, Heartbeat(b"n2000", 0, False, False), 0.2)
    assert isinstance(ping, Send) and isinstance(ping.message, Heartbeat)
    assert ping.message.want_reply  # its heartbeats stop: ask now, not next round


# --------------------------------------------------------------------------------
# Leaving


def test_leave_says_goodbye_to_every_peer_and_stops() -> None:
    wires = joined(10, 20, 30)
    leaver = wires.nodes[20]
    effects = leaver.leave(wires.now)
    goodbyes = sorted(
        e.dst_id for e in effects if isinstance(e, Send) and isinstance(e.message, Leave)
    )
    assert goodbyes == [10, 30]
    assert leaver.next_deadline() is None and leaver.has_left
    assert leaver.handle(10, Heartbeat(b"n10", 0, True, True), wires.now) == []
    assert leaver.route(5, b"", wires.now) == []


def test_a_goodbye_repairs_the_leaf_set_without_waiting() -> None:
    wires = joined(10, 20, 30)
    wires.feed(20, wires.nodes[20].leave(wires.now))
    del wires.nodes[20]
    assert (10, PeerDead(20, "left")) in wires.events and (30, PeerDead(20, "left")) in wires.events
    assert wires.nodes[10].leaf_set() == ([30], [30])
    assert wires.nodes[30].leaf_set() == ([10], [10])


# --------------------------------------------------------------------------------
# State exchange and repair requests


def test_state_requests_are_answered_with_refs() -> None:
    wires = joined(10, 20, 1 << 127)
    a = wires.nodes[10]
    (leaf_reply,) = [
        e for e in a.handle(20, LeafSetRequest(b"n20"), wires.now) if isinstance(e, Send)
    ]
    assert isinstance(leaf_reply.message, LeafSetReply)
    assert {r.node_id for r in leaf_reply.message.refs} == {20, 1 << 127}
    (row_reply,) = [
        e for e in a.handle(20, RowRequest(b"n20", 0), wires.now) if isinstance(e, Send)
    ]
    assert row_reply.message == RowReply(a.address, 0, (NodeRef(1 << 127, b"n%d" % (1 << 127)),))


def test_the_same_seed_gives_the_same_effects() -> None:
    def run() -> list[tuple[int, Effect]]:
        wires = joined(10, 20, 30, 1 << 100, 1 << 127)
        wires.run_until(wires.now + 20.0)
        return [(n, e) for n, e in wires.sent]

    assert run() == run()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        PastryConfig(suspect_after=3.0, dead_after=2.0)
    with pytest.raises(ValueError):
        PastryConfig(leaf_half=0)
    with pytest.raises(ValueError):
        PastryConfig(probe_interval=5.0)


def test_leaf_set_changes_are_reported_once_per_input() -> None:
    a = node(100)
    a.start(0.0)
    joined_effects = a.handle(200, Heartbeat(b"n200", 0, True, False), 0.1)
    assert joined_effects.count(LeafSetChanged()) == 1
    assert LeafSetChanged() not in a.handle(200, Heartbeat(b"n200", 0, True, False), 0.2)
    a.handle(300, Heartbeat(b"n300", 0, True, False), 0.2)
    # Both go silent: one timer input loses two members, one report.
    lost = a.on_timer(10.0)
    assert lost.count(LeafSetChanged()) == 1
    assert {e.peer_id for e in lost if isinstance(e, PeerDead)} == {200, 300}
