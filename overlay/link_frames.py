"""Messages over a link: fragments, two traffic classes, limits (docs/wire-link.md §4).

Pure and crypto-free, so both halves can be tested on their own:

* :class:`Outbox` is the sending half. It holds two FIFO queues, *control*
  (heartbeats, routing, tree upkeep) and *bulk* (application data), and cuts
  messages into frame plaintexts of at most one fragment each. Control always
  goes first, so a control message waits behind at most the one bulk fragment
  already handed out. It bounds both queues and says when the bulk queue is
  *congested* (above a high-water mark until it drains below a low-water mark).
* :class:`Reassembler` is the receiving half: it checks every fragment header
  and puts messages back together, one in progress per class, refusing anything
  over the message limit from the first fragment's declared length.

:class:`LinkLimits` collects every limit of a link in one place.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from overlay.wire import DEFAULT_MAX_MESSAGE

CONTROL = 0x00
BULK = 0x10
WHOLE = 0x0
FIRST = 0x1
MIDDLE = 0x2
LAST = 0x3
FIRST_HEADER_SIZE = 5
"""A first fragment's header: kind (1) and the whole message's length (u32)."""
MAX_FRAGMENT_HEADER = FIRST_HEADER_SIZE

_TOTAL = struct.Struct(">I")
_KINDS = {CONTROL | p for p in (WHOLE, FIRST, MIDDLE, LAST)} | {
    BULK | p for p in (WHOLE, FIRST, MIDDLE, LAST)
}

DEFAULT_MAX_FRAME = 1 << 20
"""Largest plaintext of one frame, fragment header included (1 MiB): a receiver's limit."""
DEFAULT_FRAGMENT = 256 * 1024
"""Message bytes per frame the sender cuts (256 KiB): the most a control message waits behind."""
MAX_MESSAGE_LIMIT = (1 << 32) - 1
"""The u32 length field of a first fragment cannot say more."""


@dataclass(frozen=True, slots=True)
class LinkLimits:
    """Every size limit of one link; both ends of a network should agree on the first two."""

    max_frame_size: int = DEFAULT_MAX_FRAME
    """Largest frame plaintext accepted (header included); larger is ``oversize-frame``."""
    max_message_size: int = DEFAULT_MAX_MESSAGE
    """Largest message sent or accepted; larger is a ``LinkStateError`` / ``oversize-message``."""
    fragment_size: int = DEFAULT_FRAGMENT
    """Message bytes per frame this end sends (at most ``max_frame_size - 5``)."""
    bulk_high_water: int = 4 << 20
    """Queued bulk bytes above which the link is congested."""
    bulk_low_water: int = 1 << 20
    """Queued bulk bytes below which a congested link is writable again."""
    max_bulk_queued: int = 64 << 20
    """Queued bulk bytes beyond which bulk sends are refused (given up, counted)."""
    max_control_queued: int = 32 << 20
    """Queued control bytes beyond which control sends are refused: a peer this far behind
    cannot be answering heartbeats anyway."""

    def __post_init__(self) -> None:
        if not 0 < self.fragment_size <= self.max_frame_size - MAX_FRAGMENT_HEADER:
            raise ValueError("need 0 < fragment_size <= max_frame_size - 5")
        if not 0 <= self.max_message_size <= MAX_MESSAGE_LIMIT:
            raise ValueError("max_message_size must fit a u32")
        if not 0 <= self.bulk_low_water <= self.bulk_high_water <= self.max_bulk_queued:
            raise ValueError("need 0 <= bulk_low_water <= bulk_high_water <= max_bulk_queued")
        if min(self.max_bulk_queued, self.max_control_queued) < self.max_message_size:
            raise ValueError("each queue must hold at least one message of the largest size")


DEFAULT_LIMITS = LinkLimits()


class FragmentError(Exception):
    """A peer's frame that breaks the fragment rules; ``reason`` is the link failure reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------
# Sending


class _Queue:
    """One class of traffic: FIFO messages and how far the head one has been cut."""

    __slots__ = ("bits", "bytes", "messages", "offset")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.messages: deque[bytes] = deque()
        self.offset = 0
        self.bytes = 0

    def cut(self, fragment_size: int) -> tuple[bytes, bytes, int, int]:
        """The next frame of the head message: (header, message, start, end)."""
        message = self.messages[0]
        start = self.offset
        size = len(message)
        end = min(size, start + fragment_size)
        if start == 0:
            if end == size:
                header = bytes((self.bits | WHOLE,))
            else:
                header = bytes((self.bits | FIRST,)) + _TOTAL.pack(size)
        else:
            header = bytes((self.bits | (LAST if end == size else MIDDLE),))
        if end == size:
            self.messages.popleft()
            self.offset = 0
        else:
            self.offset = end
        self.bytes -= end - start
        return header, message, start, end


class Outbox:
    """The frames to send next, control before bulk, each class FIFO (module docstring)."""

    def __init__(self, limits: LinkLimits) -> None:
        self.limits = limits
        self.control = _Queue(CONTROL)
        self.bulk = _Queue(BULK)
        self.congested = False

    def __bool__(self) -> bool:
        return bool(self.control.messages or self.bulk.messages)

    @property
    def queued_messages(self) -> int:
        """Messages not completely handed out (a partly sent one counts): lost if the link dies."""
        return len(self.control.messages) + len(self.bulk.messages)

    def push(self, data: bytes, *, bulk: bool) -> bool:
        """Queue one message; False if its queue is full (the caller gives it up).

        The size limit is checked by the caller: an oversize message is its bug.
        """
        limits = self.limits
        queue = self.bulk if bulk else self.control
        cap = limits.max_bulk_queued if bulk else limits.max_control_queued
        if queue.bytes + len(data) > cap:
            return False
        queue.messages.append(data)
        queue.bytes += len(data)
        if bulk and queue.bytes > limits.bulk_high_water:
            self.congested = True
        return True

    def pop(self) -> tuple[bytes, bytes, int, int] | None:
        """The next frame plaintext as ``header + message[start:end]``, or None if idle."""
        fragment_size = self.limits.fragment_size
        if self.control.messages:
            return self.control.cut(fragment_size)
        if self.bulk.messages:
            frame = self.bulk.cut(fragment_size)
            if self.congested and self.bulk.bytes < self.limits.bulk_low_water:
                self.congested = False
            return frame
        return None

    def clear(self) -> int:
        """Forget everything queued; returns how many messages that was."""
        lost = self.queued_messages
        self.control = _Queue(CONTROL)
        self.bulk = _Queue(BULK)
        self.congested = False
        return lost


# --------------------------------------------------------------------------------
# Receiving


RETAINED_BUFFER = 1 << 20
"""A class's reassembly buffer is kept for the next message up to this size (1 MiB)."""


