"""The overlay stack: Pastry's upcalls reach the right layer, layers' effects reach Pastry."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import pytest

from overlay.ids import key_for
from overlay.lookup import Lookup, LookupAnswered, LookupCore
from overlay.pastry import (
    Deliver,
    Heartbeat,
    Intercept,
    LeafSetChanged,
    PastryCore,
    PeerDead,
    Route,
    Send,
)
from overlay.simulation import SimNetwork
from overlay.stack import Forward, OverlayStack, Received, RouteTo, Upcall


@dataclass(frozen=True, slots=True)
class Ping:
    n: int


@dataclass(frozen=True, slots=True)
class Pong:
    n: int


@dataclass(frozen=True, slots=True)
class Note:
    """An effect one layer makes and another consumes."""

    text: str


@dataclass
class Recorder:
    """A layer that records its upcalls and answers with whatever it is told to."""

    messages: tuple[type, ...] = (Ping,)
    consumes: tuple[type, ...] = ()
    answer: list[object] = field(default_factory=list)
    seen: list[object] = field(default_factory=list)
    deadline: float | None = None

    def upcall(self, event: Upcall, now: float) -> Sequence[object]:
        self.seen.append(event)
        return list(self.answer)

    def consume(self, effect: object, now: float) -> Sequence[object]:
        self.seen.append(effect)
        return [Pong(len(self.seen))]

    def on_timer(self, now: float) -> Sequence[object]:
        self.deadline = None
        return [Note(f"timer at {now}")]

    def next_deadline(self) -> float | None:
        return self.deadline


def alone(*layers: Recorder) -> OverlayStack:
    stack = OverlayStack(PastryCore(100, b"n100", random.Random(0)), layers)
    stack.start(0.0)
    return stack


def test_direct_messages_go_to_the_layer_that_owns_their_type() -> None:
    layer = Recorder(answer=[Note("got it")])
    stack = alone(layer)
    assert stack.handle(7, Ping(1), 0.0) == [Note("got it")]
    assert layer.seen == [Received(7, Ping(1))]
    # Pastry's own messages never reach a layer (only what they change does).
    stack.handle(7, Heartbeat(b"n7", 0, True, False), 0.0)
    assert layer.seen == [Received(7, Ping(1)), LeafSetChanged()]


def test_a_route_from_a_layer_is_carried_out_and_delivered_to_the_owner_of_its_message() -> None:
    layer = Recorder()
    stack = alone(layer)
    assert stack.run([RouteTo(5, Ping(2))], 0.0) == []
    assert layer.seen == [Deliver(Route(5, 100, b"n100", 0, False, Ping(2)))]


def test_intercepts_go_to_the_owner_and_unowned_ones_pass_on() -> None:
    layer = Recorder()
    stack = alone(layer)
    stack.handle(200, Heartbeat(b"n200", 0, True, False), 0.0)  # a second node to route through
    layer.seen.clear()
    owned = Route(201, 300, b"n300", 1, True, Ping(3))
    assert stack.handle(300, owned, 0.0) == []
    assert layer.seen == [Intercept(owned, 300, 200)]
    unowned = Route(201, 300, b"n300", 1, True, Pong(3))
    (send,) = stack.handle(300, unowned, 0.0)
    assert isinstance(send, Send) and send.dst_id == 200
    assert send.message == Route(201, 300, b"n300", 2, True, Pong(3))


def test_forward_continues_an_intercepted_route() -> None:
    stack = alone(Recorder())
    stack.handle(200, Heartbeat(b"n200", 0, True, False), 0.0)
    route = Route(201, 300, b"n300", 1, True, Ping(4))
    (send,) = stack.run([Forward(route)], 0.0)
    assert isinstance(send, Send) and send.dst_id == 200


def test_peer_deaths_and_leaf_changes_reach_every_layer_and_the_owner() -> None:
    first, second = Recorder(), Recorder(messages=(Pong,))
    stack = alone(first, second)
    effects = stack.handle(200, Heartbeat(b"n200", 0, True, False), 0.0)
    assert LeafSetChanged() in effects
    assert first.seen == second.seen == [LeafSetChanged()]
    dead = stack.on_timer(10.0)
    assert PeerDead(200, "silent") in dead
    assert PeerDead(200, "silent") in first.seen and PeerDead(200, "silent") in second.seen


def test_effects_come_out_in_the_order_they_were_made() -> None:
    consumer = Recorder(messages=(), consumes=(Note,))
    stack = alone(consumer)
    out = stack.run([Pong(0), Note("a"), RouteTo(5, Lookup(1)), Pong(9)], 0.0)
    # Note is consumed (answered with a Pong); the unowned delivery comes out in place.
    assert out == [Pong(0), Pong(1), Deliver(Route(5, 100, b"n100", 0, False, Lookup(1))), Pong(9)]


def test_two_layers_cannot_own_one_message_type() -> None:
    with pytest.raises(ValueError, match="Ping"):
        OverlayStack(PastryCore(1, b"n1", random.Random(0)), (Recorder(), Recorder()))


def test_one_deadline_for_the_whole_stack_and_only_due_layers_fire() -> None:
    early, late = Recorder(deadline=0.2), Recorder(messages=(Pong,), deadline=50.0)
    stack = alone(early, late)
    assert stack.next_deadline() is not None
    assert stack.next_deadline() <= 0.2  # type: ignore[operator]
    out = stack.on_timer(0.2)
    assert Note("timer at 0.2") in out and late.deadline == 50.0


def test_a_lookup_alone_is_answered_here() -> None:
    lookups = LookupCore(100)
    stack = OverlayStack(PastryCore(100, b"n100", random.Random(0)), (lookups,))
    stack.start(0.0)
    nonce, effects = lookups.lookup(key_for("cluster", "x"))
    assert stack.run(effects, 0.0) == [LookupAnswered(nonce, 100)]


def run_on(stack: OverlayStack, effects: list[object], core: object, now: float) -> list[object]:
    return stack.run(effects, now)


def test_lookups_in_a_network_end_at_the_key_owner_and_come_back() -> None:
    def factory(node_id: int, address: bytes, rng: random.Random) -> OverlayStack:
        pastry = PastryCore(node_id, address, rng)
        return OverlayStack(pastry, (LookupCore(node_id),))

    net = SimNetwork(3, factory=factory)
    net.add_nodes(40)
    net.join_all(one_by_one=False, interval=0.02)
    assert net.run_until_converged(10.0) is not None
    rng = random.Random(5)
    asked: dict[tuple[int, int], int] = {}
    for _ in range(50):
        origin = rng.choice(net.live_ids())
        key = rng.getrandbits(128)
        stack = net.core(origin)
        assert isinstance(stack, OverlayStack)
        nonce, effects = stack.layer(LookupCore).lookup(key)
        asked[(origin, nonce)] = key
        net.inject(origin, partial(run_on, stack, effects))
    net.run_for(1.0)
    answers = {
        (node, e.nonce): e.owner for _, node, e in net.events if isinstance(e, LookupAnswered)
    }
    assert answers == {ask: net.true_owner(key) for ask, key in asked.items()}
