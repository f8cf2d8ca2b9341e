"""The Pastry state machine: :class:`PastryCore` (the rules are in :mod:`overlay.pastry`)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from overlay.ids import (
    ID_DIGITS,
    check_id,
    closer,
    digit,
    ring_distance,
    shared_prefix_digits,
)
from overlay.pastry.effects import (
    Deliver,
    Dropped,
    Effect,
    Intercept,
    LeafSetChanged,
    PeerDead,
    PeerLossReason,
    Ready,
    Send,
)
from overlay.pastry.leafset import LeafSet
from overlay.pastry.messages import (
    Address,
    Heartbeat,
    Join,
    JoinReply,
    LeafSetReply,
    LeafSetRequest,
    Leave,
    NodeRef,
    Route,
    RowReply,
    RowRequest,
)
from overlay.pastry.table import RoutingTable


@dataclass(frozen=True, slots=True)
class PastryConfig:
    """Tunables; the defaults notice a dead peer within 3 s on a LAN."""

    leaf_half: int = 8
    """Leaf-set members on each side (16 in all)."""
    heartbeat_interval: float = 0.5
    probe_interval: float = 1.0
    """Pings to routing-table entries that are not leaf members (they answer)."""
    suspect_after: float = 1.0
    dead_after: float = 2.5
    link_down_grace: float = 1.0
    """After the link layer reports a dropped link, how long the peer has to answer."""
    join_timeout: float = 5.0
    request_interval: float = 1.0
    """Least time between two leaf-set requests to one peer prompted by heartbeats."""
    maintenance_interval: float = 5.0
    """Mean time between two background state exchanges with random peers."""
    settle_time: float = 1.5
    """Mean time after joining before the first of those (a second look at the neighbourhood)."""
    dead_memory: float = 10.0
    """How long second-hand mentions of a node declared dead are ignored."""
    max_dead: int = 256
    max_probes: int = 256
    max_hops: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.leaf_half <= 32:
            raise ValueError("leaf_half must be within 1..32")
        if not 0 < self.heartbeat_interval < self.suspect_after < self.dead_after:
            raise ValueError("need 0 < heartbeat_interval < suspect_after < dead_after")
        if not 0 < self.probe_interval < self.dead_after:
            raise ValueError("need 0 < probe_interval < dead_after")


class _Peer:
    """What this node knows about one node in its leaf set or routing table."""

    __slots__ = (
        "address",
        "advertised_version",
        "asked_at",
        "fresh",
        "last_heard",
        "pulled_version",
        "suspect",
        "watches_us",
    )

    def __init__(self, address: Address, now: float) -> None:
        self.address = address
        self.last_heard = now
        self.fresh = True
        """Just admitted: gets a heartbeat next round even if it is a table entry."""
        self.suspect = False
        self.watches_us = False
        """It said it keeps us in its state, so its own heartbeats will keep coming."""
        self.advertised_version = -1
        """The leaf-set version its heartbeats announce..."""
        self.pulled_version = -1
        """...and the one we last fetched; they differ when it has news."""
        self.asked_at = -math.inf


_State = Literal["new", "joining", "ready", "left"]


class PastryCore:
    """One node's Pastry state machine (see the module docstring for the rules)."""

    def __init__(
        self,
        node_id: int,
        address: Address,
        rng: random.Random,
        config: PastryConfig | None = None,
    ) -> None:
        self.node_id = check_id(node_id)
        self.address = address
        self.config = config if config is not None else PastryConfig()
        self._rng = rng
        self._leaf = LeafSet(node_id, self.config.leaf_half)
        self._table = RoutingTable(node_id)
        self._peers: dict[int, _Peer] = {}
        """Every node in the leaf set or the routing table, and nothing else."""
        self._probes: dict[int, float] = {}
        """Hints being checked: id -> when to give up."""
        self._dead: dict[int, float] = {}
        """Recently lost or silent ids -> until when hints naming them are ignored."""
        self._leaf_version = 0
        self._leaf_refs_cache: tuple[NodeRef, ...] | None = None
        self._beats: tuple[Heartbeat, Heartbeat] | None = None
        self._state: _State = "new"
        self._bootstrap: list[NodeRef] = []
        self._join_attempts = 0
        self._join_deadline = math.inf
        self._next_tick = math.inf
        self._next_probe_round = math.inf
        self._next_maintenance = math.inf
        self._wake = math.inf
        """Earliest time a peer can turn dead, as of the last scan."""
        self._leaf_moved = False
        """The leaf set's membership changed during the current input."""

    # ----------------------------------------------------------------------------
    # Inputs

    def start(self, now: float, bootstrap: Iterable[NodeRef] = ()) -> list[Effect]:
        """Begin: alone if ``bootstrap`` is empty (a one-node overlay), else join through it."""
        if self._state != "new":
            raise RuntimeError("PastryCore.start called twice")
        config = self.config
        self._next_tick = now + self._rng.uniform(0.0, config.heartbeat_interval)
        self._next_probe_round = self._next_tick
        self._next_maintenance = now + config.maintenance_interval * (0.5 + self._rng.random())
        self._bootstrap = [ref for ref in bootstrap if ref.node_id != self.node_id]
        if not self._bootstrap:
            self._state = "ready"
            return [Ready()]
        self._state = "joining"
        effects: list[Effect] = []
        self._send_join(now, effects)
        return effects

    def handle(self, src_id: int, message: object, now: float) -> list[Effect]:
        """A message from ``src_id`` (as authenticated by the link) arrived."""
        if self._state == "new" or self._state == "left":
            return []
        effects = self._handle(src_id, message, now)
        if self._leaf_moved:
            self._leaf_moved = False
            effects.append(LeafSetChanged())
        return effects

    def _handle(self, src_id: int, message: object, now: float) -> list[Effect]:
        peer = self._peers.get(src_id)
        if type(message) is Heartbeat:  # most traffic: one lookup, no detours
            return self._on_heartbeat(src_id, peer, message, now)
        if peer is not None:
            if now > peer.last_heard:  # any message shows the peer is alive (keep a grace)
                peer.last_heard = now
            peer.suspect = False
        effects: list[Effect] = []
        if isinstance(message, Route):
            self._route(message, now, effects, src_id)
        elif isinstance(message, LeafSetRequest):
            self._learn(src_id, message.address, now, effects)
            reply = LeafSetReply(self.address, self._leaf_version, self._leaf_refs())
            effects.append(Send(src_id, message.address, reply))
        elif isinstance(message, LeafSetReply):
            peer = self._learn(src_id, message.address, now, effects)
            if peer is not None:
                peer.pulled_version = message.leaf_version
            self._hints(message.refs, now, effects)
        elif isinstance(message, Join):
            self._on_join(message, effects)
        elif isinstance(message, JoinReply):
            self._learn(src_id, message.address, now, effects)
            self._hints(message.refs, now, effects)
            if message.final and self._state == "joining":
                self._state = "ready"
                self._join_deadline = math.inf
                self._next_maintenance = now + self.config.settle_time * (0.5 + self._rng.random())
                effects.append(Ready())
        elif isinstance(message, RowRequest):
            self._learn(src_id, message.address, now, effects)
            refs = self._refs(self._table.row(message.row))
            effects.append(Send(src_id, message.address, RowReply(self.address, message.row, refs)))
        elif isinstance(message, RowReply):
            self._learn(src_id, message.address, now, effects)
            self._hints(message.refs, now, effects)
        elif isinstance(message, Leave):
            if src_id in self._peers:
                self._lose([src_id], "left", now, effects)
            else:
                self._remember_dead(src_id, now)
            self._hints(message.refs, now, effects)
        else:
            raise TypeError(f"not a Pastry message: {type(message).__name__}")
        return effects

    def on_timer(self, now: float) -> list[Effect]:
        """Heartbeats, failure detection, join retries and maintenance that are due."""
        if self._state == "new" or self._state == "left":
            return []
        effects: list[Effect] = []
        self._scan(now, effects)
        config = self.config
        if now >= self._next_tick:
            self._next_tick += config.heartbeat_interval
            if self._next_tick <= now:
                self._next_tick = now + config.heartbeat_interval
            probe_round = now >= self._next_probe_round
            if probe_round:
                self._next_probe_round = now + config.probe_interval
            self._heartbeat(now, probe_round, effects)
            if now >= self._join_deadline:
                self._send_join(now, effects)
            if now >= self._next_maintenance:
                self._maintain(now, effects)
        if self._leaf_moved:
            self._leaf_moved = False
            effects.append(LeafSetChanged())
        return effects

    def next_deadline(self) -> float | None:
        if self._state == "new" or self._state == "left":
            return None
        return min(self._next_tick, self._wake)

    def route(
        self,
        key: int,
        message: object,
        now: float,
        *,
        intercept: bool = False,
        avoid: int | None = None,
    ) -> list[Effect]:
        """Send ``message`` to the node responsible for ``key`` (maybe this one).

        ``avoid``: a peer the first hop must not be (Scribe routes around a tree
        parent it believes dead before Pastry has noticed).
        """
        if self._state == "left":
            return []
        route = Route(check_id(key), self.node_id, self.address, 0, intercept, message)
        effects: list[Effect] = []
        self._route(route, now, effects, None, avoid)
        return effects

    def forward(self, route: Route, now: float) -> list[Effect]:
        """Continue a message handed up by :class:`Intercept` (possibly with a new message)."""
        if self._state == "left":
            return []
        effects: list[Effect] = []
        self._route(route, now, effects, None)
        return effects

    def join_via(self, ref: NodeRef, now: float) -> list[Effect]:
        """Route a Join towards our own id through ``ref``, even though we are running.

        A node that started alone (a one-node overlay, usable at once) calls this
        when it first hears of another node: the path's answers fill its state as
        a join's would, and probing them introduces it to its neighbours. Two
        one-node overlays that find each other merge this way.
        """
        if self._state == "new" or self._state == "left" or ref.node_id == self.node_id:
            return []
        return [Send(ref.node_id, ref.address, Join(self.node_id, self.address, 0))]

    def hint(self, refs: Iterable[NodeRef], now: float) -> list[Effect]:
        """Nodes heard of from outside (discovery, seeds): probe those that would help.

        Only a node that would improve the leaf set or fill an empty routing slot is
        contacted, so hearing of a node costs nothing when the overlay does not need it.
        """
        if self._state == "new" or self._state == "left":
            return []
        effects: list[Effect] = []
        self._hints(refs, now, effects)
        return effects

    def link_up(self, peer_id: int, address: Address, now: float) -> list[Effect]:
        """The link layer has an authenticated link to ``peer_id``: first-hand knowledge."""
        if self._state == "new" or self._state == "left":
            return []
        effects: list[Effect] = []
        self._learn(peer_id, address, now, effects)
        if self._leaf_moved:
            self._leaf_moved = False
            effects.append(LeafSetChanged())
        return effects

    def link_down(self, peer_id: int, now: float) -> list[Effect]:
        """The link to ``peer_id`` failed: ping it, and give it ``link_down_grace`` to answer.

        Report only failures, not links closed for idleness.
        """
        peer = self._peers.get(peer_id)
        if peer is None or self._state == "left":
            return []
        config = self.config
        peer.suspect = True
        peer.last_heard = min(peer.last_heard, now + config.link_down_grace - config.dead_after)
        self._wake = min(self._wake, peer.last_heard + config.dead_after)
        ping = Heartbeat(self.address, self._leaf_version, True, True)
        return [Send(peer_id, peer.address, ping)]

    def leave(self, now: float) -> list[Effect]:
        """Say goodbye to every peer (with the leaf set, for their repair) and stop."""
        if self._state == "new" or self._state == "left":
            return []
        goodbye = Leave(self._leaf_refs())
        effects: list[Effect] = [Send(p, peer.address, goodbye) for p, peer in self._peers.items()]
        self._state = "left"
        self._peers.clear()
        self._probes.clear()
        self._leaf = LeafSet(self.node_id, self.config.leaf_half)
        self._table = RoutingTable(self.node_id)
        return effects

    # ----------------------------------------------------------------------------
    # Queries

    @property
    def is_ready(self) -> bool:
        return self._state == "ready"

    @property
    def has_left(self) -> bool:
        return self._state == "left"

    def next_hop(self, key: int, avoid: int | None = None) -> int | None:
        """Where a message for ``key`` goes from here (never ``avoid``); None: this node
        is responsible."""
        return self._next_hop(key, avoid)

    def address_of(self, peer_id: int) -> Address | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.address

    def leaf_set(self) -> tuple[list[int], list[int]]:
        """(predecessors, successors), nearest first."""
        return self._leaf.left(), self._leaf.right()

    def routing_table(self) -> dict[int, list[int]]:
        """Non-empty rows: row number -> the ids in it."""
        return self._table.rows()

    def peers(self) -> dict[int, Address]:
        """Every node in the leaf set or routing table."""
        return {p: peer.address for p, peer in self._peers.items()}

    def state_sizes(self) -> dict[str, int]:
        """Sizes of every table this node keeps (all bounded; tests check the bounds)."""
        return {
            "leaf": len(self._leaf),
            "leaf_left": len(self._leaf.left()),
            "leaf_right": len(self._leaf.right()),
            "table": len(self._table),
            "peers": len(self._peers),
            "probes": len(self._probes),
            "dead": len(self._dead),
        }

    # ----------------------------------------------------------------------------
    # Routing

    def _next_hop(self, key: int, exclude: int | None) -> int | None:
        own = self.node_id
        if self._leaf.covers(key):
            best = self._leaf.closest(key, exclude)
            return None if best == own else best
        row = shared_prefix_digits(own, key)
        entry = self._table.get(row, digit(key, row))
        if entry is not None and entry != exclude:
            return entry
        # Rare case: no entry. Prefer a closer node with at least as long a prefix,
        # then any closer node; both make progress.
        best_prefixed = best_any = own
        for p in self._peers:
            if p == exclude:
                continue
            if closer(key, p, best_any):
                best_any = p
            if shared_prefix_digits(p, key) >= row and closer(key, p, best_prefixed):
                best_prefixed = p
        best = best_prefixed if best_prefixed != own else best_any
        return None if best == own else best

    def _route(
        self,
        route: Route,
        now: float,
        effects: list[Effect],
        src_id: int | None,
        avoid: int | None = None,
    ) -> None:
        """One step of ``route``; ``src_id`` is the previous hop (None: from this node)."""
        nxt = self._next_hop(route.key, avoid)
        if nxt is None:
            effects.append(Deliver(route))
        elif route.intercept and src_id is not None:
            effects.append(Intercept(route, src_id, nxt))
        elif route.hops >= self.config.max_hops:
            effects.append(Dropped(route, "hop limit"))
        else:
            forwarded = Route(
                route.key,
                route.origin_id,
                route.origin_address,
                route.hops + 1,
                route.intercept,
                route.message,
            )
            effects.append(Send(nxt, self._peers[nxt].address, forwarded))

    # ----------------------------------------------------------------------------
    # Join

    def _send_join(self, now: float, effects: list[Effect]) -> None:
        """(Re)send our Join, to the bootstrap nodes in turn."""
        target = self._bootstrap[self._join_attempts % len(self._bootstrap)]
        self._join_attempts += 1
        self._join_deadline = now + self.config.join_timeout
        effects.append(Send(target.node_id, target.address, Join(self.node_id, self.address, 0)))

    def _on_join(self, message: Join, effects: list[Effect]) -> None:
        joiner = message.joiner_id
        if joiner == self.node_id:
            return
        nxt = self._next_hop(joiner, joiner)
        final = nxt is None
        ids: list[int] = []
        for row in range(shared_prefix_digits(self.node_id, joiner) + 1):
            ids.extend(self._table.row(row))
        if final:
            ids.extend(self._leaf)
        reply = JoinReply(self.address, self._refs(ids), final)
        effects.append(Send(joiner, message.joiner_address, reply))
        if nxt is not None and message.hops < self.config.max_hops:
            onward = Join(joiner, message.joiner_address, message.hops + 1)
            effects.append(Send(nxt, self._peers[nxt].address, onward))

    # ----------------------------------------------------------------------------
    # Knowledge

    def _learn(
        self, node_id: int, address: Address, now: float, effects: list[Effect], greet: bool = True
    ) -> _Peer | None:
        """First-hand contact with ``node_id``: admit it wherever it fits.

        Returns its record if it is (now) in the leaf set or routing table. A node
        just admitted gets one heartbeat interval of grace on top of ``dead_after``:
        its first answer comes back a round trip after our next round (which
        includes it whatever it is), and a peer with a long round trip must not
        look silent before that. A new leaf-set member is also greeted at once
        (unless the caller answers it anyway): leaf sets converge a round trip
        per step, and waiting for the next round would add half a second to each.
        """
        peer = self._peers.get(node_id)
        if peer is not None:
            if peer.address != address:
                peer.address = address
                if node_id in self._leaf:
                    self._leaf_changed()
            if now > peer.last_heard:
                peer.last_heard = now
            peer.suspect = False
            return peer
        if node_id == self.node_id:
            return None
        self._dead.pop(node_id, None)
        self._probes.pop(node_id, None)
        if not (self._leaf.accepts(node_id) or self._table.accepts(node_id)):
            return None
        peer = self._peers[node_id] = _Peer(address, now + self.config.heartbeat_interval)
        self._place(node_id, effects)
        if greet and node_id in self._leaf:
            effects.append(Send(node_id, address, self._beat(False)))
        return peer

    def _place(self, node_id: int, effects: list[Effect]) -> None:
        """Put a node known to be alive (its record is in ``_peers``) wherever it fits."""
        if self._table.accepts(node_id):
            displaced = self._table.add(node_id)
            if displaced is not None:
                self._forget(displaced, effects)
        if self._leaf.accepts(node_id):
            evicted = self._leaf.add(node_id)
            self._leaf_changed()
            self._leaf_moved = True
            for gone in evicted or ():
                self._forget(gone, effects)

    def _forget(self, node_id: int, effects: list[Effect]) -> None:
        """Drop a live node that no longer fits anywhere.

        It may rely on our heartbeats, which stop now: tell it, so that it starts
        asking for answers at once instead of after a silence. (Whether it watches
        us is no guide: what it believes is what we last told it.)
        """
        if node_id in self._leaf or node_id in self._table:
            return
        peer = self._peers.pop(node_id)
        unwatch = Heartbeat(self.address, self._leaf_version, False, False)
        effects.append(Send(node_id, peer.address, unwatch))

    def _hints(self, refs: Iterable[NodeRef], now: float, effects: list[Effect]) -> None:
        """Second-hand refs: probe those that would improve our state."""
        leaf, table, peers, probes = self._leaf, self._table, self._peers, self._probes
        probe = Heartbeat(self.address, self._leaf_version, False, True)
        for node_id, address in refs:
            if node_id == self.node_id or node_id in probes or node_id in self._dead:
                continue
            if node_id in peers:
                continue  # known alive; it can only fit somewhere new after a loss (_lose)
            if not (leaf.accepts(node_id) or table.is_empty_for(node_id)):
                continue
            if len(probes) >= self.config.max_probes:
                return
            probes[node_id] = now + self.config.dead_after
            effects.append(Send(node_id, address, probe))

    def _remember_dead(self, node_id: int, now: float) -> None:
        dead = self._dead
        dead.pop(node_id, None)
        dead[node_id] = now + self.config.dead_memory
        if len(dead) > self.config.max_dead:
            del dead[next(iter(dead))]

    def _refs(self, ids: Iterable[int]) -> tuple[NodeRef, ...]:
        peers = self._peers
        return tuple(NodeRef(p, peers[p].address) for p in ids)

    def _leaf_refs(self) -> tuple[NodeRef, ...]:
        if self._leaf_refs_cache is None:
            self._leaf_refs_cache = self._refs(self._leaf)
        return self._leaf_refs_cache

    def _leaf_changed(self) -> None:
        """Neighbours learn of any change through the version in our heartbeats."""
        self._leaf_version = (self._leaf_version + 1) & 0xFFFFFFFF
        self._leaf_refs_cache = None
        self._beats = None

    # ----------------------------------------------------------------------------
    # Liveness and repair

    def _on_heartbeat(
        self, src_id: int, peer: _Peer | None, message: Heartbeat, now: float
    ) -> list[Effect]:
        effects: list[Effect] = []
        if peer is not None:
            if now > peer.last_heard:
                peer.last_heard = now
            peer.suspect = False
            if peer.address != message.address:
                self._learn(src_id, message.address, now, effects)
            # If it stopped watching us, its own heartbeats stop now: ask for an
            # answer at once rather than after a silence.
            ask = peer.watches_us and not message.watching
        else:
            peer = self._learn(src_id, message.address, now, effects, not message.want_reply)
            if peer is None:
                if message.want_reply:
                    reply = Heartbeat(self.address, self._leaf_version, False, False)
                    effects.append(Send(src_id, message.address, reply))
                return effects
            ask = False
        peer.watches_us = message.watching
        peer.advertised_version = message.leaf_version
        if message.want_reply or ask:
            effects.append(Send(src_id, message.address, self._beat(ask)))
        return effects

    def _heartbeat(self, now: float, probe_round: bool, effects: list[Effect]) -> None:
        """Heartbeats to the leaf set every round, to table entries every probe round.

        A peer that watches us sends its own heartbeats, so ours need no answer;
        any other peer, and any suspect, is asked for one. Either way evidence
        flows at the heartbeat rate whatever the latency.

        Then pull the leaf set of at most one leaf member with news, the nearest:
        a join or a loss changes the leaf sets of a whole neighbourhood at once,
        and one of them tells us as much as all sixteen.
        """
        beat = self._beat(False)
        ping = self._beat(True)
        leaf = self._leaf
        stale: list[int] = []
        retry = now - self.config.request_interval
        for p, peer in self._peers.items():
            in_leaf = p in leaf
            if probe_round or peer.suspect or in_leaf or peer.fresh:
                wanted = peer.suspect or not peer.watches_us
                effects.append(Send(p, peer.address, ping if wanted else beat))
                peer.fresh = False
            if (
                in_leaf
                and peer.advertised_version != peer.pulled_version
                and peer.asked_at <= retry
            ):
                stale.append(p)
        if stale:
            own = self.node_id
            nearest = min(stale, key=lambda p: (ring_distance(own, p), p))
            self._ask_leaf_set(nearest, now, effects)

    def _beat(self, want_reply: bool) -> Heartbeat:
        """Our heartbeat as a watcher (messages are immutable: two per leaf version)."""
        beats = self._beats
        if beats is None:
            version = self._leaf_version
            beats = self._beats = (
                Heartbeat(self.address, version, True, False),
                Heartbeat(self.address, version, True, True),
            )
        return beats[want_reply]

    def _scan(self, now: float, effects: list[Effect]) -> None:
        """Mark silent peers suspect, declare the long-silent dead, expire old records."""
        config = self.config
        dead_after = config.dead_after
        suspect_after = config.suspect_after
        lost: list[int] = []
        wake = math.inf
        for p, peer in self._peers.items():
            heard = peer.last_heard
            expiry = heard + dead_after
            if expiry <= now:
                lost.append(p)
                continue
            if heard + suspect_after <= now:
                peer.suspect = True
            if expiry < wake:
                wake = expiry
        self._wake = wake
        if self._probes:
            # An unanswered probe is forgotten, not held against the node: the
            # probe or its answer may just have been lost, and a dead node stops
            # being gossiped about once its neighbours notice.
            for p in [p for p, until in self._probes.items() if until <= now]:
                del self._probes[p]
        dead = self._dead
        while dead:
            first = next(iter(dead))
            if dead[first] > now:
                break
            del dead[first]
        if lost:
            self._lose(lost, "silent", now, effects)

    def _lose(
        self, lost: list[int], reason: PeerLossReason, now: float, effects: list[Effect]
    ) -> None:
        """Drop dead peers, then repair what they leave behind."""
        leaf_hit = False
        rows: set[int] = set()
        for p in lost:
            del self._peers[p]
            self._remember_dead(p, now)
            if self._leaf.remove(p):
                leaf_hit = True
            row = self._table.remove(p)
            if row is not None:
                rows.add(row)
            effects.append(PeerDead(p, reason))
        if leaf_hit:
            self._leaf_changed()
            self._leaf_moved = True
        if leaf_hit or rows:
            for p in list(self._peers):  # refill from peers we already know are alive
                if p in self._peers:
                    self._place(p, effects)
        if leaf_hit:
            for side in (self._leaf.left(), self._leaf.right()):
                healthy = [p for p in side if not self._peers[p].suspect]
                if healthy:
                    self._ask_leaf_set(healthy[-1], now, effects)
        for row in sorted(rows):
            self._ask_row(row, effects)

    def _ask_leaf_set(self, peer_id: int, now: float, effects: list[Effect]) -> None:
        peer = self._peers[peer_id]
        peer.asked_at = now
        effects.append(Send(peer_id, peer.address, LeafSetRequest(self.address)))

    def _ask_row(self, row: int, effects: list[Effect]) -> None:
        """Ask a healthy peer sharing at least ``row`` digits with us for its row ``row``."""
        own = self.node_id
        candidates = [
            p
            for p, peer in self._peers.items()
            if not peer.suspect and shared_prefix_digits(own, p) >= row
        ]
        if candidates:
            p = self._rng.choice(candidates)
            effects.append(Send(p, self._peers[p].address, RowRequest(self.address, row)))

    def _maintain(self, now: float, effects: list[Effect]) -> None:
        """Background state exchange: look ourselves up, and fetch a table row.

        The lookup is a Join for our own id through a random peer. It ends at the
        node the *rest* of the network believes is closest to us, whose leaf set
        then comes back. That is what finds neighbours we have never heard of: a
        join that raced with others can leave a node and its true neighbours
        each unaware of the other, and no amount of gossip among the wrong
        neighbours fixes that quickly.
        """
        config = self.config
        self._next_maintenance = now + config.maintenance_interval * (0.5 + self._rng.random())
        if self._peers:
            via = self._rng.choice(list(self._peers))
            lookup = Join(self.node_id, self.address, 0)
            effects.append(Send(via, self._peers[via].address, lookup))
        entries = list(self._table)
        if entries:
            peer_id = self._rng.choice(entries)
            row = self._rng.randint(
                0, min(shared_prefix_digits(self.node_id, peer_id), ID_DIGITS - 1)
            )
            request = RowRequest(self.address, row)
            effects.append(Send(peer_id, self._peers[peer_id].address, request))
