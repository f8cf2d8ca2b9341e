"""Pastry routing as a pure core: messages and ``now`` in, effects out.

One :class:`PastryNode` per node. It never reads a clock, never draws randomness
except from the injected ``random.Random``, never logs and never touches a socket:
the same object runs under unit tests, in :mod:`overlay.simulation` with thousands
of others, and behind the real links. Peers are node ids plus an opaque address
(``bytes``) that only the link layer interprets.

The rules, in one place (``docs/overlay.md`` has the reasons at more length):

* **Routing.** A key inside the leaf set's range goes to the numerically closest
  member (or is delivered here); otherwise to the routing-table entry that shares
  one more digit with the key; otherwise to any known node that is closer. Every
  hop either lengthens the shared prefix or shortens the distance, so a route
  ends at the node closest to the key (:func:`overlay.ids.closer`) once leaf sets
  are right; a hop limit bounds the damage while they are not.
* **Only first-hand knowledge enters the state.** The leaf set and the routing
  table hold only nodes this node has heard from directly. Refs learned second
  hand (join replies, leaf sets, rows) are *hints*: a hint that would improve the
  state is probed, and the probe's answer admits it. Dead nodes gossiped by
  slower peers therefore never displace live ones, and probing a hint also
  introduces this node to it (which is how a joining node announces itself).
* **Join** routes a ``Join`` towards the new node's own id through a bootstrap
  node; every node on the path answers with its routing-table rows, the last one
  (the numerically closest) with its leaf set too, and the new node is
  :class:`Ready` when that last answer arrives. The same lookup runs again a
  moment later and then now and then (maintenance), to find neighbours that a
  join racing with others missed.
* **State exchange.** Every leaf-set change bumps a version carried by
  heartbeats; each heartbeat round, a node pulls the leaf set of the nearest
  neighbour whose version it has not seen.
* **Failure detection.** Leaf-set members get a heartbeat every
  ``heartbeat_interval``, routing-table entries every ``probe_interval``. A
  heartbeat says whether the sender keeps the receiver in its state
  (``watching``); a peer that does not watch us, and any suspect, is asked to
  answer. So evidence of life flows at the heartbeat rate however long the
  latency, and only *gaps* count: silent for ``suspect_after``, a peer is
  suspect and pinged every round; silent for ``dead_after``, it is dead. A node
  that drops a peer from its state tells it (``watching`` false) so that it
  starts asking at once. A dropped link shortens the grace to ``link_down_grace``.
* **Repair.** A lost leaf member is replaced from known peers at once, and the
  farthest healthy member on each side is asked for its leaf set; a lost table
  slot is refilled by asking a peer that shares the row for its row. A graceful
  ``Leave`` carries the leaver's leaf set, so the repair needs no round trip.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from overlay.ids import (
    BASE,
    DIGIT_BITS,
    ID_BITS,
    ID_DIGITS,
    ID_SPACE,
    check_id,
    clockwise,
    closer,
    digit,
    ring_distance,
    shared_prefix_digits,
)

Address = bytes
"""Where a peer can be reached; opaque to the core (the link layer's business)."""


class NodeRef(NamedTuple):
    node_id: int
    address: Address


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


# --------------------------------------------------------------------------------
# Messages between nodes (encoded by overlay.wire)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """I am alive and my leaf set is at ``leaf_version``.

    ``watching``: the sender keeps the receiver in its state and will keep sending
    heartbeats; False from a node that just dropped the receiver ("unwatch").
    ``want_reply``: answer at once (a ping).
    """

    address: Address
    leaf_version: int
    watching: bool
    want_reply: bool


@dataclass(frozen=True, slots=True)
class Join:
    """Routed towards ``joiner_id``; every node on the path answers the joiner."""

    joiner_id: int
    joiner_address: Address
    hops: int


@dataclass(frozen=True, slots=True)
class JoinReply:
    """A path node's routing-table rows (and, if ``final``, its leaf set): hints."""

    address: Address
    refs: tuple[NodeRef, ...]
    final: bool


@dataclass(frozen=True, slots=True)
class LeafSetRequest:
    address: Address


@dataclass(frozen=True, slots=True)
class LeafSetReply:
    address: Address
    leaf_version: int
    refs: tuple[NodeRef, ...]


@dataclass(frozen=True, slots=True)
class RowRequest:
    address: Address
    row: int


@dataclass(frozen=True, slots=True)
class RowReply:
    address: Address
    row: int
    refs: tuple[NodeRef, ...]


@dataclass(frozen=True, slots=True)
class Leave:
    """The sender is leaving for good; ``refs`` (its leaf set) repair the gap at once."""

    refs: tuple[NodeRef, ...]


@dataclass(frozen=True, slots=True)
class Route:
    """An application message on its way to the node responsible for ``key``.

    ``intercept`` asks every intermediate node to hand the message to its upper
    layer (:class:`Intercept`) instead of forwarding it, which is how Scribe builds
    trees along routes.
    """

    key: int
    origin_id: int
    origin_address: Address
    hops: int
    intercept: bool
    payload: bytes


PastryMessage = (
    Heartbeat
    | Join
    | JoinReply
    | LeafSetRequest
    | LeafSetReply
    | RowRequest
    | RowReply
    | Leave
    | Route
)


# --------------------------------------------------------------------------------
# Effects (what the owner of the core must do)


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to ``dst_id`` at ``dst_address`` (dialling if need be)."""

    dst_id: int
    dst_address: Address
    message: object


@dataclass(frozen=True, slots=True)
class Deliver:
    """This node is responsible for ``key``: hand ``payload`` to the application."""

    key: int
    payload: bytes
    hops: int
    origin_id: int
    origin_address: Address


@dataclass(frozen=True, slots=True)
class Intercept:
    """A ``Route`` with ``intercept`` set passes here; continue it with :meth:`PastryNode.forward`."""

    message: Route
    next_hop: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """A routed message was given up here (observability: the owner may log it)."""

    message: Route
    reason: str


PeerLossReason = Literal["silent", "left"]


@dataclass(frozen=True, slots=True)
class PeerDead:
    """A peer this node relied on is gone (it stopped answering, or said goodbye)."""

    peer_id: int
    reason: PeerLossReason


@dataclass(frozen=True, slots=True)
class Ready:
    """The node has joined the overlay (emitted once)."""


Effect = Send | Deliver | Intercept | Dropped | PeerDead | Ready

_ID_SPACE = ID_SPACE
_HALF = ID_SPACE >> 1
_DIGIT_MASK = BASE - 1
_NO_LIMIT = ID_SPACE
"""A side with room accepts any distance (every distance is below the ring size)."""


# --------------------------------------------------------------------------------
# State tables


class LeafSet:
    """The ``half`` nearest nodes on each side of ``own`` on the ring.

    Each side is a sorted list of distances from ``own`` (clockwise for the right
    side, counter-clockwise for the left). In a network of fewer than ``2*half + 1``
    nodes the two sides overlap, and the leaf set then knows the whole ring.
    The distance a newcomer must beat on each side is cached as a plain int:
    :meth:`accepts` runs for every hint and every heartbeat from a stranger.
    """

    def __init__(self, own: int, half: int) -> None:
        self.own = own
        self.half = half
        self._right = SortedList()
        self._left = SortedList()
        self._members: set[int] = set()
        self._right_limit = _NO_LIMIT
        self._left_limit = _NO_LIMIT

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._members

    def __iter__(self) -> Iterator[int]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def accepts(self, node_id: int) -> bool:
        """Would ``node_id`` be one of the nearest ``half`` on either side?"""
        own = self.own
        return (
            (
                (node_id - own) % _ID_SPACE < self._right_limit
                or (own - node_id) % _ID_SPACE < self._left_limit
            )
            and node_id != own
            and node_id not in self._members
        )

    def add(self, node_id: int) -> list[int] | None:
        """Insert ``node_id`` where it fits; None if it fits nowhere, else the evicted ids."""
        if not self.accepts(node_id):
            return None
        pushed: list[int] = []
        distance = clockwise(self.own, node_id)
        if distance < self._right_limit:
            self._right.add(distance)
            if len(self._right) > self.half:
                pushed.append(self._right_id(self._right.pop()))
        distance = clockwise(node_id, self.own)
        if distance < self._left_limit:
            self._left.add(distance)
            if len(self._left) > self.half:
                pushed.append(self._left_id(self._left.pop()))
        self._members.add(node_id)
        evicted = [p for p in pushed if not self._holds(p)]
        self._members.difference_update(evicted)
        self._update_limits()
        return evicted

    def remove(self, node_id: int) -> bool:
        if node_id not in self._members:
            return False
        self._members.discard(node_id)
        self._right.discard(clockwise(self.own, node_id))
        self._left.discard(clockwise(node_id, self.own))
        self._update_limits()
        return True

    def covers(self, key: int) -> bool:
        """Is ``key`` between the two outermost members (so a member or ``own`` owns it)?"""
        if self._right_limit == _NO_LIMIT or self._left_limit == _NO_LIMIT:
            return True  # a side is short: we know every node there is
        if len(self._members) < 2 * self.half:
            return True  # the sides overlap: this leaf set is the whole ring
        own = self.own
        return (key - own) % _ID_SPACE <= self._right_limit or (
            own - key
        ) % _ID_SPACE <= self._left_limit

    def closest(self, key: int, exclude: int | None = None) -> int:
        """The member or ``own`` responsible for ``key``, never ``exclude``.

        :func:`overlay.ids.closer` inlined: this runs on every routing step.
        """
        best = self.own
        best_distance = ring_distance(key, best)
        for node_id in self._members:
            distance = (node_id - key) % _ID_SPACE
            if distance > _HALF:
                distance = _ID_SPACE - distance
            if (
                distance < best_distance or (distance == best_distance and node_id < best)
            ) and node_id != exclude:
                best, best_distance = node_id, distance
        return best

    def right(self) -> list[int]:
        """Successors, nearest first."""
        return [self._right_id(d) for d in self._right]

    def left(self) -> list[int]:
        """Predecessors, nearest first."""
        return [self._left_id(d) for d in self._left]

    def _right_id(self, distance: int) -> int:
        return (self.own + distance) % _ID_SPACE

    def _left_id(self, distance: int) -> int:
        return (self.own - distance) % _ID_SPACE

    def _holds(self, node_id: int) -> bool:
        return (
            clockwise(self.own, node_id) in self._right
            or clockwise(node_id, self.own) in self._left
        )

    def _update_limits(self) -> None:
        half = self.half
        self._right_limit = self._right[-1] if len(self._right) >= half else _NO_LIMIT
        self._left_limit = self._left[-1] if len(self._left) >= half else _NO_LIMIT


class RoutingTable:
    """Row ``r`` holds nodes sharing ``r`` digits with ``own``, one per next digit.

    Proximity-neutral, with a twist: each slot prefers the node closest to a
    target of its own, ``own`` with digit ``r`` replaced by the slot's digit.
    Keeping whichever node came first would put the network's oldest nodes in
    almost every table (measured: one node in 888 of 1,000 tables), and each
    table entry is pinged every second. Per-node targets spread that load
    evenly (at most about four times the mean), and a slot changes only when a
    strictly better node is heard from directly, so tables still settle.
    Second-hand hints are probed only for empty slots: chasing every better
    candidate would cost more messages than the balance is worth. Rows are
    allocated when first used: a 10,000-node network needs four of the 32.
    """

    def __init__(self, own: int) -> None:
        self.own = own
        self._rows: dict[int, list[int | None]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, node_id: int) -> bool:
        if node_id == self.own:
            return False
        row = shared_prefix_digits(self.own, node_id)
        cells = self._rows.get(row)
        return cells is not None and cells[digit(node_id, row)] == node_id

    def __iter__(self) -> Iterator[int]:
        for cells in self._rows.values():
            for node_id in cells:
                if node_id is not None:
                    yield node_id

    def get(self, row: int, column: int) -> int | None:
        cells = self._rows.get(row)
        return None if cells is None else cells[column]

    def row(self, row: int) -> list[int]:
        cells = self._rows.get(row)
        return [] if cells is None else [n for n in cells if n is not None]

    def rows(self) -> dict[int, list[int]]:
        return {r: self.row(r) for r in sorted(self._rows) if self.row(r)}

    def accepts(self, node_id: int) -> bool:
        """Is the slot for ``node_id`` empty, or held by a node farther from its target?

        (:func:`shared_prefix_digits` and :func:`digit` inlined: this runs for
        every message from a stranger.)
        """
        own = self.own
        differing = own ^ node_id
        if not differing:
            return False
        row = (ID_BITS - differing.bit_length()) // DIGIT_BITS
        cells = self._rows.get(row)
        if cells is None:
            return True
        shift = ID_BITS - DIGIT_BITS * (row + 1)
        column = (node_id >> shift) & _DIGIT_MASK
        holder = cells[column]
        if holder is None:
            return True
        if holder == node_id:
            return False
        target = own ^ ((((own >> shift) & _DIGIT_MASK) ^ column) << shift)
        return closer(target, node_id, holder)

    def is_empty_for(self, node_id: int) -> bool:
        """Is the slot where ``node_id`` would go empty?"""
        if node_id == self.own:
            return False
        row = shared_prefix_digits(self.own, node_id)
        cells = self._rows.get(row)
        return cells is None or cells[digit(node_id, row)] is None

    def add(self, node_id: int) -> int | None:
        """Put ``node_id`` in its slot (the caller checked :meth:`accepts`).

        Returns the node it displaced, if any.
        """
        row = shared_prefix_digits(self.own, node_id)
        cells = self._rows.get(row)
        if cells is None:
            cells = self._rows[row] = [None] * BASE
        column = digit(node_id, row)
        displaced = cells[column]
        cells[column] = node_id
        if displaced is None:
            self._count += 1
        return displaced

    def remove(self, node_id: int) -> int | None:
        """Empty ``node_id``'s slot; returns its row, or None if it was not here."""
        if node_id not in self:
            return None
        row = shared_prefix_digits(self.own, node_id)
        self._rows[row][digit(node_id, row)] = None
        self._count -= 1
        return row


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


class PastryNode:
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

    # ----------------------------------------------------------------------------
    # Inputs

    def start(self, now: float, bootstrap: Iterable[NodeRef] = ()) -> list[Effect]:
        """Begin: alone if ``bootstrap`` is empty (a one-node overlay), else join through it."""
        if self._state != "new":
            raise RuntimeError("PastryNode.start called twice")
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
        peer = self._peers.get(src_id)
        if type(message) is Heartbeat:  # most traffic: one lookup, no detours
            return self._on_heartbeat(src_id, peer, message, now)
        if peer is not None:
            if now > peer.last_heard:  # any message shows the peer is alive (keep a grace)
                peer.last_heard = now
            peer.suspect = False
        effects: list[Effect] = []
        if isinstance(message, Route):
            self._route(message, now, effects, originated=False)
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
        return effects

    def next_deadline(self) -> float | None:
        if self._state == "new" or self._state == "left":
            return None
        return min(self._next_tick, self._wake)

    def route(
        self, key: int, payload: bytes, now: float, *, intercept: bool = False
    ) -> list[Effect]:
        """Send ``payload`` to the node responsible for ``key`` (maybe this one)."""
        if self._state == "left":
            return []
        message = Route(check_id(key), self.node_id, self.address, 0, intercept, payload)
        effects: list[Effect] = []
        self._route(message, now, effects, originated=True)
        return effects

    def forward(self, message: Route, now: float) -> list[Effect]:
        """Continue a message handed up by :class:`Intercept` (possibly with a new payload)."""
        if self._state == "left":
            return []
        effects: list[Effect] = []
        self._route(message, now, effects, originated=True)
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

    def next_hop(self, key: int) -> int | None:
        """Where a message for ``key`` goes from here; None: this node is responsible."""
        return self._next_hop(key, None)

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

    def _route(self, message: Route, now: float, effects: list[Effect], originated: bool) -> None:
        nxt = self._next_hop(message.key, None)
        if nxt is None:
            effects.append(
                Deliver(
                    message.key,
                    message.payload,
                    message.hops,
                    message.origin_id,
                    message.origin_address,
                )
            )
        elif message.intercept and not originated:
            effects.append(Intercept(message, nxt))
        elif message.hops >= self.config.max_hops:
            effects.append(Dropped(message, "hop limit"))
        else:
            forwarded = Route(
                message.key,
                message.origin_id,
                message.origin_address,
                message.hops + 1,
                message.intercept,
                message.payload,
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
