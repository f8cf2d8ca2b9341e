"""The simulation harness itself: the heap clock and the in-memory network."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from overlay.pastry import Heartbeat, NodeRef, Send
from overlay.simclock import HeapClock
from overlay.simulation import SimCore, SimNetwork, SimulationError

# --------------------------------------------------------------------------------
# HeapClock


def test_calls_run_in_time_order_and_ties_in_scheduling_order() -> None:
    clock = HeapClock()
    ran: list[str] = []
    clock.call_later(2.0, ran.append, "c")
    clock.call_later(1.0, ran.append, "a")
    clock.call_later(1.0, ran.append, "b")
    clock.call_at(-5.0, ran.append, "now")  # the past means now
    assert clock.run_until(1.5) == 3
    assert ran == ["now", "a", "b"] and clock.now == 1.5
    clock.advance(1.0)
    assert ran == ["now", "a", "b", "c"] and clock.seconds() == 2.5


def test_posted_calls_interleave_with_cancellable_ones() -> None:
    clock = HeapClock()
    ran: list[str] = []
    clock.post_at(2.0, ran.append, "posted late")
    timer = clock.call_at(1.0, ran.append, "cancelled")
    clock.post_at(1.0, ran.append, "posted")
    clock.call_at(1.5, ran.append, "timer")
    clock.cancel(timer)
    assert len(clock) == 3
    clock.run_until(5.0)
    assert ran == ["posted", "timer", "posted late"]


def test_cancelled_calls_do_not_run() -> None:
    clock = HeapClock()
    ran: list[int] = []
    keep = clock.call_later(1.0, ran.append, 1)
    drop = clock.call_later(0.5, ran.append, 2)
    clock.cancel(drop)
    clock.cancel(drop)
    assert len(clock) == 1 and clock.next_time() == 1.0
    assert clock.step() and not clock.step()
    clock.cancel(keep)  # already ran: harmless
    assert ran == [1] and len(clock) == 0


def test_mass_cancellation_is_swept_and_order_survives() -> None:
    clock = HeapClock()
    ran: list[int] = []
    timers = [clock.call_at(float(i), ran.append, i) for i in range(5000)]
    for timer in timers[:4000]:
        clock.cancel(timer)
    assert len(clock) == 1000
    clock.run_until(10_000.0)
    assert ran == list(range(4000, 5000))


def test_a_call_may_schedule_more_calls_within_the_same_run() -> None:
    clock = HeapClock()
    ran: list[float] = []

    def tick() -> None:
        ran.append(clock.now)
        if len(ran) < 5:
            clock.call_later(0.25, tick)

    clock.call_later(0.0, tick)
    clock.run_until(10.0)
    assert ran == [0.0, 0.25, 0.5, 0.75, 1.0]


# --------------------------------------------------------------------------------
# SimNetwork with a minimal core: the harness is not tied to Pastry


class Chatter:
    """Sends one heartbeat to each peer it starts with, and records what arrives."""

    def __init__(self, node_id: int, address: bytes, rng: random.Random) -> None:
        self.node_id = node_id
        self.address = address
        self.received: list[tuple[float, int, object]] = []
        self.deadline: float | None = None
        self.stuck = False
        self.fired = 0

    def start(self, now: float, bootstrap: Sequence[NodeRef]) -> Sequence[object]:
        return [
            Send(r.node_id, r.address, Heartbeat(self.address, 0, True, False)) for r in bootstrap
        ]

    def handle(self, src_id: int, message: object, now: float) -> Sequence[object]:
        self.received.append((now, src_id, message))
        return ["noted"]

    def on_timer(self, now: float) -> Sequence[object]:
        self.fired += 1
        if not self.stuck:
            self.deadline = None
        return []

    def next_deadline(self) -> float | None:
        return self.deadline


def chatter(net: SimNetwork, node_id: int) -> Chatter:
    core = net.core(node_id)
    assert isinstance(core, Chatter)
    return core


def make_chatter(node_id: int, address: bytes, rng: random.Random) -> SimCore:
    return Chatter(node_id, address, rng)


def test_messages_arrive_after_a_latency_within_bounds() -> None:
    net = SimNetwork(1, latency=(0.2, 0.3), factory=make_chatter)
    a, b = net.add_nodes(2)
    net.start(b)
    net.start(a, [b] * 200)
    net.run_for(1.0)
    times = [t for t, _, _ in chatter(net, b).received]
    assert len(times) == 200 and all(0.2 <= t <= 0.3 for t in times)
    assert [(n, e) for _, n, e in net.events] == [(b, "noted")] * 200


def test_loss_kill_and_partition_drop_messages() -> None:
    net = SimNetwork(2, loss=0.25, factory=make_chatter)
    a, b, c = net.add_nodes(3)
    net.start(b)
    net.start(c)
    net.start(a, [b] * 2000)
    net.run_for(1.0)
    assert 1300 < len(chatter(net, b).received) < 1700

    net.loss = 0.0
    before = len(chatter(net, b).received)
    net.partition([a, c], [b])
    net.inject(a, lambda core, now: core.start(now, [net.ref(b), net.ref(c)]))
    net.run_for(1.0)
    assert [src for _, src, _ in chatter(net, c).received] == [a]
    assert len(chatter(net, b).received) == before
    net.heal()
    net.kill(c)
    net.inject(a, lambda core, now: core.start(now, [net.ref(b), net.ref(c)]))
    net.run_for(1.0)
    assert len(chatter(net, c).received) == 1
    assert net.messages_lost > 0 and c not in net.live_ids()


@pytest.mark.parametrize("fifo", [True, False])
def test_links_keep_order_unless_told_not_to(fifo: bool) -> None:
    net = SimNetwork(8, latency=(0.0, 1.0), fifo=fifo, factory=make_chatter)
    a, b = net.add_nodes(2)
    net.start(b)
    for seq in range(50):
        beat = Send(b, net.ref(b).address, Heartbeat(b"", seq, True, False))

        def send(core: SimCore, now: float, effect: Send = beat) -> list[Send]:
            return [effect]

        net.inject(a, send)
        net.run_for(0.01)
    net.run_for(2.0)
    received = [m.leaf_version for _, _, m in chatter(net, b).received if isinstance(m, Heartbeat)]
    assert sorted(received) == list(range(50))
    assert (received == list(range(50))) == fifo


def test_slow_nodes_get_extra_latency() -> None:
    net = SimNetwork(3, latency=(0.0, 0.0), factory=make_chatter)
    a, b = net.add_nodes(2)
    net.set_delay(b, (1.0, 1.0))
    net.start(b)
    net.start(a, [b])
    net.run_for(2.0)
    assert [t for t, _, _ in chatter(net, b).received] == [1.0]


def test_timers_follow_next_deadline() -> None:
    net = SimNetwork(4, factory=make_chatter)
    (a,) = net.add_nodes(1)
    core = chatter(net, a)
    core.deadline = 5.0
    net.start(a)
    net.run_for(4.9)
    assert core.fired == 0
    net.run_for(0.2)
    assert core.fired == 1


def test_a_core_stuck_in_the_past_is_reported() -> None:
    net = SimNetwork(5, factory=make_chatter)
    (a,) = net.add_nodes(1)
    core = chatter(net, a)
    core.deadline = 0.5
    core.stuck = True  # the deadline never moves, however often on_timer runs
    net.start(a)
    with pytest.raises(SimulationError):
        net.run_for(1.0)


def test_sending_to_a_wrong_address_is_a_bug() -> None:
    net = SimNetwork(6, factory=make_chatter)
    a, b = net.add_nodes(2)
    with pytest.raises(SimulationError):
        net.inject(a, lambda core, now: [Send(b, b"elsewhere", Heartbeat(b"", 0, True, False))])


def test_the_pastry_helpers_refuse_other_cores() -> None:
    net = SimNetwork(7, factory=make_chatter)
    (a,) = net.add_nodes(1)
    with pytest.raises(TypeError):
        net.pastry(a)
