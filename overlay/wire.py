"""Node-to-node messages as msgpack: a versioned envelope and a registry of types.

Every message is one msgpack array ``[version, tag, field, ...]``: ``version`` is
the envelope format (1), ``tag`` names the message type, and the fields follow in
the order of the message dataclass. Families of messages own tag ranges, so a new
family (Scribe, messaging) registers new tags and the bytes of existing messages
never change:

* 1-31: Pastry (this module registers them);
* 32-63: Scribe;
* 64-127: node-to-node messaging.

Decoding trusts nothing: the frame size, every msgpack container and string is
bounded before it is allocated, maps and extension types have no use here, and
each field is checked for type and range. Anything unknown, malformed or too
large raises :class:`WireError` naming the problem, and the caller drops that one
link. Ids travel as 16-byte big-endian ``bin`` (msgpack integers stop at 64
bits); application payloads are opaque ``bin``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

import msgpack  # type: ignore[import-untyped]

from overlay.ids import ID_BYTES, ID_DIGITS
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

WIRE_VERSION = 1
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024 + 4096
"""A 16 MiB application payload plus its envelope."""
MAX_ADDRESS = 256
MAX_REFS = 1024
"""Enough for a full routing table (32 x 15) and leaf set."""
_MAX_ARRAY = MAX_REFS
_MAX_STR = 256
_MAX_MAP = 32


class WireError(Exception):
    """Bytes from a peer that are not a valid message; drop that link, with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------
# Field codecs: Python value <-> msgpack value, strict on the way in


class Field(ABC):
    """How one dataclass field travels."""

    @abstractmethod
    def encode(self, value: Any) -> object: ...

    @abstractmethod
    def decode(self, raw: object) -> object:
        """The field's value, or WireError."""


class UInt(Field):
    def __init__(self, maximum: int) -> None:
        self.maximum = maximum

    def encode(self, value: int) -> object:
        if not 0 <= value <= self.maximum:
            raise ValueError(f"{value} out of range 0..{self.maximum}")
        return value

    def decode(self, raw: object) -> int:
        if type(raw) is not int or not 0 <= raw <= self.maximum:
            raise WireError(f"expected an integer in 0..{self.maximum}")
        return raw


class Bool(Field):
    def encode(self, value: bool) -> object:
        return bool(value)

    def decode(self, raw: object) -> bool:
        if type(raw) is not bool:
            raise WireError("expected a boolean")
        return raw


class Bin(Field):
    def __init__(self, max_len: int | None = None) -> None:
        self.max_len = max_len

    def encode(self, value: bytes) -> object:
        return bytes(value)

    def decode(self, raw: object) -> bytes:
        if type(raw) is not bytes:
            raise WireError("expected bytes")
        if self.max_len is not None and len(raw) > self.max_len:
            raise WireError(f"bytes longer than {self.max_len}")
        return raw


class NodeId(Field):
    def encode(self, value: int) -> object:
        return value.to_bytes(ID_BYTES, "big")

    def decode(self, raw: object) -> int:
        if type(raw) is not bytes or len(raw) != ID_BYTES:
            raise WireError(f"an id is {ID_BYTES} bytes")
        return int.from_bytes(raw, "big")


class Refs(Field):
    """A list of (id, address) pairs."""

    def __init__(self, max_items: int = MAX_REFS) -> None:
        self.max_items = max_items

    def encode(self, value: tuple[NodeRef, ...]) -> object:
        return [[node_id.to_bytes(ID_BYTES, "big"), address] for node_id, address in value]

    def decode(self, raw: object) -> tuple[NodeRef, ...]:
        if type(raw) is not list or len(raw) > self.max_items:
            raise WireError(f"expected a list of at most {self.max_items} node refs")
        refs = []
        for item in raw:
            if type(item) is not list or len(item) != 2:
                raise WireError("a node ref is [id, address]")
            node_id, address = item
            if type(node_id) is not bytes or len(node_id) != ID_BYTES:
                raise WireError(f"an id is {ID_BYTES} bytes")
            if type(address) is not bytes or len(address) > MAX_ADDRESS:
                raise WireError(f"an address is at most {MAX_ADDRESS} bytes")
            refs.append(NodeRef(int.from_bytes(node_id, "big"), address))
        return tuple(refs)


