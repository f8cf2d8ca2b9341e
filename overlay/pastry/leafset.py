"""Pastry's leaf set: the nearest nodes on each side of this one on the ring."""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from overlay.ids import ID_SPACE, clockwise, ring_distance

_ID_SPACE = ID_SPACE
_HALF = ID_SPACE >> 1
_NO_LIMIT = ID_SPACE
"""A side with room accepts any distance (every distance is below the ring size)."""


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
