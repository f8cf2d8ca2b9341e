"""Id math: digits, prefixes, ring distance and the one tie-break every node shares."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.ids import (
    ID_DIGITS,
    ID_SPACE,
    closer,
    closest,
    digit,
    format_id,
    id_from_bytes,
    id_to_bytes,
    key_for,
    parse_id,
    random_id,
    ring_distance,
    shared_prefix_digits,
    short_id,
)

ids = st.integers(min_value=0, max_value=ID_SPACE - 1)


@given(ids)
def test_digits_spell_the_id_most_significant_first(node_id: int) -> None:
    text = format_id(node_id)
    assert [digit(node_id, row) for row in range(ID_DIGITS)] == [int(c, 16) for c in text]


@given(ids, ids)
def test_shared_prefix_counts_equal_leading_digits(a: int, b: int) -> None:
    expected = 0
    while expected < ID_DIGITS and digit(a, expected) == digit(b, expected):
        expected += 1
    assert shared_prefix_digits(a, b) == expected


@given(ids, st.integers(min_value=0, max_value=ID_DIGITS - 1), st.integers(0, 15))
def test_changing_one_digit_cuts_the_prefix_there(node_id: int, row: int, value: int) -> None:
    shift = 4 * (ID_DIGITS - 1 - row)
    other = (node_id & ~(0xF << shift)) | (value << shift)
    expected = ID_DIGITS if other == node_id else row
    assert shared_prefix_digits(node_id, other) == expected


@given(ids, ids, ids)
def test_ring_distance_is_a_metric_on_the_circle(a: int, b: int, c: int) -> None:
    assert ring_distance(a, b) == ring_distance(b, a)
    assert 0 <= ring_distance(a, b) <= ID_SPACE // 2
    assert (ring_distance(a, b) == 0) == (a == b)
    assert ring_distance(a, c) <= ring_distance(a, b) + ring_distance(b, c)


def test_ring_distance_wraps_around() -> None:
    assert ring_distance(0, ID_SPACE - 1) == 1
    assert ring_distance(5, ID_SPACE - 5) == 10
    assert ring_distance(0, ID_SPACE // 2) == ID_SPACE // 2


@given(ids, ids, ids)
def test_closer_is_a_strict_total_order_for_each_key(key: int, a: int, b: int) -> None:
    assert not closer(key, a, a)
    if a != b:
        assert closer(key, a, b) != closer(key, b, a)


def test_a_key_exactly_half_way_goes_to_the_smaller_id() -> None:
    assert closer(10, 8, 12) and not closer(10, 12, 8)
    # Across zero: 1 and 2**128 - 1 are both at distance 1 from 0.
    assert closest(0, [ID_SPACE - 1, 1]) == 1


@given(ids, st.lists(ids, min_size=1, max_size=20))
def test_closest_minimises_distance_then_id(key: int, candidates: list[int]) -> None:
    expected = min(candidates, key=lambda n: (ring_distance(key, n), n))
    assert closest(key, candidates) == expected


def test_key_for_hashes_the_kind_prefixed_name() -> None:
    digest = hashlib.blake2b(b"cluster:billing", digest_size=16).digest()
    assert key_for("cluster", "billing") == int.from_bytes(digest, "big")
    assert key_for("cluster", "billing") != key_for("topic", "billing")
    assert 0 <= key_for("topic", "") < ID_SPACE


def test_key_for_keeps_raw_names_distinct() -> None:
    assert key_for("topic", "caf\udce9") != key_for("topic", "café")


@pytest.mark.parametrize("kind", ["", "a:b"])
def test_key_for_rejects_ambiguous_kinds(kind: str) -> None:
    with pytest.raises(ValueError):
        key_for(kind, "x")


@given(ids)
def test_text_and_byte_forms_round_trip(node_id: int) -> None:
    assert parse_id(format_id(node_id)) == node_id
    assert len(format_id(node_id)) == ID_DIGITS
    assert id_from_bytes(id_to_bytes(node_id)) == node_id
    assert short_id(node_id) == format_id(node_id)[:8]


@pytest.mark.parametrize(
    "text", ["", "0" * 31, "0" * 33, "g" * 32, "0x" + "0" * 30, " " + "0" * 31, "_" * 32]
)
def test_parse_id_rejects_anything_but_32_hex_digits(text: str) -> None:
    with pytest.raises(ValueError):
        parse_id(text)


def test_ids_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        format_id(ID_SPACE)
    with pytest.raises(ValueError):
        id_from_bytes(b"\x00" * 15)


def test_random_ids_come_from_the_injected_rng() -> None:
    assert random_id(random.Random(7)) == random_id(random.Random(7))
    assert random_id(random.Random(7)) != random_id(random.Random(8))
