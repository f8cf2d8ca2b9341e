"""What ``bench/fuzz.py`` sends: malformed and odd relay streams, and link payloads.

Every generator is driven by one ``random.Random`` so a run is reproducible from its
seed. Each case has a *kind* (for the report) and bytes; relay cases are whole client
streams (the handshake, when a case has one, included), link cases are the plaintext
of one link frame, or a frame-level mutation of what ``LinkCore`` produced.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]

from relay import codec

U64 = (1 << 64) - 1
NAME_LIMIT = codec.DEFAULT_MAX_NAME
PAYLOAD_LIMIT = codec.DEFAULT_MAX_PAYLOAD

# -- relay ---------------------------------------------------------------------------------


class RelayCases:
    """Client streams: random bytes, mutated valid streams, and targeted malformations."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.kinds: list[tuple[str, Callable[[], bytes]]] = [
            ("random", self.random),
            ("random-after-init", self.random_after_init),
            ("mutated", self.mutated),
            ("truncated", self.truncated),
            ("oversize-varint", self.oversize_varint),
            ("unknown-opcode", self.unknown_opcode),
            ("bad-bool", self.bad_bool),
            ("names-at-limits", self.names_at_limits),
            ("unknown-ids", self.unknown_ids),
            ("handshake", self.handshake),
            ("valid", self.valid),
        ]

    def next(self) -> tuple[str, bytes]:
        kind, make = self.rng.choice(self.kinds)
        return kind, make()

    # -- building blocks

    def _id(self) -> int:
        rng = self.rng
        return rng.choice((rng.randrange(8), rng.randrange(1 << 20), rng.randrange(U64 + 1)))

    def _name(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return "x" * rng.choice((NAME_LIMIT - 1, NAME_LIMIT))
        if roll < 0.1:
            return "$" + rng.choice(("node.status", "node.lookup", "foo", "", "NODE.status"))
        return "".join(rng.choice("abcz$.\x00\xff") for _ in range(rng.randrange(6)))

    def _payload(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 8, 64)))

    def _packet(self) -> Any:
        rng = self.rng
        kind = rng.randrange(13)
        if kind == 0:
            return codec.Broadcast(self._name(), self._payload())
        if kind == 1:  # short timeouts: a fuzz case must not pin the node's request budget
            return codec.Request(self._id(), self._name(), self._payload(), rng.randrange(50))
        if kind == 2:
            return codec.Reply(self._id(), self._payload())
        if kind == 3:
            return codec.Fault(self._id(), self._name())
        if kind == 4:
            return codec.Subscribe(self._name())
        if kind == 5:
            return codec.Unsubscribe(self._name())
        if kind == 6:
            return codec.Publish(self._name(), self._payload())
        if kind == 7:
            return codec.TunnelInit(self._id(), self._name(), rng.randrange(50))
        if kind == 8:
            return codec.TunnelConfirm(self._id(), self._id())
        if kind == 9:
            return codec.TunnelAllow(self._id(), self._id())
        if kind == 10:
            chunk = self._payload()
            return codec.TunnelTransfer(self._id(), rng.choice((0, len(chunk), self._id())), chunk)
        if kind == 11:
            return codec.TunnelClose(self._id())
        return codec.Init(self._name())

    def _stream(self, packets: int = 6) -> bytes:
        rng = self.rng
        body = b"".join(self._packet().encode() for _ in range(rng.randrange(packets + 1)))
        return codec.Init(rng.choice(("", "", "fuzz"))).encode() + body + codec.Close().encode()

    # -- kinds

    def random(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(1, 96))

    def random_after_init(self) -> bytes:
        return codec.Init().encode() + self.rng.randbytes(self.rng.randrange(1, 96))

    def mutated(self) -> bytes:
        data = bytearray(self._stream())
        rng = self.rng
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            at = rng.randrange(len(data))
            roll = rng.randrange(5)
            if roll == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif roll == 1:
                data[at] = rng.randrange(256)
            elif roll == 2:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
            elif roll == 3:
                del data[at : at + rng.randint(1, 8)]
            else:
                end = min(len(data), at + rng.randint(1, 16))
                data[at:at] = data[at:end]
        return bytes(data)

    def truncated(self) -> bytes:
        stream = self._stream()
        return stream[: self.rng.randrange(1, len(stream))]

    def oversize_varint(self) -> bytes:
        rng = self.rng
        varint = rng.choice(
            (
                b"\xff" * rng.randint(10, 20) + b"\x01",  # longer than ten bytes
                b"\xff" * 9 + bytes([rng.randint(2, 127)]),  # beyond 64 bits
                b"\x80" * 9 + b"\x02",
            )
        )
        opcode = rng.choice((0x03, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D))
        return codec.Init().encode() + bytes([opcode]) + varint + rng.randbytes(8)

    def unknown_opcode(self) -> bytes:
        rng = self.rng
        opcode = rng.choice((0x01, *range(0x0E, 0x100)))
        return codec.Init().encode() + bytes([opcode]) + rng.randbytes(rng.randrange(16))

    def bad_bool(self) -> bytes:
        rng = self.rng
        flag = bytes([rng.randint(2, 255)])
        return codec.Init().encode() + b"\x05" + codec.encode_varint(self._id()) + flag + b"\x00"

    def names_at_limits(self) -> bytes:
        rng = self.rng
        length = rng.choice((NAME_LIMIT, NAME_LIMIT + 1, 1 << 20, U64))
        opcode = rng.choice((0x03, 0x06, 0x07, 0x08))  # a name first
        field = codec.encode_varint(length) + b"n" * min(length, NAME_LIMIT + 1)
        if rng.random() < 0.5:  # a payload announced at and past the limit, never sent
            size = rng.choice((PAYLOAD_LIMIT, PAYLOAD_LIMIT + 1))
            return codec.Init().encode() + b"\x08\x01t" + codec.encode_varint(size) + b"p" * 64
        return codec.Init().encode() + bytes([opcode]) + field

    def unknown_ids(self) -> bytes:
        rng = self.rng
        packets = [
            rng.choice(
                (
                    codec.TunnelAllow(self._id(), self._id()),
                    codec.TunnelTransfer(self._id(), 3, b"abc"),
                    codec.TunnelTransfer(self._id(), 0, b"cont"),
                    codec.TunnelClose(self._id()),
                    codec.TunnelConfirm(self._id(), self._id()),
                    codec.Reply(self._id(), b"late"),
                    codec.Fault(self._id(), "late"),
                )
            )
            for _ in range(rng.randint(1, 8))
        ]
        stream = b"".join(p.encode() for p in packets)
        return codec.Init().encode() + stream + codec.Close().encode()

    def handshake(self) -> bytes:
        rng = self.rng
        init = rng.choice(
            (
                codec.Init(magic=self._name()),
                codec.Init(version=rng.choice(("v1.0-draft1", "", "v9", "x" * NAME_LIMIT))),
                codec.Init(self._name()),
                codec.Init("$node.status"),
                codec.Init("\uff04node.status"),
            )
        )
        return init.encode() + rng.randbytes(rng.randrange(4))

    def valid(self) -> bytes:
        return self._stream(12)


