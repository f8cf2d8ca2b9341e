"""Pastry's routing table: per row, one node for each next digit."""

from __future__ import annotations

from collections.abc import Iterator

from overlay.ids import BASE, DIGIT_BITS, ID_BITS, closer, digit, shared_prefix_digits

_DIGIT_MASK = BASE - 1


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
