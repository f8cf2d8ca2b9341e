"""Messaging cores over Pastry and Scribe in the simulation, with recording applications.

Each simulated node is an :class:`~overlay.stack.OverlayStack` of Pastry, Scribe and
a :class:`~irisnode.messaging.core.MessagingCore` whose broker serves
:class:`App` endpoints: stand-ins for relay connections that record what they
are given and answer as told. :func:`call` runs an application's call on its
node's core and carries out the effects, as the Twisted adapter does.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from irisnode.broker import Broker
from irisnode.messaging.core import MessagingCore
from overlay.pastry import PastryConfig, PastryCore
from overlay.scribe import ScribeConfig, ScribeCore
from overlay.simulation import SimNetwork
from overlay.stack import OverlayStack
from relay.ports import TunnelEnd


@dataclass(eq=False)
class App:
    """One application connection: it records deliveries and outcomes."""

    name: str
    node: int = 0
    congested: bool = False
    answer: Callable[[App, int, bytes], bytes | None] | None = None
    """For a member: called with each request; a reply, or None to keep it unanswered."""
    outcomes: dict[int, tuple[str, object]] = field(default_factory=dict)
    """Request id -> ("reply", bytes) / ("fault", str) / ("timeout", None)."""
    duplicates: int = 0
    requests: list[tuple[int, bytes, int]] = field(default_factory=list)
    broadcasts: list[bytes] = field(default_factory=list)
    events: list[tuple[str, bytes]] = field(default_factory=list)
    offers: list[int] = field(default_factory=list)
    tunnels: dict[int, TunnelEnd] = field(default_factory=dict)
    tunnel_data: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    tunnel_credit: dict[int, int] = field(default_factory=dict)
    closed: dict[int, str] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    sim: MessagingSim | None = None

    def _outcome(self, request_id: int, kind: str, value: object) -> None:
        if request_id in self.outcomes:
            self.duplicates += 1
        self.outcomes[request_id] = (kind, value)

    def deliver_request(self, handle: int, request: bytes, timeout_ms: int) -> None:
        self.requests.append((handle, request, timeout_ms))
        if self.answer is not None:
            reply = self.answer(self, handle, request)
            if reply is not None:
                assert self.sim is not None
                self.sim.later(self.node, partial(_reply, self, handle, reply))

    def request_replied(self, request_id: int, reply: bytes) -> None:
        self._outcome(request_id, "reply", reply)

    def request_faulted(self, request_id: int, fault: str) -> None:
        self._outcome(request_id, "fault", fault)

    def request_timed_out(self, request_id: int) -> None:
        self._outcome(request_id, "timeout", None)

    def deliver_broadcast(self, message: bytes) -> None:
        self.broadcasts.append(message)

    def deliver_event(self, topic: str, event: bytes) -> None:
        self.events.append((topic, event))

    def offer_tunnel(self, offer: int, chunk_limit: int) -> None:
        self.offers.append(offer)

    def tunnel_opened(self, tunnel_id: int, tunnel: TunnelEnd, chunk_limit: int) -> None:
        self.tunnels[tunnel_id] = tunnel

    def tunnel_failed(self, tunnel_id: int) -> None:
        self.failed.append(tunnel_id)

    def tunnel_transfer(self, tunnel_id: int, size_or_cont: int, chunk: bytes) -> None:
        self.tunnel_data.setdefault(tunnel_id, []).append((size_or_cont, chunk))

    def tunnel_allow(self, tunnel_id: int, size: int) -> None:
        self.tunnel_credit[tunnel_id] = self.tunnel_credit.get(tunnel_id, 0) + size

    def tunnel_closed(self, tunnel_id: int, reason: str) -> None:
        self.closed[tunnel_id] = reason


def echo(app: App, handle: int, request: bytes) -> bytes:
    return request


class MessagingSim:
    """A simulated network whose nodes run the whole pure stack."""

    def __init__(
        self,
        nodes: int,
        seed: int,
        *,
        pastry: PastryConfig | None = None,
        scribe: ScribeConfig | None = None,
        latency: tuple[float, float] = (0.001, 0.005),
    ) -> None:
        self.cores: dict[int, MessagingCore] = {}

        def factory(node_id: int, address: bytes, rng: random.Random) -> OverlayStack:
            core = PastryCore(node_id, address, rng, pastry)
            trees = ScribeCore(node_id, address, core, rng, scribe)
            messaging = self.cores[node_id] = MessagingCore(Broker())
            stack = OverlayStack(core, (trees, messaging))
            messaging.attach_overlay(trees, address, 0.0)
            return stack

        self.net = SimNetwork(seed, latency=latency, config=pastry, factory=factory)
        self.net.add_nodes(nodes)
        self.net.start_all_prefilled()
        self.net.run_for(2.0)
        self.ids = self.net.live_ids()

    def later(self, node: int, action: Callable[[MessagingCore, float], Any]) -> None:
        """Run ``action`` on a node's core on the next event (never from inside another)."""
        self.net.clock.call_later(0.0, self.call, node, action)

    def call(self, node: int, action: Callable[[MessagingCore, float], Any]) -> Any:
        """Run an application's call on ``node`` now and carry out its effects."""
        core = self.cores[node]
        stack = self.net.core(node)
        assert isinstance(stack, OverlayStack)
        result: list[Any] = []

        def run(_core: object, now: float) -> list[object]:
            result.append(action(core, now))
            effects = list(core.outbox)
            core.outbox.clear()
            return stack.run(effects, now)

        self.net.inject(node, run)
        return result[0]

    def app(self, node: int, name: str, cluster: str = "", **kwargs: Any) -> App:
        app = App(name, node, sim=self, **kwargs)
        self.call(node, lambda core, now: core.attach(app, cluster, now))
        return app

    def run_for(self, seconds: float) -> None:
        self.net.run_for(seconds)

    # -- an application's calls, by name (each runs now on its node) -------------------

    def request(
        self, app: App, request_id: int, cluster: str, data: bytes, timeout_ms: int
    ) -> None:
        self.call(app.node, partial(_request, app, request_id, cluster, data, timeout_ms))

    def reply(self, app: App, handle: int, data: bytes) -> None:
        self.call(app.node, partial(_reply, app, handle, data))

    def fault(self, app: App, handle: int, reason: str) -> None:
        self.call(app.node, partial(_fault, app, handle, reason))

    def broadcast(self, node: int, cluster: str, data: bytes) -> None:
        self.call(node, partial(_broadcast, cluster, data))

    def publish(self, node: int, topic: str, data: bytes) -> None:
        self.call(node, partial(_publish, topic, data))

    def subscribe(self, app: App, topic: str) -> None:
        self.call(app.node, partial(_subscribe, app, topic))


