"""The relay codec against the spec's bytes (section 13), and as a property over all packets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import codec
from relay.codec import (
    Accepted,
    Broadcast,
    BroadcastDelivered,
    Close,
    Closed,
    Decoder,
    Denied,
    Fault,
    Faulted,
    Init,
    Publish,
    Replied,
    Reply,
    Request,
    RequestDelivered,
    Subscribe,
    TimedOut,
    TunnelAllow,
    TunnelClose,
    TunnelClosed,
    TunnelConfirm,
    TunnelConfirmed,
    TunnelFailed,
    TunnelInit,
    TunnelOffered,
    TunnelTransfer,
    Unsubscribe,
    client_decoder,
    encode_varint,
    node_decoder,
)
from relay.errors import LocalProtocolError


def h(text: str) -> bytes:
    """Hex as the spec writes it: spaces and ``|`` separators are ignored."""
    return bytes.fromhex(text.replace("|", " "))


def s(text: str) -> str:
    """A string as hex of its length and bytes, as in the spec."""
    data = text.encode()
    return encode_varint(len(data)).hex() + data.hex()


CLIENT_VECTORS: list[tuple[object, bytes]] = [
    (Init(), h("00" + s("iris-client-magic") + s("v1.0-draft2") + "00")),
    (Init("echo"), h("00" + s("iris-client-magic") + s("v1.0-draft2") + "04 65 63 68 6f")),
    (Request(0, "echo", b"hi", 1000), h("04 | 00 | 04 65 63 68 6f | 02 68 69 | e8 07")),
    (Reply(5, b"hi"), h("05 | 05 | 01 | 02 68 69")),
    (Fault(5, "boom"), h("05 | 05 | 00 | 04 62 6f 6f 6d")),
    (Publish("news", b"hello"), h("08 | 04 6e 65 77 73 | 05 68 65 6c 6c 6f")),
    (Subscribe("news"), h("06 04 6e 65 77 73")),
    (Unsubscribe("news"), h("07 04 6e 65 77 73")),
    (Broadcast("echo", b"hey"), h("03 | 04 65 63 68 6f | 03 68 65 79")),
    (TunnelInit(3, "echo", 1000), h("09 | 03 | 04 65 63 68 6f | e8 07")),
    (TunnelAllow(3, 64 << 20), h("0b | 03 | 80 80 80 20")),
    (TunnelTransfer(2, 3, b"abc"), h("0c | 02 | 03 | 03 61 62 63")),
    (TunnelConfirm(7, 2), h("0a | 07 | 02")),
    (TunnelAllow(2, 64 << 20), h("0b | 02 | 80 80 80 20")),
    (TunnelClose(2), h("0d | 02")),
    (Close(), h("02")),
]

NODE_VECTORS: list[tuple[object, bytes]] = [
    (Accepted(), h("00" + s("iris-relay-magic") + s("v1.0-draft2"))),
    (
        Denied("Unsupported protocol. Client: v1.0-draft1. Iris: v1.0-draft2."),
        h(
            "01"
            + s("iris-relay-magic")
            + s("Unsupported protocol. Client: v1.0-draft1. Iris: v1.0-draft2.")
        ),
    ),
    (RequestDelivered(5, b"hi", 1000), h("04 | 05 | 02 68 69 | e8 07")),
    (Replied(0, b"hi"), h("05 | 00 | 00 | 01 | 02 68 69")),
    (TimedOut(0), h("05 | 00 | 01")),
    (Faulted(0, "boom"), h("05 | 00 | 00 | 00 | 04 62 6f 6f 6d")),
    (Publish("news", b"hello"), h("08 | 04 6e 65 77 73 | 05 68 65 6c 6c 6f")),
    (BroadcastDelivered(b"hey"), h("03 | 03 68 65 79")),
    (TunnelConfirmed(3), h("0a | 03 | 00 | 80 80 04")),
    (TunnelAllow(3, 4 << 20), h("0b | 03 | 80 80 80 02")),
    (TunnelFailed(3), h("0a | 03 | 01")),
    (TunnelOffered(7), h("09 | 07 | 80 80 04")),
    (TunnelAllow(2, 4 << 20), h("0b | 02 | 80 80 80 02")),
    (TunnelClosed(2), h("0d | 02 | 00")),
    (Closed(), h("02 | 00")),
]


def test_spec_handshake_lengths() -> None:
    assert len(Init().encode()) == 32
    assert len(Accepted().encode()) == 30
    denial = Denied("Unsupported protocol. Client: v1.0-draft1. Iris: v1.0-draft2.").encode()
    assert denial[18] == 0x3D  # the 61-byte reason's length, right after the magic


@pytest.mark.parametrize(("packet", "wire"), CLIENT_VECTORS)
def test_client_packets_match_spec(packet: Any, wire: bytes) -> None:
    assert packet.encode() == wire
    assert node_decoder().feed(wire) == [packet]


@pytest.mark.parametrize(("packet", "wire"), NODE_VECTORS)
def test_node_packets_match_spec(packet: Any, wire: bytes) -> None:
    assert packet.encode() == wire
    assert client_decoder().feed(wire) == [packet]


def test_tunnel_transfer_of_100000_bytes_in_two_chunks() -> None:
    message = bytes(range(256)) * 390 + bytes(160)
    assert len(message) == 100000
    first = TunnelTransfer(3, 100000, message[:65536]).encode()
    second = TunnelTransfer(3, 0, message[65536:]).encode()
    assert first[:8] == h("0c | 03 | a0 8d 06 | 80 80 04")
    assert second[:6] == h("0c | 03 | 00 | a0 8d 02")
    assert node_decoder().feed(first + second) == [
        TunnelTransfer(3, 100000, message[:65536]),
        TunnelTransfer(3, 0, message[65536:]),
    ]


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "80 01"),
        (300, "ac 02"),
        (1000, "e8 07"),
        (65536, "80 80 04"),
        (4194304, "80 80 80 02"),
        (67108864, "80 80 80 20"),
        (2**64 - 1, "ff ff ff ff ff ff ff ff ff 01"),
    ],
)
def test_varint_examples(value: int, wire: str) -> None:
    assert encode_varint(value) == h(wire)
    assert node_decoder().feed(b"\x0d" + h(wire)) == [TunnelClose(value)]


def test_non_minimal_varint_is_accepted() -> None:
    assert node_decoder().feed(h("0d 80 00")) == [TunnelClose(0)]


def test_encoding_refuses_values_outside_u64() -> None:
    with pytest.raises(LocalProtocolError):
        encode_varint(-1)
    with pytest.raises(LocalProtocolError):
        encode_varint(2**64)


def test_names_survive_arbitrary_bytes() -> None:
    raw = b"\xff\xfe not utf-8 \x00"
    wire = b"\x06" + encode_varint(len(raw)) + raw
    (packet,) = node_decoder().feed(wire)
    assert isinstance(packet, Subscribe)
    assert packet.encode() == wire


# -- property tests over every packet ---------------------------------------------------

ids = st.integers(min_value=0, max_value=2**64 - 1)
names = st.text(max_size=20)
payloads = st.binary(max_size=300)

client_packets = st.one_of(
    st.builds(Init, names, names, names),
    st.builds(Close),
    st.builds(Broadcast, names, payloads),
    st.builds(Request, ids, names, payloads, ids),
    st.builds(Reply, ids, payloads),
    st.builds(Fault, ids, names),
    st.builds(Subscribe, names),
    st.builds(Unsubscribe, names),
    st.builds(Publish, names, payloads),
    st.builds(TunnelInit, ids, names, ids),
    st.builds(TunnelConfirm, ids, ids),
    st.builds(TunnelAllow, ids, ids),
    st.builds(TunnelTransfer, ids, ids, payloads),
    st.builds(TunnelClose, ids),
)

node_packets = st.one_of(
    st.builds(Accepted, names, names),
    st.builds(Denied, names, names),
    st.builds(Closed, names),
    st.builds(BroadcastDelivered, payloads),
    st.builds(RequestDelivered, ids, payloads, ids),
    st.builds(Replied, ids, payloads),
    st.builds(Faulted, ids, names),
    st.builds(TimedOut, ids),
    st.builds(Publish, names, payloads),
    st.builds(TunnelOffered, ids, ids),
    st.builds(TunnelConfirmed, ids, ids),
    st.builds(TunnelFailed, ids),
    st.builds(TunnelAllow, ids, ids),
    st.builds(TunnelTransfer, ids, ids, payloads),
    st.builds(TunnelClosed, ids, names),
)


def _split_feed(make: Callable[[], Decoder[Any]], wire: bytes, cuts: list[int]) -> list[Any]:
    decoder = make()
    out: list[Any] = []
    last = 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        out += decoder.feed(wire[last:cut])
        last = cut
    assert decoder.error is None
    assert decoder.buffered == 0
    return out


@given(st.lists(client_packets, max_size=8), st.lists(st.integers(min_value=0), max_size=6))
def test_client_packets_round_trip_however_split(packets: list[Any], cuts: list[int]) -> None:
    wire = b"".join(p.encode() for p in packets)
    assert _split_feed(node_decoder, wire, cuts) == packets


@given(st.lists(node_packets, max_size=8), st.lists(st.integers(min_value=0), max_size=6))
def test_node_packets_round_trip_however_split(packets: list[Any], cuts: list[int]) -> None:
    wire = b"".join(p.encode() for p in packets)
    assert _split_feed(client_decoder, wire, cuts) == packets


@given(client_packets)
def test_every_truncation_waits_for_more(packet: Any) -> None:
    wire = packet.encode()
    for end in range(len(wire)):
        decoder = node_decoder()
        assert decoder.feed(wire[:end]) == []
        assert decoder.error is None
        assert decoder.buffered == end
        assert decoder.feed(wire[end:]) == [packet]


@given(client_packets)
def test_a_partial_packet_tells_how_large_it_is_at_least(packet: Any) -> None:
    wire = packet.encode()
    for end in range(1, len(wire)):
        decoder = node_decoder()
        decoder.feed(wire[:end])
        assert end < decoder.partial_need <= len(wire)  # never more than the packet takes
        assert decoder.partial_opcode == wire[0]
    decoder = node_decoder()
    decoder.feed(wire)
    assert (decoder.partial_need, decoder.partial_opcode) == (0, None)


def test_a_partial_payload_announces_its_whole_length() -> None:
    wire = Publish("t", bytes(1 << 20)).encode()
    decoder = node_decoder()
    decoder.feed(wire[:10])
    assert decoder.partial_need == len(wire)


# -- malformed input --------------------------------------------------------------------


def _error_of(decoder: Decoder[Any], wire: bytes) -> str:
    decoder.feed(wire)
    assert decoder.error is not None
    return str(decoder.error)


def test_unknown_opcode() -> None:
    assert "unknown opcode 0x0e" in _error_of(node_decoder(), b"\x0e")
    assert "unknown opcode 0x01" in _error_of(node_decoder(), b"\x01")  # DENY is N→C only
    assert "unknown opcode 0x06" in _error_of(client_decoder(), h("06 00"))  # SUBSCRIBE C→N only


def test_bool_other_than_0_or_1() -> None:
    assert "invalid bool byte 0x02" in _error_of(node_decoder(), h("05 01 02 00"))
    assert "invalid bool byte 0xff" in _error_of(client_decoder(), h("0a 01 ff"))


def test_varint_longer_than_ten_bytes() -> None:
    wire = b"\x0d" + b"\x80" * 10 + b"\x00"
    assert "longer than 10 bytes" in _error_of(node_decoder(), wire)


def test_varint_beyond_64_bits() -> None:
    assert "overflows 64 bits" in _error_of(node_decoder(), h("0d ff ff ff ff ff ff ff ff ff 02"))


def test_oversize_payload_refused_before_its_bytes_arrive() -> None:
    decoder = node_decoder(max_payload=1000)
    wire = b"\x03" + codec.encode_str("c") + encode_varint(1001)
    assert "payload of 1001 bytes exceeds the limit of 1000" in _error_of(decoder, wire)
    assert decoder.buffered == 0


def test_oversize_name_refused() -> None:
    wire = b"\x06" + encode_varint(5000)
    assert "name of 5000 bytes" in _error_of(node_decoder(max_name=4096), wire)


def test_packets_before_the_fault_are_still_returned() -> None:
    decoder = node_decoder()
    good = Subscribe("a").encode()
    assert decoder.feed(good + b"\x0f") == [Subscribe("a")]
    assert decoder.error is not None
    with pytest.raises(type(decoder.error)):
        decoder.feed(good)


def test_wrong_magic_is_decoded_for_the_session_to_judge() -> None:
    (packet,) = node_decoder().feed(Init(magic="hello").encode())
    assert isinstance(packet, Init)
    assert packet.magic == "hello"


def test_limits_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        node_decoder(max_payload=-1)


def test_waiting_for_more_bytes_keeps_nothing_alive() -> None:
    import gc
    import weakref

    class Payload(bytearray):
        """A buffer type that can be watched with a weak reference."""

    decoder = node_decoder()
    wire = Publish("t", bytes(1000)).encode()
    chunk = Payload(wire[:10])
    alive = weakref.ref(chunk)
    decoder.feed(chunk)  # type: ignore[arg-type]  # a bytes-like buffer, as sockets give
    del chunk
    gc.collect()
    assert alive() is None
    assert decoder.feed(wire[10:]) == [Publish("t", bytes(1000))]
