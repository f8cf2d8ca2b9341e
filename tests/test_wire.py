"""The node-to-node codec: exact round trips, stable bytes, and strict rejection."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import lookup, pastry, wire
from overlay.ids import ID_SPACE
from overlay.lookup import Found, Lookup
from overlay.pastry import (
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
from overlay.pastry.messages import REFS
from overlay.wire import MAX_ADDRESS, MAX_ARRAY, MAX_NESTING, MessageRegistry, WireError


def node_registry() -> MessageRegistry:
    registry = MessageRegistry()
    pastry.register(registry)
    lookup.register(registry)
    return registry


REGISTRY = node_registry()
encode = REGISTRY.encode
decode = REGISTRY.decode

ids = st.integers(min_value=0, max_value=ID_SPACE - 1)
addresses = st.binary(max_size=MAX_ADDRESS)
refs = st.lists(st.builds(NodeRef, ids, addresses), max_size=40).map(tuple)
u8 = st.integers(0, 255)
u32 = st.integers(0, 2**32 - 1)
rows = st.integers(0, 31)

messages = st.one_of(
    st.builds(Heartbeat, addresses, u32, st.booleans(), st.booleans()),
    st.builds(Join, ids, addresses, u8),
    st.builds(JoinReply, addresses, refs, st.booleans()),
    st.builds(LeafSetRequest, addresses),
    st.builds(LeafSetReply, addresses, u32, refs),
    st.builds(RowRequest, addresses, rows),
    st.builds(RowReply, addresses, rows, refs),
    st.builds(Leave, refs),
    st.builds(
        Route, ids, ids, addresses, u8, st.booleans(), st.builds(Lookup, st.integers(0, 2**64 - 1))
    ),
    st.builds(Found, st.integers(0, 2**64 - 1), ids),
)


@given(messages)
def test_every_message_round_trips(message: object) -> None:
    assert decode(encode(message)) == message


def test_bytes_are_stable() -> None:
    """Changing these bytes breaks compatibility with deployed nodes: use a new tag."""
    assert encode(Heartbeat(b"h:1", 7, True, False)) == bytes.fromhex(
        "96 01 01 c4 03 683a31 07 c3 c2"
    )
    route = Route(1, 2**128 - 1, b"a", 3, False, Lookup(5))
    assert encode(route) == (
        bytes.fromhex("98 01 09 c4 10")
        + (1).to_bytes(16, "big")
        + bytes.fromhex("c4 10")
        + b"\xff" * 16
        + bytes.fromhex("c4 01 61 03 c2 92 10 05")
    )


def _raw(*body: object) -> bytes:
    data: bytes = msgpack.packb(list(body), use_bin_type=True)
    return data


GOOD_ID = b"\x00" * 16


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),
        (_raw(1, 4, b"a")[:-1], "malformed"),
        (_raw(1, 4, b"a") + b"\x00", "malformed"),
        (msgpack.packb({"a": 1}), "envelope"),
        (_raw(1), "envelope"),
        (_raw(2, 4, b"a"), "version"),
        (_raw(True, 4, b"a"), "version"),
        (_raw(1, 200, b"a"), "unknown message type"),
        (_raw(1, "4", b"a"), "unknown message type"),
        (_raw(1, 4), "needs 1 fields"),
        (_raw(1, 4, b"a", b"b"), "needs 1 fields"),
        (_raw(1, 4, "a"), "expected bytes"),
        (_raw(1, 4, b"a" * (MAX_ADDRESS + 1)), "longer than"),
        (_raw(1, 1, b"a", 1, 1, False), "expected a boolean"),
        (_raw(1, 1, b"a", -1, True, False), "integer"),
        (_raw(1, 1, b"a", 2**32, True, False), "integer"),
        (_raw(1, 1, b"a", True, True, False), "integer"),
        (_raw(1, 6, b"a", 32), "integer"),
        (_raw(1, 2, b"\x00" * 15, b"a", 0), "16 bytes"),
        (_raw(1, 8, [[GOOD_ID]]), "[id, address]"),
        (_raw(1, 8, [[GOOD_ID, "a"]]), "address"),
        (_raw(1, 8, [[GOOD_ID[:3], b"a"]]), "16 bytes"),
        (_raw(1, 8, [[GOOD_ID, b"a"]] * (MAX_ARRAY + 1)), "malformed"),
        (_raw(1, 8, {"a": 1}), "node refs"),
        (b"\x91" * 5000 + b"\x00", "malformed"),
        (msgpack.packb([1, 4, msgpack.ExtType(1, b"x")]), "malformed"),
        (_raw(1, 9, GOOD_ID, GOOD_ID, b"a", 0, False, b"raw bytes"), "not a message"),
        (_raw(1, 9, GOOD_ID, GOOD_ID, b"a", 0, False, [200, 1]), "unknown message type"),
        (
            _raw(1, 9, GOOD_ID, GOOD_ID, b"a", 0, False, [16, "x"]),
            "Route: Lookup: expected an integer",
        ),
        (_raw(1, 9, GOOD_ID, GOOD_ID, b"a", 0, False, []), "not a message"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        decode(data)
    assert reason in caught.value.reason


def test_oversize_messages_are_refused_before_parsing() -> None:
    data = encode(Route(0, 0, b"x" * 200, 0, False, Lookup(1)))
    assert decode(data, max_size=len(data)) is not None
    with pytest.raises(WireError, match="exceeds"):
        decode(data, max_size=len(data) - 1)


def test_a_declared_length_beyond_the_limit_is_refused() -> None:
    # A bin header claiming 4 GiB, with almost nothing behind it.
    with pytest.raises(WireError):
        decode(bytes.fromhex("93 01 04 c6 ff ff ff ff") + b"a", max_size=1024)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(data)


@dataclass(frozen=True, slots=True)
class _Ping:
    nonce: int
    note: bytes


def test_a_new_family_registers_without_touching_existing_bytes() -> None:
    registry = MessageRegistry()
    registry.register(32, _Ping, wire.U32, wire.Bin(16))
    assert registry.decode(registry.encode(_Ping(5, b"n"))) == _Ping(5, b"n")
    with pytest.raises(WireError, match="unknown"):
        registry.decode(encode(LeafSetRequest(b"a")))
    with pytest.raises(WireError, match="unknown"):
        decode(registry.encode(_Ping(5, b"n")))


def test_registration_mistakes_fail_loudly() -> None:
    registry = MessageRegistry()
    registry.register(40, _Ping, wire.U32, wire.Bin())
    with pytest.raises(ValueError):
        registry.register(40, Leave, REFS)
    with pytest.raises(ValueError):
        registry.register(41, _Ping, wire.U32, wire.Bin())
    with pytest.raises(ValueError):
        registry.register(42, Join, wire.ID)


def test_encoding_an_out_of_range_value_is_our_bug() -> None:
    with pytest.raises(ValueError):
        encode(Join(1, b"a", 256))


def test_routes_nest_to_a_bounded_depth() -> None:
    registry = node_registry()
    message: object = Lookup(7)
    for _ in range(MAX_NESTING - 1):
        message = Route(1, 2, b"a", 0, True, message)
    assert registry.decode(registry.encode(message)) == message
    too_deep = Route(1, 2, b"a", 0, True, message)
    with pytest.raises(WireError, match="nested"):
        registry.decode(registry.encode(too_deep))


@dataclass(frozen=True, slots=True)
class _Report:
    name: str
    weights: tuple[tuple[int, float], ...]


def test_names_floats_and_lists_of_records_round_trip_and_are_checked() -> None:
    registry = MessageRegistry()
    registry.register(33, _Report, wire.Text(8), wire.ListOf(wire.Struct(wire.ID, wire.FLOAT), 3))
    report = _Report("b\udcffx", ((1, 0.5), (2, 0.0)))
    assert registry.decode(registry.encode(report)) == report
    for bad, reason in [
        (_raw(1, 33, b"123456789", []), "name of at most 8"),
        (_raw(1, 33, b"a", [[GOOD_ID, -1.0]]), "non-negative float"),
        (_raw(1, 33, b"a", [[GOOD_ID, float("nan")]]), "non-negative float"),
        (_raw(1, 33, b"a", [[GOOD_ID, 1]]), "float"),
        (_raw(1, 33, b"a", [[GOOD_ID]]), "record of 2"),
        (_raw(1, 33, b"a", [[GOOD_ID, 1.0]] * 4), "at most 3"),
    ]:
        with pytest.raises(WireError, match=reason):
            registry.decode(bad)
    with pytest.raises(ValueError):
        registry.encode(_Report("a", ((1, float("inf")),)))
