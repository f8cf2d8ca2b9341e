"""One node's view of one Scribe tree: its parent, its children, what it has delivered."""

from __future__ import annotations

import math

from overlay.ids import ring_distance
from overlay.pastry import Address

ANYCAST_TO_PARENT = -1
"""The option "send it up" among an anycast's choices (ids are never negative)."""
ANYCAST_HERE = -2
"""The option "this node's own members"."""
ANYCAST_FROM_PARENT = -3
"""An anycast that came down from the parent (as a way in, for the tallies)."""


class Child:
    __slots__ = ("address", "heard", "members", "redirected", "subtree")

    def __init__(
        self,
        address: Address,
        heard: float,
        subtree: float,
        members: int,
        redirected: bool = False,
    ) -> None:
        self.address = address
        self.heard = heard
        self.subtree = subtree
        """Capacity of the member nodes in the child's subtree, as it last reported..."""
        self.members = members
        """...and how many member nodes that subtree holds."""
        self.redirected = redirected
        """It came because our parent pushed it down, not because its route led here."""


class Group:
    """Tree state for one group key at one node.

    A node is *in* the tree while it has local members (``member``) or children;
    it then has a parent, or is the root, or is looking for a parent (``joining``).
    """

    __slots__ = (
        "avoid",
        "avoid_until",
        "capacity",
        "children",
        "credits",
        "depth",
        "joining",
        "key",
        "member",
        "outside",
        "outside_members",
        "parent",
        "parent_address",
        "parent_heard",
        "reported_members",
        "reported_outside",
        "reported_subtree",
        "root",
        "seen",
        "subscribed_at",
    )

    def __init__(self, key: int) -> None:
        self.key = key
        self.member = False
        self.capacity = 0.0
        """This node's own capacity for anycasts (meaningful while ``member``)."""
        self.parent: int | None = None
        self.parent_address = b""
        self.parent_heard = -math.inf
        self.root = False
        self.joining = False
        self.subscribed_at = -math.inf
        self.avoid: int | None = None
        """A parent given up as dead: routes around it until Pastry agrees..."""
        self.avoid_until = -math.inf
        """...or until then, in case it was only slow."""
        self.depth = 0
        self.outside = 0.0
        """Capacity of the tree outside this node's subtree, as the parent last said..."""
        self.outside_members = 0
        """...and the member nodes out there."""
        self.children: dict[int, Child] = {}
        self.credits: dict[int | None, dict[int, float]] = {}
        """Smooth weighted round robin state for anycast choices: per way an anycast
        came in (None: it started here; a child; :data:`ANYCAST_FROM_PARENT`), by option."""
        self.seen: dict[tuple[int, int], tuple[int, float]] = {}
        """(origin, incarnation) -> (highest multicast seq delivered, when)."""
        self.reported_subtree = 0.0
        self.reported_members = 0
        """The subtree capacity and member nodes last sent to the parent."""
        self.reported_outside: dict[int, tuple[float, int]] = {}
        """The outside capacity and member nodes last sent to each child."""

    @property
    def in_tree(self) -> bool:
        return self.member or bool(self.children)

    @property
    def own_capacity(self) -> float:
        return self.capacity if self.member else 0.0

    def subtree(self) -> float:
        """Capacity of this node and everything below it."""
        return self.own_capacity + sum(child.subtree for child in self.children.values())

    def subtree_members(self) -> int:
        """Member nodes in this node's subtree, this one included."""
        return int(self.member) + sum(child.members for child in self.children.values())

    def others(self) -> int:
        """Member nodes in the whole tree but this one, as far as reports say."""
        return self.outside_members + self.subtree_members() - int(self.member)

    # -- decisions about this tree (the core turns them into messages) ---------------------

    def push_down(self, limit: int) -> list[tuple[int, Child, int]]:
        """Too many children: keep the ``limit`` nearest the key, spread the rest over them.

        Returns (pushed child, its record, the kept child it goes under), the pushed
        ones already removed. Which children stay depends only on who they are, never
        on who came first; a pushed child goes under a kept one picked by its id (ids
        are uniform), so the excess spreads evenly and trees stay shallow.
        """
        if len(self.children) <= limit:
            return []
        key = self.key
        ranked = sorted(self.children, key=lambda c: (ring_distance(c, key), c))
        kept, pushed = ranked[:limit], ranked[limit:]
        moves = []
        for child_id in pushed:
            moves.append((child_id, self.drop(child_id), kept[child_id % limit]))
        return moves

    def drop(self, child_id: int) -> Child:
        """Forget a child (its tally as a way in goes; as an option it goes stale)."""
        self.credits.pop(child_id, None)
        self.reported_outside.pop(child_id, None)
        return self.children.pop(child_id)

    def report_up(self, *, always: bool = False) -> tuple[float, int] | None:
        """The subtree's (capacity, member nodes) for the parent, if it must hear it now."""
        subtree, members = self.subtree(), self.subtree_members()
        if (
            always
            or material_change(self.reported_subtree, subtree)
            or (members != self.reported_members)
        ):
            self.reported_subtree, self.reported_members = subtree, members
            return subtree, members
        return None

    def reports_down(self, *, always: bool = False) -> list[tuple[int, Child, float, int]]:
        """Per child that must hear it now: (id, record, capacity and member nodes outside it)."""
        if not self.children:
            return []
        total = self.outside + self.subtree()
        total_members = self.outside_members + self.subtree_members()
        reported = self.reported_outside
        reports = []
        for child_id, child in self.children.items():
            outside, members = total - child.subtree, total_members - child.members
            last, last_members = reported.get(child_id, (0.0, 0))
            if always or material_change(last, outside) or members != last_members:
                reported[child_id] = (outside, members)
                reports.append((child_id, child, outside, members))
        return reports

    def first_time(self, origin: int, incarnation: int, seq: int, now: float) -> bool:
        """Is this multicast new here (not a copy, nor older than one delivered)?"""
        sender = (origin, incarnation)
        last = self.seen.get(sender)
        if last is not None and seq <= last[0]:
            return False
        self.seen[sender] = (seq, now)
        return True

    def forget_quiet_senders(self, horizon: float) -> None:
        seen = self.seen
        for sender in [s for s, (_, at) in seen.items() if at < horizon]:
            del seen[sender]

    def anycast_options(self, came_from: int | None, down: bool) -> dict[int, float]:
        """Where an anycast may go from here, each way weighted by its capacity."""
        options: dict[int, float] = {}
        if self.member and self.capacity > 0.0:
            options[ANYCAST_HERE] = self.capacity
        for child_id, child in self.children.items():
            if child_id != came_from and child.subtree > 0.0:
                options[child_id] = child.subtree
        parent = self.parent
        if not down and parent is not None and came_from != parent and self.outside > 0.0:
            options[ANYCAST_TO_PARENT] = self.outside
        return options

    def choose(self, came_from: int | None, options: dict[int, float]) -> int:
        """Smooth weighted round robin: each option in proportion to its weight.

        Deterministic, and at most one pick away from the exact proportion at any
        time, so even a few anycasts spread evenly. Anycasts that came in different
        ways have different options, so each way keeps its own tally.
        """
        credits = self.credits.setdefault(came_from, {})
        if len(credits) != len(options) or not credits.keys() <= options.keys():
            for stale in [option for option in credits if option not in options]:
                del credits[stale]
        total = 0.0
        best = ANYCAST_HERE
        best_credit = -math.inf
        for option, weight in options.items():
            credit = credits.get(option, 0.0) + weight
            credits[option] = credit
            total += weight
            if credit > best_credit:
                best, best_credit = option, credit
        credits[best] -= total
        return best


def material_change(old: float, new: float) -> bool:
    """Worth telling a neighbour now rather than at the next beat?

    A node that gains or loses all capacity, or whose capacity moves by more
    than half, matters to anycast choices at once; smaller drifts wait.
    """
    if (old == 0.0) != (new == 0.0):
        return True
    return abs(new - old) > 0.5 * max(old, new)
