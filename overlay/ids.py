"""Node ids and keys: 128-bit integers on a ring, read as 32 base-16 digits.

Ids are plain ``int`` in ``[0, 2**128)``: cheap to compare, hash and do arithmetic
on, which is what Pastry does all day. Everything that decides *which node is
responsible for a key* goes through :func:`closer`, so that every node, the
simulation's oracle and the tests agree on one deterministic order, ties included.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

ID_BITS = 128
DIGIT_BITS = 4
BASE = 1 << DIGIT_BITS
ID_DIGITS = ID_BITS // DIGIT_BITS
ID_SPACE = 1 << ID_BITS
ID_BYTES = ID_BITS // 8
_HALF = ID_SPACE >> 1
_DIGIT_MASK = BASE - 1
_HEX = frozenset("0123456789abcdefABCDEF")


def check_id(node_id: int) -> int:
    """Return ``node_id`` if it is a valid id; a ValueError otherwise (a caller's bug)."""
    if not 0 <= node_id < ID_SPACE:
        raise ValueError(f"id out of range: {node_id}")
    return node_id


def digit(node_id: int, row: int) -> int:
    """The ``row``-th base-16 digit of ``node_id``, most significant first."""
    return (node_id >> (ID_BITS - DIGIT_BITS * (row + 1))) & _DIGIT_MASK


def shared_prefix_digits(a: int, b: int) -> int:
    """How many leading base-16 digits ``a`` and ``b`` have in common (32 if equal)."""
    return (ID_BITS - (a ^ b).bit_length()) // DIGIT_BITS


def clockwise(a: int, b: int) -> int:
    """Distance travelled going up the ring from ``a`` to ``b``."""
    return (b - a) % ID_SPACE


def ring_distance(a: int, b: int) -> int:
    """Shortest distance between ``a`` and ``b`` around the ring (at most 2**127)."""
    d = (b - a) % ID_SPACE
    return d if d <= _HALF else ID_SPACE - d


def closer(key: int, a: int, b: int) -> bool:
    """True if ``a`` is strictly closer to ``key`` than ``b``.

    Closer means the smaller ring distance; at equal distance (``key`` exactly
    half-way) the smaller id wins, so "the node responsible for a key" is always
    exactly one node.
    """
    da = ring_distance(key, a)
    db = ring_distance(key, b)
    return da < db or (da == db and a < b)


def closest(key: int, ids: Iterable[int]) -> int:
    """The id in ``ids`` responsible for ``key`` under :func:`closer` (ids must be non-empty)."""
    it = iter(ids)
    best = next(it)
    for candidate in it:
        if closer(key, candidate, best):
            best = candidate
    return best


def key_for(kind: str, name: str) -> int:
    """The key of a named thing: BLAKE2b-128 of ``"<kind>:<name>"``.

    ``kind`` (``"cluster"``, ``"topic"``) keeps namespaces apart, so a cluster and a
    topic of the same name land on different nodes. It may not contain ``:``, which
    would make two different (kind, name) pairs hash the same text. Names are
    encoded as UTF-8 with ``surrogateescape``, so the relay's byte-exact names map
    to one key each.
    """
    if ":" in kind or not kind:
        raise ValueError(f"invalid key kind: {kind!r}")
    text = f"{kind}:{name}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(text, digest_size=ID_BYTES).digest(), "big")


def random_id(rng: random.Random) -> int:
    """A uniformly random id drawn from the injected ``rng``."""
    return rng.getrandbits(ID_BITS)


def id_to_bytes(node_id: int) -> bytes:
    """The 16-byte big-endian form used on the wire."""
    return node_id.to_bytes(ID_BYTES, "big")


def id_from_bytes(data: bytes) -> int:
    if len(data) != ID_BYTES:
        raise ValueError(f"an id is {ID_BYTES} bytes, not {len(data)}")
    return int.from_bytes(data, "big")


def format_id(node_id: int) -> str:
    """32 lowercase hex digits: one character per routing digit."""
    return f"{check_id(node_id):032x}"


def short_id(node_id: int) -> str:
    """The first 8 hex digits, for logs and test output."""
    return format_id(node_id)[:8]


def parse_id(text: str) -> int:
    """Inverse of :func:`format_id` (exactly 32 hex digits)."""
    if len(text) != ID_DIGITS or not _HEX.issuperset(text):
        raise ValueError(f"an id is {ID_DIGITS} hex digits: {text!r}")
    return int(text, 16)