ID = NodeId()
ADDRESS = Bin(MAX_ADDRESS)
PAYLOAD = Bin()
"""Bounded by the frame size given to :func:`decode`."""
BOOL = Bool()
U8 = UInt(0xFF)
U32 = UInt(0xFFFFFFFF)
REFS = Refs()


# --------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    tag: int
    cls: type
    names: tuple[str, ...]
    fields: tuple[Field, ...]


class MessageRegistry:
    """Message types by tag; one instance (:data:`REGISTRY`) serves the whole node."""

    def __init__(self) -> None:
        self._by_tag: dict[int, _Entry] = {}
        self._by_type: dict[type, _Entry] = {}

    def register(self, tag: int, cls: type, *fields: Field) -> None:
        """Give dataclass ``cls`` the wire tag ``tag``, one :class:`Field` per dataclass field."""
        names = tuple(f.name for f in dataclasses.fields(cls))
        if len(names) != len(fields):
            raise ValueError(f"{cls.__name__} has {len(names)} fields, {len(fields)} codecs given")
        if not 0 < tag <= 0xFFFF or tag in self._by_tag or cls in self._by_type:
            raise ValueError(f"tag {tag} or type {cls.__name__} is invalid or already registered")
        entry = _Entry(tag, cls, names, fields)
        self._by_tag[tag] = entry
        self._by_type[cls] = entry

    def tag_of(self, cls: type) -> int:
        return self._by_type[cls].tag

    def encode(self, message: object) -> bytes:
        """The wire bytes of a registered message (a ValueError/KeyError is our bug)."""
        entry = self._by_type[type(message)]
        body: list[object] = [WIRE_VERSION, entry.tag]
        for name, field in zip(entry.names, entry.fields, strict=True):
            body.append(field.encode(getattr(message, name)))
        data: bytes = msgpack.packb(body, use_bin_type=True)
        return data

    def decode(self, data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE) -> object:
        """The message in ``data``; WireError if it is not exactly one valid message."""
        if len(data) > max_size:
            raise WireError(f"message of {len(data)} bytes exceeds {max_size}")
        try:
            body = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_bin_len=max_size,
                max_str_len=_MAX_STR,
                max_array_len=_MAX_ARRAY,
                max_map_len=_MAX_MAP,
                max_ext_len=0,
            )
        except (ValueError, TypeError) as e:
            raise WireError(f"malformed msgpack: {type(e).__name__}") from None
        if type(body) is not list or len(body) < 2:
            raise WireError("not a message envelope")
        version, tag = body[0], body[1]
        if version != WIRE_VERSION or type(version) is not int:
            raise WireError(f"unsupported envelope version {version!r}")
        entry = self._by_tag.get(tag) if type(tag) is int else None
        if entry is None:
            raise WireError(f"unknown message type {tag!r}")
        raw_fields = body[2:]
        if len(raw_fields) != len(entry.fields):
            raise WireError(f"{entry.cls.__name__} needs {len(entry.fields)} fields")
        try:
            values = [f.decode(raw) for f, raw in zip(entry.fields, raw_fields, strict=True)]
        except WireError as e:
            raise WireError(f"{entry.cls.__name__}: {e.reason}") from None
        return entry.cls(*values)


REGISTRY = MessageRegistry()

REGISTRY.register(1, Heartbeat, ADDRESS, U32, BOOL, BOOL)
REGISTRY.register(2, Join, ID, ADDRESS, U8)
REGISTRY.register(3, JoinReply, ADDRESS, REFS, BOOL)
REGISTRY.register(4, LeafSetRequest, ADDRESS)
REGISTRY.register(5, LeafSetReply, ADDRESS, U32, REFS)
REGISTRY.register(6, RowRequest, ADDRESS, UInt(ID_DIGITS - 1))
REGISTRY.register(7, RowReply, ADDRESS, UInt(ID_DIGITS - 1), REFS)
REGISTRY.register(8, Leave, REFS)
REGISTRY.register(9, Route, ID, ID, ADDRESS, U8, BOOL, PAYLOAD)


def encode(message: object) -> bytes:
    """Encode with the node-wide :data:`REGISTRY`."""
    return REGISTRY.encode(message)


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE) -> object:
    """Decode with the node-wide :data:`REGISTRY`; raises :class:`WireError`."""
    return REGISTRY.decode(data, max_size=max_size)
