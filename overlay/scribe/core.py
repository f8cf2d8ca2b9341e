"""The Scribe state machine: :class:`ScribeCore` (the rules are in :mod:`overlay.scribe`)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from overlay.pastry import Address, Deliver, Intercept, LeafSetChanged, PeerDead, Route, Send
from overlay.scribe.group import (
    ANYCAST_FROM_PARENT,
    ANYCAST_HERE,
    ANYCAST_TO_PARENT,
    Child,
    Group,
)
from overlay.scribe.messages import (
    BEAT_ENTRIES,
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
from overlay.stack import Forward, Received, RouteTo, Upcall


@dataclass(frozen=True, slots=True)
class ScribeConfig:
    """Tunables; the defaults repair a tree within a few seconds of a failure."""

    beat_interval: float = 0.5
    """Parents and children tell each other they are alive (and their capacities)."""
    parent_timeout: float = 1.6
    """A parent silent this long is given up: re-subscribe around it."""
    child_timeout: float = 2.1
    subscribe_retry: float = 1.0
    """An unanswered subscription is sent again after this long."""
    avoid_for: float = 5.0
    """How long a parent given up as dead is routed around (Pastry notices by then)."""
    max_children: int = 16
    """Children per node per tree; more are pushed down to a child."""
    max_depth: int = 48
    """A deeper tree is a loop: the node leaves its parent and joins again."""
    max_groups: int = 65536
    """Trees one node takes part in; subscriptions beyond are ignored (and counted)."""
    seen_ttl: float = 60.0
    """How long a sender's last multicast number is remembered after it goes quiet."""

    def __post_init__(self) -> None:
        if not 0 < self.beat_interval < self.parent_timeout:
            raise ValueError("need 0 < beat_interval < parent_timeout")
        if not self.beat_interval < self.child_timeout:
            raise ValueError("need beat_interval < child_timeout")
        if self.max_children < 2:
            raise ValueError("max_children must be at least 2")


# --------------------------------------------------------------------------------
# Effects for the layer above (the node's messaging)


@dataclass(frozen=True, slots=True)
class GroupDelivered:
    """A multicast to ``group`` for this node's members (once per multicast)."""

    group: int
    origin: int
    payload: object


@dataclass(frozen=True, slots=True)
class AnycastDelivered:
    """An anycast to ``group`` chose this node's members."""

    group: int
    origin: int
    origin_address: Address
    tag: int
    payload: object


@dataclass(frozen=True, slots=True)
class AnycastFailed:
    """This node's anycast ``tag`` to ``group`` found no member node."""

    group: int
    tag: int


class Router(Protocol):
    """What Scribe asks of Pastry: where a key goes (None: this node owns it)."""

    def next_hop(self, key: int, avoid: int | None = None) -> int | None: ...


