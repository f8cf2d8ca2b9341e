"""The pure fragmenter, scheduler and reassembler of overlay/link_frames.py."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.link_frames import (
    BULK,
    CONTROL,
    FIRST,
    LAST,
    MIDDLE,
    RETAINED_BUFFER,
    WHOLE,
    FragmentError,
    LinkLimits,
    Outbox,
    Reassembler,
)


def limits(fragment: int = 16, **kwargs: int) -> LinkLimits:
    values = {
        "max_frame_size": 64,
        "max_message_size": 1000,
        "fragment_size": fragment,
        "bulk_high_water": 100,
        "bulk_low_water": 40,
        "max_bulk_queued": 2000,
        "max_control_queued": 1000,
    }
    values.update(kwargs)
    return LinkLimits(**values)


def plaintext(frame: tuple[bytes, bytes, int, int]) -> bytes:
    header, message, start, end = frame
    return header + message[start:end]


def drain(outbox: Outbox) -> list[bytes]:
    frames = []
    while (frame := outbox.pop()) is not None:
        frames.append(plaintext(frame))
    return frames


def test_small_messages_are_one_frame_each_with_their_class() -> None:
    outbox = Outbox(limits())
    assert outbox.push(b"ping", bulk=False) and outbox.push(b"data", bulk=True)
    assert drain(outbox) == [bytes([CONTROL | WHOLE]) + b"ping", bytes([BULK | WHOLE]) + b"data"]
    assert outbox.pop() is None and not outbox


def test_a_long_message_is_cut_into_first_middle_last() -> None:
    outbox = Outbox(limits(fragment=16))
    message = bytes(range(40))
    outbox.push(message, bulk=True)
    first, middle, last = drain(outbox)
    assert first == bytes([BULK | FIRST]) + struct.pack(">I", 40) + message[:16]
    assert middle == bytes([BULK | MIDDLE]) + message[16:32]
    assert last == bytes([BULK | LAST]) + message[32:]
    reassembler = Reassembler(1000)
    assert [reassembler.feed(f) for f in (first, middle, last)] == [None, None, message]


def test_control_overtakes_bulk_between_fragments() -> None:
    outbox = Outbox(limits(fragment=16))
    outbox.push(bytes(48), bulk=True)
    assert outbox.pop() is not None  # the first bulk fragment is out
    outbox.push(b"heartbeat", bulk=False)
    frame = outbox.pop()
    assert frame is not None and plaintext(frame) == bytes([CONTROL | WHOLE]) + b"heartbeat"
    assert [f[0] & 0xF0 for f in drain(outbox)] == [BULK, BULK]


def test_congested_above_high_water_until_below_low_water() -> None:
    outbox = Outbox(limits(fragment=16, bulk_high_water=100, bulk_low_water=40))
    outbox.push(bytes(60), bulk=True)
    assert not outbox.congested
    outbox.push(bytes(60), bulk=True)
    assert outbox.congested, "120 queued > 100"
    sizes = []
    while outbox.congested:
        assert outbox.pop() is not None
        sizes.append(outbox.bulk.bytes)
    assert sizes[-1] < 40 <= sizes[-2], "clears once below the low-water mark"
    outbox.push(bytes(1000), bulk=False)
    assert not outbox.congested, "control bytes never congest"


def test_queues_are_bounded_separately() -> None:
    outbox = Outbox(limits(max_bulk_queued=1000, max_control_queued=1000))
    assert outbox.push(bytes(1000), bulk=True)
    assert not outbox.push(b"x", bulk=True), "bulk is at its cap"
    assert outbox.push(bytes(1000), bulk=False), "control is not refused for bulk backlog"
    assert not outbox.push(b"x", bulk=False)
    assert outbox.queued_messages == 2
    assert outbox.clear() == 2 and outbox.queued_messages == 0 and not outbox.congested


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        limits(fragment=60)  # + 5 header bytes > 64
    with pytest.raises(ValueError):
        limits(bulk_low_water=200)
    with pytest.raises(ValueError):
        limits(max_bulk_queued=999)
    with pytest.raises(ValueError):
        LinkLimits(max_message_size=1 << 32)


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b""], "malformed-fragment"),
        ([b"\x04abc"], "malformed-fragment"),
        ([b"\x20abc"], "malformed-fragment"),
        ([b"\x02abc"], "malformed-fragment"),  # middle without a first
        ([b"\x13abc"], "malformed-fragment"),  # last without a first
        ([b"\x01\x00\x00"], "malformed-fragment"),  # first without its length
        ([b"\x01" + struct.pack(">I", 3) + b"abc"], "malformed-fragment"),  # should be whole
        ([b"\x01" + struct.pack(">I", 9)], "malformed-fragment"),  # empty first fragment
        ([b"\x01" + struct.pack(">I", 9) + b"abc", b"\x00x"], "malformed-fragment"),
        ([b"\x01" + struct.pack(">I", 9) + b"abc", b"\x02"], "malformed-fragment"),
        ([b"\x01" + struct.pack(">I", 9) + b"abc", b"\x02abcdef"], "malformed-fragment"),
        ([b"\x01" + struct.pack(">I", 9) + b"abc", b"\x03abc"], "malformed-fragment"),
        ([b"\x01" + struct.pack(">I", 9) + b"abc", b"\x03abcdefg"], "malformed-fragment"),
        ([b"\x11" + struct.pack(">I", 1001) + b"abc"], "oversize-message"),
        ([b"\x10" + bytes(1001)], "oversize-message"),
    ],
)
def test_bad_fragments(frames: list[bytes], reason: str) -> None:
    reassembler = Reassembler(1000)
    with pytest.raises(FragmentError) as caught:
        for frame in frames:
            reassembler.feed(frame)
    assert caught.value.reason == reason


def test_the_limit_itself_is_allowed() -> None:
    reassembler = Reassembler(1000)
    assert reassembler.feed(b"\x10" + bytes(1000)) == bytes(1000)
    assert reassembler.feed(b"\x11" + struct.pack(">I", 1000) + b"ab") is None
    assert reassembler.buffered == 2


def test_reassembly_buffers_are_reused_only_up_to_a_size() -> None:
    reassembler = Reassembler(3 << 20)
    for size in (5000, 3000, 2 << 20, 4000):
        message = os.urandom(size)
        half = size // 2
        first = b"\x11" + struct.pack(">I", size) + message[:half]
        assert reassembler.feed(first) is None
        assert reassembler.feed(b"\x13" + message[half:]) == message, "no stale bytes"
    (kept,) = reassembler._buffers.values()
    assert len(kept) == 5000, "the 2 MiB buffer was not kept; the first one still is"
    assert RETAINED_BUFFER == 1 << 20


@settings(max_examples=150, deadline=None)
@given(
    fragment=st.integers(min_value=1, max_value=59),
    script=st.lists(
        st.tuples(st.booleans(), st.binary(max_size=200), st.integers(min_value=0, max_value=4)),
        max_size=25,
    ),
)
def test_any_messages_and_interleavings_round_trip(
    fragment: int, script: list[tuple[bool, bytes, int]]
) -> None:
    """Push messages of both classes between any number of pops: each class arrives
    whole and in order, and a control message queued while bulk is in flight goes
    out before any further bulk frame (it waits behind at most one fragment)."""
    outbox = Outbox(limits(fragment=fragment, max_message_size=1000, max_bulk_queued=10_000))
    reassembler = Reassembler(1000)
    received: dict[int, list[bytes]] = {CONTROL: [], BULK: []}
    classes_out: list[int] = []

    def pop_one() -> bool:
        frame = outbox.pop()
        if frame is None:
            return False
        data = plaintext(frame)
        assert len(data) <= fragment + 5
        classes_out.append(data[0] & 0xF0)
        message = reassembler.feed(data)
        if message is not None:
            received[data[0] & 0xF0].append(message)
        return True

    sent: dict[int, list[bytes]] = {CONTROL: [], BULK: []}
    for bulk, message, pops in script:
        assert outbox.push(message, bulk=bulk)
        sent[BULK if bulk else CONTROL].append(message)
        if not bulk:
            # Whatever bulk is queued or half sent, the next frames are control ones
            # until this message is out.
            before = len(classes_out)
            while any(m is message for m in outbox.control.messages) and pop_one():
                pass
            assert set(classes_out[before:]) <= {CONTROL}
        for _ in range(pops):
            pop_one()
    while pop_one():
        pass
    assert received == sent
    assert reassembler.buffered == 0 and outbox.queued_messages == 0