class _Partial:
    __slots__ = ("buffer", "size", "total")

    def __init__(self, total: int, buffer: bytearray) -> None:
        self.total = total
        self.size = 0
        self.buffer = buffer

    def add(self, data: bytes | bytearray, start: int, end: int) -> None:
        size = end - start
        with memoryview(self.buffer) as into, memoryview(data) as source:
            into[self.size : self.size + size] = source[start:end]
        self.size += size


class Reassembler:
    """Whole messages back from frame plaintexts, one message in progress per class.

    Fragments are copied into one buffer per class, sized by the first fragment's
    declared total (at most the message limit), and reused for the next message
    while it is at most :data:`RETAINED_BUFFER`: memory a process keeps touching
    costs no page faults, and at link speeds fresh pages cost more than the copy.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message_size = max_message_size
        self._partial: dict[int, _Partial] = {}
        self._buffers: dict[int, bytearray] = {}

    def feed(self, data: bytes | bytearray, start: int = 0, end: int | None = None) -> bytes | None:
        """One frame plaintext (``data[start:end]``) in; the message it completes, or None.

        Raises :class:`FragmentError`. Keeps no reference to ``data``.
        """
        end = len(data) if end is None else end
        size = end - start - 1
        if size < 0:
            raise FragmentError("malformed-fragment", "empty frame")
        kind = data[start]
        if kind not in _KINDS:
            raise FragmentError("malformed-fragment", f"unknown fragment kind 0x{kind:02x}")
        traffic = kind & 0xF0
        position = kind & 0x0F
        partial = self._partial.get(traffic)
        name = "bulk" if traffic == BULK else "control"
        if position in (WHOLE, FIRST):
            if partial is not None:
                raise FragmentError(
                    "malformed-fragment", f"new {name} message while one is in progress"
                )
            if position == WHOLE:
                if size > self.max_message_size:
                    raise self._oversize(size)
                return _copy(data, start + 1, end)
            if size < FIRST_HEADER_SIZE - 1:
                raise FragmentError("malformed-fragment", "first fragment without its length")
            (total,) = _TOTAL.unpack_from(data, start + 1)
            if total > self.max_message_size:
                raise self._oversize(total)
            size -= FIRST_HEADER_SIZE - 1
            if not 0 < size < total:
                raise FragmentError(
                    "malformed-fragment", f"first fragment of {size} bytes for {total}"
                )
            buffer = self._buffers.get(traffic)
            if buffer is None or len(buffer) < total:
                buffer = bytearray(total)
                if total <= RETAINED_BUFFER:
                    self._buffers[traffic] = buffer
            partial = self._partial[traffic] = _Partial(total, buffer)
            partial.add(data, start + FIRST_HEADER_SIZE, end)
            return None
        if partial is None:
            raise FragmentError("malformed-fragment", f"{name} continuation without a start")
        have = partial.size + size
        if size == 0 or (have >= partial.total if position == MIDDLE else have != partial.total):
            raise FragmentError(
                "malformed-fragment",
                f"{name} fragment of {size} bytes at {partial.size} of {partial.total}",
            )
        partial.add(data, start + 1, end)
        if position == MIDDLE:
            return None
        del self._partial[traffic]
        with memoryview(partial.buffer) as view, view[: partial.total] as message:
            return bytes(message)

    @property
    def buffered(self) -> int:
        """Bytes held in messages not complete yet."""
        return sum(p.size for p in self._partial.values())

    def _oversize(self, size: int) -> FragmentError:
        return FragmentError(
            "oversize-message", f"message of {size} bytes, limit {self.max_message_size}"
        )


def _copy(data: bytes | bytearray, start: int, end: int) -> bytes:
    if start == 0 and end == len(data) and isinstance(data, bytes):
        return data
    with memoryview(data) as view, view[start:end] as piece:
        return bytes(piece)