class ScribeCore:
    """One node's Scribe trees (an :class:`~overlay.stack.UpperLayer`)."""

    messages = (
        Subscribe,
        SubscribeAck,
        Redirect,
        Unsubscribe,
        ParentBeat,
        ChildBeat,
        Multicast,
        Anycast,
        AnycastFailure,
    )
    consumes = ()

    def __init__(
        self,
        node_id: int,
        address: Address,
        router: Router,
        rng: random.Random,
        config: ScribeConfig | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.config = config if config is not None else ScribeConfig()
        self._router = router
        self._rng = rng
        self.incarnation = rng.getrandbits(32)
        """Names this run of the node, so a restart's multicast numbers are new ones."""
        self._seq = 0
        self._groups: dict[int, Group] = {}
        self._next_tick = math.inf
        self._next_sweep = math.inf
        self.stats: dict[str, int] = {
            "duplicates": 0,
            "no_tree": 0,
            "anycast_failed": 0,
            "redirects": 0,
            "groups_refused": 0,
        }
        """Counts of what was dropped or worked around, by reason."""

    # ----------------------------------------------------------------------------
    # What the layer above asks

    def join(self, key: int, now: float, capacity: float = 1.0) -> list[object]:
        """This node has members of group ``key`` (with ``capacity`` for anycasts)."""
        effects: list[object] = []
        group = self._group(key, now)
        if group is None:
            return effects
        group.member = True
        group.capacity = capacity
        if group.root or group.parent is not None or group.joining:
            self._report(group, effects)
        else:
            self._attach(group, now, effects)
        return effects

    def leave(self, key: int, now: float) -> list[object]:
        """This node has no members of group ``key`` any more."""
        effects: list[object] = []
        group = self._groups.get(key)
        if group is None or not group.member:
            return effects
        group.member = False
        group.capacity = 0.0
        if not self._prune(group, effects):
            self._report(group, effects)
        return effects

    def set_capacity(self, key: int, capacity: float, now: float) -> list[object]:
        """This node's members of ``key`` can take about ``capacity`` (relative) work."""
        effects: list[object] = []
        group = self._groups.get(key)
        if group is not None and group.member:
            group.capacity = capacity
            self._report(group, effects)
        return effects

    def multicast(self, key: int, payload: object, now: float) -> list[object]:
        """Deliver ``payload`` once to every member node of group ``key``."""
        self._seq += 1
        return [RouteTo(key, Multicast(key, self.node_id, self.incarnation, self._seq, payload))]

    def anycast(self, key: int, payload: object, tag: int, now: float) -> list[object]:
        """Deliver ``payload`` to one member node of ``key``, by capacity (maybe this one)."""
        message = Anycast(key, self.node_id, self.address, tag, False, payload)
        group = self._groups.get(key)
        if group is not None:
            return self._walk(group, message, None)
        return [RouteTo(key, message, intercept=True)]

    # ----------------------------------------------------------------------------
    # The port (overlay.stack.UpperLayer)

    def upcall(self, event: Upcall, now: float) -> Sequence[object]:
        kind = type(event)
        if kind is Received:
            assert isinstance(event, Received)
            return self._received(event.src_id, event.message, now)
        if kind is Deliver:
            assert isinstance(event, Deliver)
            return self._delivered(event.route, now)
        if kind is Intercept:
            assert isinstance(event, Intercept)
            return self._intercepted(event.route, now)
        if kind is PeerDead:
            assert isinstance(event, PeerDead)
            return self._peer_dead(event.peer_id, now)
        if kind is LeafSetChanged:
            return self._leaf_set_changed(now)
        return ()

    def consume(self, effect: object, now: float) -> Sequence[object]:
        return ()

    def next_deadline(self) -> float | None:
        return self._next_tick if self._groups else None

    def on_timer(self, now: float) -> list[object]:
        """Beats, timeouts, retries: once per ``beat_interval`` while in any tree."""
        effects: list[object] = []
        if now < self._next_tick:
            return effects
        config = self.config
        self._next_tick = now + config.beat_interval
        to_parents: dict[int, tuple[Address, list[tuple[int, float, int]]]] = {}
        to_children: dict[int, tuple[Address, list[tuple[int, int, float, int]]]] = {}
        for group in list(self._groups.values()):
            self._check(group, now, effects)
            if group.key not in self._groups:
                continue  # pruned
            if group.parent is not None:
                report = group.report_up(always=True)
                assert report is not None
                entry = (group.key, *report)
                to_parents.setdefault(group.parent, (group.parent_address, []))[1].append(entry)
            for child_id, child, outside, members in group.reports_down(always=True):
                beat = (group.key, group.depth, outside, members)
                to_children.setdefault(child_id, (child.address, []))[1].append(beat)
        for peer, (address, ups) in to_parents.items():
            for start in range(0, len(ups), BEAT_ENTRIES):
                chunk = tuple(ups[start : start + BEAT_ENTRIES])
                effects.append(Send(peer, address, ChildBeat(self.address, chunk)))
        for peer, (address, downs) in to_children.items():
            for start in range(0, len(downs), BEAT_ENTRIES):
                chunk3 = tuple(downs[start : start + BEAT_ENTRIES])
                effects.append(Send(peer, address, ParentBeat(self.address, chunk3)))
        if now >= self._next_sweep:
            self._next_sweep = now + config.seen_ttl / 4
            for group in self._groups.values():
                group.forget_quiet_senders(now - config.seen_ttl)
        return effects

    # ----------------------------------------------------------------------------
    # Queries

    def group(self, key: int) -> Group | None:
        return self._groups.get(key)

    @property
    def groups(self) -> dict[int, Group]:
        return self._groups

    def state_sizes(self) -> dict[str, int]:
        """Sizes of every table this node keeps (all bounded)."""
        groups = self._groups.values()
        return {
            "groups": len(self._groups),
            "children": sum(len(g.children) for g in groups),
            "max_children": max((len(g.children) for g in groups), default=0),
            "senders": sum(len(g.seen) for g in groups),
        }

    # ----------------------------------------------------------------------------
    # Inputs from Pastry

    def _delivered(self, route: Route, now: float) -> list[object]:
        """This node owns the key: it is (or becomes) the root of the group's tree."""
        message = route.message
        effects: list[object] = []
        if type(message) is Subscribe:
            self._subscribe(message, route.origin_id, now, effects, at_root=True)
        elif type(message) is Multicast:
            group = self._groups.get(message.group)
            if group is None:
                self.stats["no_tree"] += 1
            else:
                self._make_root(group, effects)
                self._disseminate(group, message, None, now, effects)
        elif type(message) is Anycast:
            group = self._groups.get(message.group)
            if group is None:
                effects += self._fail(message)
            else:
                effects += self._walk(group, message, None)
        return effects

    def _intercepted(self, route: Route, now: float) -> list[object]:
        """A subscription or anycast passes: take it if this node is in the tree."""
        message = route.message
        effects: list[object] = []
        if type(message) is Subscribe:
            group = self._groups.get(message.group)
            if group is not None and group.parent == route.origin_id:
                return [Forward(route)]  # our own parent: never make it our child
            self._subscribe(message, route.origin_id, now, effects, at_root=False)
        elif type(message) is Anycast and message.group in self._groups:
            effects += self._walk(self._groups[message.group], message, None)
        else:
            effects.append(Forward(route))
        return effects

    def _received(self, src: int, message: object, now: float) -> list[object]:
        effects: list[object] = []
        kind = type(message)
        if kind is Multicast:
            assert isinstance(message, Multicast)
            group = self._groups.get(message.group)
            if group is None:
                self.stats["no_tree"] += 1
            else:
                self._disseminate(group, message, src, now, effects)
        elif kind is Anycast:
            assert isinstance(message, Anycast)
            group = self._groups.get(message.group)
            effects += self._fail(message) if group is None else self._walk(group, message, src)
        elif kind is ParentBeat:
            assert isinstance(message, ParentBeat)
            self._parent_beat(src, message, now, effects)
        elif kind is ChildBeat:
            assert isinstance(message, ChildBeat)
            self._child_beat(src, message, now, effects)
        elif kind is Subscribe:
            assert isinstance(message, Subscribe)
            group = self._groups.get(message.group)
            if group is None or group.parent != src:
                self._subscribe(message, src, now, effects, at_root=False, redirected=True)
        elif kind is SubscribeAck:
            assert isinstance(message, SubscribeAck)
            self._acknowledged(src, message, now, effects)
        elif kind is Redirect:
            assert isinstance(message, Redirect)
            self._redirected(src, message, now, effects)
        elif kind is Unsubscribe:
            assert isinstance(message, Unsubscribe)
            self._unsubscribed(src, message, now, effects)
        elif kind is AnycastFailure:
            assert isinstance(message, AnycastFailure)
            effects.append(AnycastFailed(message.group, message.tag))
        return effects

    def _peer_dead(self, peer: int, now: float) -> list[object]:
        """Pastry gave up on ``peer``: whatever tree edges it held go with it."""
        effects: list[object] = []
        for group in list(self._groups.values()):
            if group.parent == peer:
                self._orphan(group, now, effects, avoid=peer)
            elif peer in group.children:
                self._drop_child(group, peer, effects)
        return effects

    def _leaf_set_changed(self, now: float) -> list[object]:
        """Keys may have moved: a node that now owns a group key becomes its root,
        and a root that no longer does joins the new root's tree."""
        effects: list[object] = []
        router = self._router
        for group in list(self._groups.values()):
            owner_here = router.next_hop(group.key, group.avoid) is None
            if owner_here and not group.root:
                self._make_root(group, effects)
            elif group.root and not owner_here:
                group.root = False
                self._attach(group, now, effects)
        return effects

    # ----------------------------------------------------------------------------
    # Tree building

    def _group(self, key: int, now: float) -> Group | None:
        group = self._groups.get(key)
        if group is not None:
            return group
        if len(self._groups) >= self.config.max_groups:
            self.stats["groups_refused"] += 1
            return None
        if not self._groups:
            self._next_tick = now + self.config.beat_interval * self._rng.random()
            self._next_sweep = now + self.config.seen_ttl / 4
        group = self._groups[key] = Group(key)
        return group

    def _attach(
        self, group: Group, now: float, effects: list[object], avoid: int | None = None
    ) -> None:
        """Find a parent by routing towards the key (or be the root if we own it)."""
        if avoid is not None:
            group.avoid = avoid
            group.avoid_until = now + self.config.avoid_for
        if self._router.next_hop(group.key, group.avoid) is None:
            self._make_root(group, effects)
            return
        group.joining = True
        group.subscribed_at = now
        subscribe = Subscribe(group.key, self.address, group.subtree(), group.subtree_members())
        effects.append(RouteTo(group.key, subscribe, intercept=True, avoid=group.avoid))

    def _make_root(self, group: Group, effects: list[object]) -> None:
        if group.parent is not None:
            effects.append(Send(group.parent, group.parent_address, Unsubscribe(group.key)))
            group.parent = None
        if not group.root:
            group.root = True
            group.joining = False
            group.depth = 0
            group.outside = 0.0
            group.outside_members = 0
            self._report(group, effects)

    def _orphan(self, group: Group, now: float, effects: list[object], avoid: int | None) -> None:
        """Our parent is gone: join again, around it."""
        group.parent = None
        group.root = False
        group.outside = 0.0
        group.outside_members = 0
        self._attach(group, now, effects, avoid)

    def _subscribe(
        self,
        message: Subscribe,
        child_id: int,
        now: float,
        effects: list[object],
        *,
        at_root: bool,
        redirected: bool = False,
    ) -> None:
        """``child_id`` wants to be our child; ``at_root``: Pastry says we own the key;
        ``redirected``: it came straight here because our parent pushed it down."""
        key = message.group
        if child_id == self.node_id:
            group = self._groups.get(key)  # our own subscription came back: we own the key
            if group is not None:
                self._make_root(group, effects)
            return
        group = self._group(key, now)
        if group is None:
            return
        if at_root:
            self._make_root(group, effects)
        elif group.parent == child_id:
            return  # a loop in the making: the sender will try again elsewhere
        group.children[child_id] = Child(
            message.address, now, message.capacity, message.members, redirected
        )
        if child_id not in self._push_down(group, effects):
            ack = SubscribeAck(key, self.address, group.depth)
            effects.append(Send(child_id, message.address, ack))
        if not (group.root or group.parent is not None or group.joining):
            self._attach(group, now, effects)
        self._report(group, effects)

    def _push_down(self, group: Group, effects: list[object]) -> set[int]:
        """Redirect the children beyond the fan-out limit (see :meth:`Group.push_down`)."""
        moves = group.push_down(self.config.max_children)
        for child_id, child, target in moves:
            redirect = Redirect(group.key, target, group.children[target].address)
            effects.append(Send(child_id, child.address, redirect))
            self.stats["redirects"] += 1
        return {child_id for child_id, _, _ in moves}

    def _acknowledged(
        self, parent: int, message: SubscribeAck, now: float, effects: list[object]
    ) -> None:
        group = self._groups.get(message.group)
        if (
            group is None
            or group.root
            or (group.parent is not None and group.parent != parent)
            or parent in group.children
        ):
            # Not wanted (any more), or a second parent, or our own child: undo it.
            effects.append(Send(parent, message.address, Unsubscribe(message.group)))
            return
        group.parent = parent
        group.parent_address = message.address
        group.parent_heard = now
        group.depth = message.depth + 1
        group.joining = False
        group.avoid = None
        group.reported_subtree = group.subtree()
        group.reported_members = group.subtree_members()
        self._report(group, effects)

    def _redirected(self, src: int, message: Redirect, now: float, effects: list[object]) -> None:
        group = self._groups.get(message.group)
        if group is None or not (group.joining or group.parent == src):
            return
        # Children our parent pushed down to us go back to it: it places them again
        # with the children it keeps now, so where they end up does not depend on
        # who came first.
        if group.parent == src:
            for child_id in [c for c, child in group.children.items() if child.redirected]:
                child = group.drop(child_id)
                back = Redirect(group.key, src, group.parent_address)
                effects.append(Send(child_id, child.address, back))
        group.parent = None
        if message.to_id == self.node_id:
            self._attach(group, now, effects)
            return
        group.joining = True
        group.subscribed_at = now
        subscribe = Subscribe(group.key, self.address, group.subtree(), group.subtree_members())
        effects.append(Send(message.to_id, message.to_address, subscribe))

    def _unsubscribed(
        self, src: int, message: Unsubscribe, now: float, effects: list[object]
    ) -> None:
        group = self._groups.get(message.group)
        if group is None:
            return
        if src in group.children:
            self._drop_child(group, src, effects)
        elif group.parent == src:
            self._orphan(group, now, effects, avoid=src)  # it is leaving: go around it

    def _drop_child(self, group: Group, child_id: int, effects: list[object]) -> None:
        group.drop(child_id)
        if not self._prune(group, effects):
            self._report(group, effects)

    def _prune(self, group: Group, effects: list[object]) -> bool:
        """Leave a tree this node no longer needs (no members, no children)."""
        if group.in_tree:
            return False
        if group.parent is not None:
            effects.append(Send(group.parent, group.parent_address, Unsubscribe(group.key)))
        del self._groups[group.key]
        return True

    # ----------------------------------------------------------------------------
    # Beats and capacity reports

    def _parent_beat(self, src: int, beat: ParentBeat, now: float, effects: list[object]) -> None:
        for key, depth, outside, outside_members in beat.entries:
            group = self._groups.get(key)
            if group is not None and group.parent is None and group.joining and not group.root:
                # Its acknowledgement was lost on the way: this beat is as good.
                group.parent = src
                group.parent_address = beat.address
                group.joining = False
                group.avoid = None
            if group is None or group.parent != src:
                effects.append(Send(src, beat.address, Unsubscribe(key)))
                continue
            group.parent_heard = now
            group.parent_address = beat.address
            group.depth = depth + 1
            if group.depth > self.config.max_depth:
                effects.append(Send(src, beat.address, Unsubscribe(key)))
                self._orphan(group, now, effects, avoid=src)  # a loop: start over
                continue
            if group.outside != outside or group.outside_members != outside_members:
                group.outside, group.outside_members = outside, outside_members
                self._report_down(group, effects)

    def _child_beat(self, src: int, beat: ChildBeat, now: float, effects: list[object]) -> None:
        for key, subtree, members in beat.entries:
            group = self._groups.get(key)
            child = None if group is None else group.children.get(src)
            if group is None or child is None:
                # It believes it is our child (we timed it out, or we restarted): take it.
                self._subscribe(
                    Subscribe(key, beat.address, subtree, members), src, now, effects, at_root=False
                )
                continue
            child.heard = now
            child.address = beat.address
            if child.subtree != subtree or child.members != members:
                child.subtree, child.members = subtree, members
                self._report(group, effects)

    def _report(self, group: Group, effects: list[object]) -> None:
        """Tell the parent and the children about a change that matters now."""
        parent = group.parent
        report = group.report_up() if parent is not None else None
        if parent is not None and report is not None:
            beat = ChildBeat(self.address, ((group.key, *report),))
            effects.append(Send(parent, group.parent_address, beat))
        self._report_down(group, effects)

    def _report_down(self, group: Group, effects: list[object]) -> None:
        for child_id, child, outside, members in group.reports_down():
            beat = ParentBeat(self.address, ((group.key, group.depth, outside, members),))
            effects.append(Send(child_id, child.address, beat))

    def _check(self, group: Group, now: float, effects: list[object]) -> None:
        """Timeouts and retries of one tree, once per beat."""
        config = self.config
        if group.avoid is not None and now >= group.avoid_until:
            group.avoid = None
        if group.parent is not None and now - group.parent_heard > config.parent_timeout:
            self._orphan(group, now, effects, avoid=group.parent)
        silent = [
            c for c, child in group.children.items() if now - child.heard > config.child_timeout
        ]
        for child_id in silent:
            self._drop_child(group, child_id, effects)
            if group.key not in self._groups:
                return
        if group.joining and now - group.subscribed_at >= config.subscribe_retry:
            self._attach(group, now, effects)
        elif group.root and self._router.next_hop(group.key, group.avoid) is not None:
            group.root = False  # a key that moved without a leaf-set change we saw
            self._attach(group, now, effects)

    # ----------------------------------------------------------------------------
    # Multicast and anycast

    def _disseminate(
        self, group: Group, message: Multicast, src: int | None, now: float, effects: list[object]
    ) -> None:
        """Deliver once here and pass it down, unless it was seen before."""
        if not group.first_time(message.origin, message.incarnation, message.seq, now):
            self.stats["duplicates"] += 1
            return
        for child_id, child in group.children.items():
            if child_id != src:
                effects.append(Send(child_id, child.address, message))
        if group.member:
            effects.append(GroupDelivered(group.key, message.origin, message.payload))

    def _walk(self, group: Group, message: Anycast, came_from: int | None) -> list[object]:
        """Take one step of an anycast: here, down a subtree, or up, by capacity."""
        options = group.anycast_options(came_from, message.down)
        if not options:
            return self._fail(message)
        choice = group.choose(ANYCAST_FROM_PARENT if message.down else came_from, options)
        if choice == ANYCAST_HERE:
            return [
                AnycastDelivered(
                    group.key, message.origin, message.origin_address, message.tag, message.payload
                )
            ]
        if choice == ANYCAST_TO_PARENT:
            assert group.parent is not None
            return [Send(group.parent, group.parent_address, message)]
        child = group.children[choice]
        return [Send(choice, child.address, replace(message, down=True))]

    def _fail(self, message: Anycast) -> list[object]:
        self.stats["anycast_failed"] += 1
        if message.origin == self.node_id:
            return [AnycastFailed(message.group, message.tag)]
        failure = AnycastFailure(message.group, message.tag)
        return [Send(message.origin, message.origin_address, failure)]