def _request(
    app: App,
    request_id: int,
    cluster: str,
    data: bytes,
    timeout_ms: int,
    core: MessagingCore,
    now: float,
) -> None:
    core.request(app, request_id, cluster, data, timeout_ms, now)


def _reply(app: App, handle: int, data: bytes, core: MessagingCore, now: float) -> None:
    core.reply(app, handle, data, now)


def _fault(app: App, handle: int, reason: str, core: MessagingCore, now: float) -> None:
    core.fault(app, handle, reason, now)


def _broadcast(cluster: str, data: bytes, core: MessagingCore, now: float) -> None:
    core.broadcast(cluster, data, now)


def _publish(topic: str, data: bytes, core: MessagingCore, now: float) -> None:
    core.publish(topic, data, now)


def _subscribe(app: App, topic: str, core: MessagingCore, now: float) -> None:
    core.subscribe(app, topic, now)


@dataclass
class ScaleFigures:
    broadcasts_expected: int = 0
    broadcasts_delivered: int = 0
    events_expected: int = 0
    events_delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    max_share_deviation: float = 0.0
    slow_share: float = 0.0
    requests: int = 0
    outcomes: int = 0
    double_outcomes: int = 0
    after_failure_outcomes: int = 0
    after_failure_requests: int = 0


def at_scale(nodes: int, clusters: int, topics: int, seed: int, fail: float) -> ScaleFigures:
    """The issue's experiment: members and subscribers spread at random over ``nodes``;
    every broadcast and event exactly once and in order; requests spread evenly, and
    away from a slow member; one outcome per request across ``fail`` of nodes failing."""
    rng = random.Random(seed)
    sim = MessagingSim(nodes, seed)
    figures = ScaleFigures()
    slow_delay, fast_delay = 0.2, 0.01

    def answer_after(delay: float) -> Callable[[App, int, bytes], None]:
        def answer(app: App, handle: int, request: bytes) -> None:
            sim.net.clock.call_later(delay, sim.reply, app, handle, request)

        return answer

    members: list[list[App]] = []
    for c in range(clusters):
        chosen = rng.sample(sim.ids, rng.randint(2, 8))
        members.append([sim.app(n, f"c{c}@{n:x}", f"cluster-{c}") for n in chosen])
    subscribers: list[list[App]] = []
    for t in range(topics):
        apps = []
        for n in rng.sample(sim.ids, rng.randint(1, 8)):
            app = sim.app(n, f"t{t}@{n:x}")
            sim.subscribe(app, f"topic-{t}")
            apps.append(app)
        subscribers.append(apps)
    sim.run_for(3.0)
    # Broadcast and publish: three from one sender each, in order.
    for c in range(len(members)):
        sender = rng.choice(sim.ids)
        for n in range(3):
            sim.broadcast(sender, f"cluster-{c}", b"%d" % n)
    for t in range(len(subscribers)):
        sender = rng.choice(sim.ids)
        for n in range(3):
            sim.publish(sender, f"topic-{t}", b"%d" % n)
    sim.run_for(1.0)
    wanted = [b"0", b"1", b"2"]
    for group in members:
        for app in group:
            figures.broadcasts_expected += 3
            figures.broadcasts_delivered += len(set(app.broadcasts))
            figures.duplicates += len(app.broadcasts) - len(set(app.broadcasts))
            figures.out_of_order += app.broadcasts != wanted and set(app.broadcasts) == set(wanted)
    for group in subscribers:
        for app in group:
            events = [e for _, e in app.events]
            figures.events_expected += 3
            figures.events_delivered += len(set(events))
            figures.duplicates += len(events) - len(set(events))
            figures.out_of_order += events != wanted and set(events) == set(wanted)
    # Requests: equal members first, then one slow member per cluster.
    for group in members:
        for app in group:
            app.answer = answer_after(fast_delay)
    client_nodes = rng.sample(sim.ids, min(len(sim.ids), 20))
    clients = {n: sim.app(n, f"client@{n:x}") for n in client_nodes}
    next_id = [0]

    def send_requests(per_member: int, drain: float) -> None:
        """``per_member`` requests per member, at 1,000 per simulated second."""
        total = per_member * sum(len(g) for g in members)
        for _ in range(total):
            c = rng.randrange(len(members))
            n = rng.choice(client_nodes)
            next_id[0] += 1
            request_id = next_id[0]
            sim.request(clients[n], request_id, f"cluster-{c}", b"job", 3000)
            figures.requests += 1
            sim.run_for(0.001)
        sim.run_for(drain)

    def spread() -> list[dict[str, int]]:
        return [{app.name: len(app.requests) for app in group} for group in members]

    send_requests(30, 1.0)
    counts = spread()
    for group_counts in counts:
        total = sum(group_counts.values())
        even = total / len(group_counts)
        for count in group_counts.values():
            figures.max_share_deviation = max(figures.max_share_deviation, abs(count - even) / even)
    for group in members:
        group[0].answer = answer_after(slow_delay)
    before = spread()
    send_requests(30, 1.0)
    shares = []
    for c, group in enumerate(members):
        got = {app.name: len(app.requests) - before[c][app.name] for app in group}
        even = sum(got.values()) / len(group)
        shares.append(got[group[0].name] / even if even else 0.0)
    figures.slow_share = max(shares)
    # Failures: a fraction of nodes die with requests in flight.
    before_failure = figures.requests
    for group in members:
        for app in group:
            app.answer = answer_after(fast_delay)
    victims = set(rng.sample(sim.ids, int(len(sim.ids) * fail))) - set(client_nodes)
    for c in range(len(members)):
        for _ in range(3):
            n = rng.choice(client_nodes)
            next_id[0] += 1
            request_id = next_id[0]
            sim.request(clients[n], request_id, f"cluster-{c}", b"job", 3000)
            figures.requests += 1
    for victim in victims:
        sim.net.kill(victim)
    send_requests(5, 3.5)
    sim.run_for(4.0)
    figures.after_failure_requests = figures.requests - before_failure
    for app in clients.values():
        figures.outcomes += len(app.outcomes)
        figures.double_outcomes += app.duplicates
    return figures