# -- links -----------------------------------------------------------------------------------


class LinkCases:
    """Plaintexts of link frames: node-to-node messages, valid, mutated or garbage.

    Valid messages are built from the wire registry's own field descriptions, so every
    registered family (Pastry, lookups, Scribe, messaging), nested messages included, is
    covered without this file knowing it.
    """

    def __init__(self, rng: random.Random, registry: Any) -> None:
        self.rng = rng
        self.entries: list[Any] = sorted(
            getattr(registry, "_by_tag", {}).values(), key=lambda entry: entry.tag
        )
        self.kinds: list[tuple[str, Callable[[], bytes]]] = [
            ("valid-message", self.valid),
            ("mutated-message", self.mutated),
            ("garbage-msgpack", self.garbage),
            ("wrong-envelope", self.wrong_envelope),
            ("wrong-fields", self.wrong_fields),
            ("random-bytes", self.random_bytes),
        ]

    def next(self) -> tuple[str, bytes]:
        kind, make = self.rng.choice(self.kinds)
        return kind, make()

    def _raw(self, field: Any, depth: int = 0) -> object:
        """A raw msgpack value that ``field`` should accept (by its type's name)."""
        rng = self.rng
        name = type(field).__name__
        if name == "UInt":
            return rng.choice((0, 1, rng.randrange(field.maximum + 1), field.maximum))
        if name == "Bool":
            return rng.random() < 0.5
        if name == "NodeId":
            return rng.randbytes(16)
        if name == "Bin":
            limit = field.max_len if field.max_len is not None else 256
            if rng.random() < 0.5:  # an address: only loopback, where nothing listens
                return f"127.0.0.{rng.randint(1, 254)}:{rng.randint(1, 9)}".encode()[:limit]
            return rng.randbytes(rng.randrange(min(limit, 64) + 1))
        if name == "Refs":
            return [
                [rng.randbytes(16), f"127.0.0.1:{rng.randint(1, 9)}".encode()]
                for _ in range(rng.randrange(4))
            ]
        if name == "Float":
            return rng.choice((0.0, 1.0, rng.random() * 1e6))
        if name == "Text":
            return rng.randbytes(rng.randrange(min(field.max_len, 32) + 1))
        if name == "Struct":
            return [self._raw(inner) for inner in field.fields]
        if name == "ListOf":
            return [self._raw(field.item) for _ in range(rng.randrange(4))]
        if name == "_Nested":  # a routed or multicast message carries another message
            return self._body(depth - 1) if depth > 0 else self._garbage_value(1)
        return self._garbage_value(2)

    def _body(self, depth: int) -> list[object]:
        entry = self.rng.choice(self.entries)
        return [entry.tag, *(self._raw(field, depth) for field in entry.fields)]

    def _message(self) -> list[object]:
        return [1, *self._body(3)]

    def _garbage_value(self, depth: int) -> object:
        rng = self.rng
        roll = rng.randrange(8 if depth else 6)
        if roll == 0:
            return rng.randrange(-(1 << 63), 1 << 64)
        if roll == 1:
            return rng.randbytes(rng.randrange(40))
        if roll == 2:
            return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
        if roll == 3:
            return None
        if roll == 4:
            return rng.random() * 1e9
        if roll == 5:
            return rng.random() < 0.5
        if roll == 6:
            return [self._garbage_value(depth - 1) for _ in range(rng.randrange(6))]
        return {str(i): self._garbage_value(depth - 1) for i in range(rng.randrange(4))}

    def valid(self) -> bytes:
        packed: bytes = msgpack.packb(self._message(), use_bin_type=True)
        return packed

    def mutated(self) -> bytes:
        data = bytearray(self.valid())
        rng = self.rng
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            roll = rng.randrange(3)
            if roll == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif roll == 1:
                del data[at : at + rng.randint(1, 4)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 4))
            if not data:
                break
        return bytes(data)

    def garbage(self) -> bytes:
        packed: bytes = msgpack.packb(self._garbage_value(3), use_bin_type=True)
        return packed

    def wrong_envelope(self) -> bytes:
        rng = self.rng
        body = self._message()
        roll = rng.randrange(4)
        if roll == 0:
            body[0] = rng.choice((0, 2, 255, "1", None))
        elif roll == 1:
            body[1] = rng.choice((0, 10_000, 65_535, -1, "tag", 1.5))
        elif roll == 2:
            body = body[: rng.randrange(2)]
        else:
            body = {"version": 1, "tag": body[1]}  # type: ignore[assignment]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    def wrong_fields(self) -> bytes:
        rng = self.rng
        body = self._message()
        if len(body) > 2 and rng.random() < 0.7:
            body[rng.randrange(2, len(body))] = self._garbage_value(2)
        elif rng.random() < 0.5:
            body.append(self._garbage_value(1))
        else:
            del body[-1]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(1, 64))


FRAME_KINDS = ("tampered-frame", "replayed-frame", "truncated-frame", "oversize-length")
"""Frame-level mutations of what ``LinkCore.send`` produced (see ``bench/fuzz.py``)."""


def mutate_frame(rng: random.Random, kind: str, frame: bytes, previous: bytes) -> bytes:
    """Bytes to write instead of ``frame``: what a tampering or broken peer would send."""
    if kind == "tampered-frame":
        data = bytearray(frame)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "replayed-frame":
        return previous + frame if previous else frame + frame
    if kind == "truncated-frame":
        return frame[: rng.randrange(4, len(frame))] + rng.randbytes(rng.randint(1, 32))
    return (0xFFFFFFF0).to_bytes(4, "big") + frame[4:]
