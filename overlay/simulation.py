"""Many nodes in one process: a seeded in-memory network on a heap-ordered clock.

:class:`SimNetwork` hosts pure cores (by default :class:`overlay.pastry.PastryCore`; an
:class:`overlay.stack.OverlayStack` runs the same way)
and does for them what the links and the reactor do in production: it carries
out their :class:`~overlay.pastry.Send` effects after a random latency (or loses
them), drives each core's single timer from ``next_deadline``/``on_timer``, and
records every other effect in :attr:`SimNetwork.events`. Nodes can be killed
silently (like SIGKILL), made slow, or partitioned.

Everything random comes from the seed, so a run is reproducible event for event.
Messages from one node to another arrive in the order they were sent, as on the
TCP links they model (each still draws its own latency, but never overtakes the
previous one); ``fifo=False`` lets them overtake. Given a ``codec`` (a
:class:`~overlay.wire.MessageRegistry`), every message is encoded and decoded on
its way, as on a real link.

Any core with the same effect style runs here: it needs ``start``, ``handle``,
``on_timer`` and ``next_deadline`` (:class:`SimCore`). The Pastry helpers
(:meth:`~SimNetwork.converged`, :meth:`~SimNetwork.trace_route`, ...) reach the
Pastry core of a composite through its ``pastry`` attribute (or ``pastry_of``).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from overlay.ids import BASE, DIGIT_BITS, ID_BITS, ID_DIGITS, closest, digit, random_id
from overlay.pastry import NodeRef, PastryConfig, PastryCore, Ready, Route, Send
from overlay.simclock import HeapClock, Timer
from overlay.wire import MessageRegistry


class SimCore(Protocol):
    """What the simulation needs from a core."""

    def start(self, now: float, bootstrap: Sequence[NodeRef]) -> Sequence[object]: ...

    def handle(self, src_id: int, message: object, now: float) -> Sequence[object]: ...

    def on_timer(self, now: float) -> Sequence[object]: ...

    def next_deadline(self) -> float | None: ...


CoreFactory = Callable[[int, bytes, random.Random], SimCore]


class SimulationError(Exception):
    """The simulated system misbehaved in a way that is a bug (not a network fault)."""


@dataclass(frozen=True, slots=True)
class RouteStats:
    keys: int
    correct: int
    lost: int
    mean_hops: float
    max_hops: int


class _SimNode:
    __slots__ = (
        "address",
        "alive",
        "core",
        "delay",
        "fired_at",
        "fires",
        "group",
        "in_flight",
        "started",
        "timer",
        "timer_at",
    )

    def __init__(self, core: SimCore, address: bytes) -> None:
        self.core = core
        self.address = address
        self.alive = True
        self.started = False
        self.timer: Timer | None = None
        self.timer_at = math.inf
        self.delay: tuple[float, float] | None = None
        self.group = 0
        self.fired_at = -1.0
        self.fires = 0
        self.in_flight: dict[int, float] = {}
        """Per destination, when the last message sent there arrives (links are FIFO)."""


def _as_pastry(core: SimCore) -> PastryCore:
    pastry = core if isinstance(core, PastryCore) else getattr(core, "pastry", None)
    if not isinstance(pastry, PastryCore):
        raise TypeError("pass pastry_of= to reach the Pastry core of this core")
    return pastry


def _link_up_all(
    pastry: PastryCore, refs: list[NodeRef], core: SimCore, now: float
) -> Sequence[object]:
    """First-hand contact with every ref, through ``core`` if it is a stack above Pastry."""
    effects: list[object] = []
    for ref in refs:
        effects += pastry.link_up(ref.node_id, ref.address, now)
    run = getattr(core, "run", None)
    return effects if run is None else run(effects, now)


_MAX_FIRES_AT_ONE_TIME = 1000
_IN_FLIGHT_SWEEP = 64


class SimNetwork:
    """A seeded network of simulated nodes (see the module docstring)."""

    def __init__(
        self,
        seed: int,
        *,
        latency: tuple[float, float] = (0.001, 0.01),
        loss: float = 0.0,
        codec: MessageRegistry | None = None,
        fifo: bool = True,
        config: PastryConfig | None = None,
        factory: CoreFactory | None = None,
        pastry_of: Callable[[SimCore], PastryCore] = _as_pastry,
        record_trace: bool = False,
    ) -> None:
        if not 0 <= latency[0] <= latency[1]:
            raise ValueError("latency must be (min, max) with 0 <= min <= max")
        self.seed = seed
        self.clock = HeapClock()
        self.latency = latency
        self.loss = loss
        self.codec = codec
        self.fifo = fifo
        self.config = config if config is not None else PastryConfig()
        self._factory: CoreFactory = factory if factory is not None else self._make_pastry
        self._pastry_of = pastry_of
        self._net_rng = random.Random(seed)
        """Latency and loss draws."""
        self._seed_rng = random.Random(seed ^ 0x5EED)
        """Ids and per-node seeds."""
        self.picker = random.Random(seed ^ 0xC0FFEE)
        """Choices made by the harness (bootstrap nodes, start points of routes)."""
        self.nodes: dict[int, _SimNode] = {}
        self._members = SortedList()
        """Started nodes that are alive and have not left: the oracle's view."""
        self._ready: list[int] = []
        self._ready_set: set[int] = set()
        self._partitioned = False
        self.events: list[tuple[float, int, object]] = []
        """Every effect other than Send: (time, node, effect)."""
        self.trace: list[tuple[float, int, int, str]] | None = [] if record_trace else None
        self.messages_sent = 0
        self.messages_lost = 0
        self.message_counts: Counter[type] = Counter()
        """Messages sent, by type (a routed message by the type it carries)."""

    # ----------------------------------------------------------------------------
    # Building the network

    def _make_pastry(self, node_id: int, address: bytes, rng: random.Random) -> SimCore:
        return PastryCore(node_id, address, rng, self.config)

    @property
    def now(self) -> float:
        return self.clock.now

    def add_node(self, node_id: int | None = None) -> int:
        """Create a node (not started); returns its id."""
        if node_id is None:
            node_id = random_id(self._seed_rng)
            while node_id in self.nodes:
                node_id = random_id(self._seed_rng)
        elif node_id in self.nodes:
            raise ValueError("duplicate node id")
        address = f"sim:{len(self.nodes)}".encode()
        rng = random.Random(self._seed_rng.getrandbits(64))
        self.nodes[node_id] = _SimNode(self._factory(node_id, address, rng), address)
        return node_id

    def add_nodes(self, count: int) -> list[int]:
        return [self.add_node() for _ in range(count)]

    def core(self, node_id: int) -> SimCore:
        return self.nodes[node_id].core

    def pastry(self, node_id: int) -> PastryCore:
        return self._pastry_of(self.nodes[node_id].core)

    def ref(self, node_id: int) -> NodeRef:
        return NodeRef(node_id, self.nodes[node_id].address)

    def live_ids(self) -> list[int]:
        """Started nodes that are alive, in id order."""
        return list(self._members)

    # ----------------------------------------------------------------------------
    # Driving nodes

    def inject(self, node_id: int, action: Callable[[SimCore, float], Sequence[object]]) -> None:
        """Feed one input to a node's core now and carry out its effects."""
        node = self.nodes[node_id]
        if not node.alive:
            raise SimulationError("inject into a dead node")
        self._dispatch(node_id, node, action(node.core, self.clock.now))

    def start(self, node_id: int, bootstrap: Iterable[int] = ()) -> None:
        node = self.nodes[node_id]
        if node.started:
            raise SimulationError("node started twice")
        node.started = True
        self._members.add(node_id)
        refs = [self.ref(b) for b in bootstrap]
        self._dispatch(node_id, node, node.core.start(self.clock.now, refs))

    def route(self, node_id: int, key: int, message: object = b"") -> None:
        """Originate a routed message at ``node_id``; the Deliver lands in :attr:`events`."""
        self.inject(node_id, lambda _core, now: self.pastry(node_id).route(key, message, now))

    def kill(self, node_id: int) -> None:
        """Stop a node without a word, like SIGKILL: it sends and answers nothing more."""
        node = self.nodes[node_id]
        node.alive = False
        self._members.discard(node_id)
        if node_id in self._ready_set:
            self._ready_set.discard(node_id)
            self._ready.remove(node_id)
        if node.timer is not None:
            self.clock.cancel(node.timer)
            node.timer = None

    def leave(self, node_id: int) -> None:
        """Graceful leave: the node says goodbye, then is gone."""
        self.inject(node_id, lambda _core, now: self.pastry(node_id).leave(now))
        self.kill(node_id)

    def set_delay(self, node_id: int, delay: tuple[float, float] | None) -> None:
        """Extra (min, max) latency on every message to or from ``node_id``: a slow node."""
        self.nodes[node_id].delay = delay

    def partition(self, *groups: Iterable[int]) -> None:
        """Cut the network: nodes talk only within their group (unlisted nodes form group 0)."""
        for node in self.nodes.values():
            node.group = 0
        for number, group in enumerate(groups, start=1):
            for node_id in group:
                self.nodes[node_id].group = number
        self._partitioned = True

    def heal(self) -> None:
        for node in self.nodes.values():
            node.group = 0
        self._partitioned = False

    # ----------------------------------------------------------------------------
    # Running time

    def run_for(self, seconds: float) -> None:
        self.clock.run_until(self.clock.now + seconds)

    def run_until(
        self, predicate: Callable[[], bool], timeout: float, *, step: float | None = None
    ) -> bool:
        """Run until ``predicate()`` holds (True) or ``timeout`` simulated seconds pass (False).

        With ``step`` None the predicate is checked after every event; otherwise every
        ``step`` simulated seconds (cheaper for expensive predicates).
        """
        deadline = self.clock.now + timeout
        clock = self.clock
        while not predicate():
            if clock.now >= deadline:
                return False
            if step is None:
                next_time = clock.next_time()
                if next_time is None or next_time > deadline:
                    clock.run_until(deadline)
                else:
                    clock.step()
            else:
                clock.run_until(min(clock.now + step, deadline))
        return True

    # ----------------------------------------------------------------------------
    # The network itself

    def _dispatch(self, node_id: int, node: _SimNode, effects: Sequence[object]) -> None:
        if effects:
            now = self.clock.now
            for effect in effects:
                if type(effect) is Send:
                    self._send(node_id, node, effect)
                else:
                    self.events.append((now, node_id, effect))
                    if type(effect) is Ready and node_id not in self._ready_set and node.alive:
                        self._ready_set.add(node_id)
                        self._ready.append(node_id)
        # Keep one timer per node at its core's earliest deadline. A later deadline
        # leaves the timer alone: _fire re-reads the deadline.
        deadline = node.core.next_deadline()
        if deadline is None:
            if node.timer is not None:
                self.clock.cancel(node.timer)
                node.timer = None
            node.timer_at = math.inf
        elif deadline < node.timer_at:
            if node.timer is not None:
                self.clock.cancel(node.timer)
            node.timer = self.clock.call_at(deadline, self._fire, node_id)
            node.timer_at = deadline

    def _send(self, src: int, node: _SimNode, effect: Send) -> None:
        self.messages_sent += 1
        carried = effect.message
        self.message_counts[type(carried.message if type(carried) is Route else carried)] += 1
        dst = self.nodes.get(effect.dst_id)
        if dst is None or effect.dst_address != dst.address:
            raise SimulationError(f"send to an unknown id or a wrong address: {effect.dst_id:032x}")
        clock = self.clock
        if self.trace is not None:
            self.trace.append((clock.now, src, effect.dst_id, type(effect.message).__name__))
        random = self._net_rng.random
        if (
            not dst.alive
            or (self.loss and random() < self.loss)
            or (self._partitioned and node.group != dst.group)
        ):
            self.messages_lost += 1
            return
        low, high = self.latency
        delay = low + (high - low) * random()
        if node.delay is not None or dst.delay is not None:
            for extra in (node.delay, dst.delay):
                if extra is not None:
                    delay += extra[0] + (extra[1] - extra[0]) * random()
        at = clock.now + delay
        if self.fifo:
            in_flight = node.in_flight
            last = in_flight.get(effect.dst_id)
            if last is not None and at < last:
                at = last  # behind the previous message: links are streams
            elif last is None and len(in_flight) >= _IN_FLIGHT_SWEEP:
                now = clock.now  # keep only links with a message still on its way
                node.in_flight = in_flight = {d: t for d, t in in_flight.items() if t > now}
            in_flight[effect.dst_id] = at
        message = effect.message if self.codec is None else self.codec.encode(effect.message)
        clock.post_at(at, self._deliver, src, node, effect.dst_id, dst, message)

    def _deliver(
        self, src: int, src_node: _SimNode, dst_id: int, node: _SimNode, message: object
    ) -> None:
        if not node.alive or (self._partitioned and src_node.group != node.group):
            self.messages_lost += 1
            return
        if self.codec is not None:
            assert isinstance(message, bytes)
            message = self.codec.decode(message)
        self._dispatch(dst_id, node, node.core.handle(src, message, self.clock.now))

    def _fire(self, node_id: int) -> None:
        node = self.nodes[node_id]
        node.timer = None
        node.timer_at = math.inf
        if not node.alive:
            return
        now = self.clock.now
        deadline = node.core.next_deadline()
        if deadline is None or deadline > now:
            self._dispatch(node_id, node, ())
            return
        if node.fired_at == now:
            node.fires += 1
        else:
            node.fired_at = now
            node.fires = 1
        if node.fires > _MAX_FIRES_AT_ONE_TIME:
            raise SimulationError("a core keeps asking for its timer without time passing")
        self._dispatch(node_id, node, node.core.on_timer(now))

    # ----------------------------------------------------------------------------
    # Pastry helpers and the oracle

    def start_all_prefilled(self) -> None:
        """Start every node not yet started with its state already built, by an oracle.

        Each node starts alone, then is told of (``link_up``: first-hand contact)
        its true leaf set and, for each routing-table slot, a random node that
        fits it. Joining ten thousand nodes one by one costs minutes of wall time
        and proves nothing the join tests do not; experiments above Pastry
        (Scribe, messaging) start from here and let Pastry settle for a moment.
        """
        fresh = [n for n, node in self.nodes.items() if not node.started and node.alive]
        for node_id in fresh:
            self.start(node_id)
        members = self._members
        for node_id in fresh:
            left, right = self.expected_leaf_set(node_id)
            known = dict.fromkeys([*left, *right])
            for row in range(ID_DIGITS):
                width = ID_BITS - DIGIT_BITS * row  # bits below the row's shared prefix
                base = node_id >> width << width
                if members.bisect_left(base + (1 << width)) - members.bisect_left(base) <= 1:
                    break  # nobody else shares this prefix: no deeper row holds anyone
                own_digit = digit(node_id, row)
                step = 1 << (width - DIGIT_BITS)
                for column in range(BASE):
                    if column != own_digit:
                        low = base + column * step
                        first, last = members.bisect_left(low), members.bisect_left(low + step)
                        if first < last:
                            known[members[self.picker.randrange(first, last)]] = None
            refs = [self.ref(peer) for peer in known if peer != node_id]
            self.inject(node_id, partial(_link_up_all, self.pastry(node_id), refs))

    def join_all(
        self, *, one_by_one: bool = True, interval: float = 0.01, ready_timeout: float = 30.0
    ) -> float:
        """Start every node not yet started, each through a random ready node.

        ``one_by_one`` waits for each node to be ready before starting the next;
        otherwise a node starts every ``interval`` simulated seconds. Returns the
        simulated time taken.
        """
        began = self.clock.now
        for node_id, node in list(self.nodes.items()):
            if node.started or not node.alive:
                continue
            bootstrap = [self.picker.choice(self._ready)] if self._ready else []
            self.start(node_id, bootstrap)
            if one_by_one:
                pastry = self.pastry(node_id)

                def ready(p: PastryCore = pastry) -> bool:
                    return p.is_ready

                if not self.run_until(ready, ready_timeout):
                    raise SimulationError(f"node {node_id:032x} did not become ready")
            else:
                self.run_for(interval)
        return self.clock.now - began

    def run_until_converged(self, timeout: float, *, step: float = 0.25) -> float | None:
        """Run until :meth:`converged`; the simulated time it took, or None on timeout."""
        began = self.clock.now
        if self.run_until(self.converged, timeout, step=step):
            return self.clock.now - began
        return None

    def expected_leaf_set(self, node_id: int) -> tuple[list[int], list[int]]:
        """The true (predecessors, successors) of a live node, nearest first."""
        members = self._members
        count = len(members)
        index = members.index(node_id)
        side = min(self.config.leaf_half, count - 1)
        left = [members[(index - k) % count] for k in range(1, side + 1)]
        right = [members[(index + k) % count] for k in range(1, side + 1)]
        return left, right

    def converged(self) -> bool:
        """Every live node is ready and its leaf set is exactly the true one."""
        for node_id in self._members:
            pastry = self.pastry(node_id)
            if not pastry.is_ready or pastry.leaf_set() != self.expected_leaf_set(node_id):
                return False
        return True

    def true_owner(self, key: int) -> int:
        """The live node numerically closest to ``key`` (the one that must receive it)."""
        members = self._members
        index = members.bisect_left(key)
        count = len(members)
        return closest(key, (members[index % count], members[(index - 1) % count]))

    def trace_route(self, key: int, start: int) -> list[int] | None:
        """The path a message for ``key`` takes from ``start``, following each node's
        next hop; None if it reaches a dead node or loops."""
        path = [start]
        current = start
        for _ in range(self.config.max_hops + 1):
            nxt = self.pastry(current).next_hop(key)
            if nxt is None:
                return path
            node = self.nodes.get(nxt)
            if node is None or not node.alive:
                return None
            path.append(nxt)
            current = nxt
        return None

    def route_owner(self, key: int, start: int | None = None) -> int | None:
        """Which node a message for ``key`` from ``start`` (default: random) ends at."""
        if start is None:
            start = self.picker.choice(self._members)
        path = self.trace_route(key, start)
        return None if path is None else path[-1]

    def route_stats(self, keys: Iterable[int]) -> RouteStats:
        """Trace each key from a random live node and compare with :meth:`true_owner`."""
        total = correct = lost = hops_sum = hops_max = 0
        members = self._members
        for key in keys:
            total += 1
            path = self.trace_route(key, members[self.picker.randrange(len(members))])
            if path is None:
                lost += 1
                continue
            hops = len(path) - 1
            hops_sum += hops
            hops_max = max(hops_max, hops)
            if path[-1] == self.true_owner(key):
                correct += 1
        routed = total - lost
        return RouteStats(total, correct, lost, hops_sum / routed if routed else 0.0, hops_max)
