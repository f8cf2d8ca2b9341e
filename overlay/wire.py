"""Node-to-node messages as msgpack: a versioned envelope and a registry of types.

Every message is one msgpack array ``[version, tag, field, ...]``: ``version`` is
the envelope format (1), ``tag`` names the message type, and the fields follow in
the order of the message dataclass. Families of messages own tag ranges and each
exports ``register(registry)``; whoever assembles a node builds one
:class:`MessageRegistry` from the families it runs, so nothing is registered as a
side effect of importing, and a new family never changes the bytes of another:

* 1-31: overlay routing (:mod:`overlay.pastry`, :mod:`overlay.lookup`);
* 32-63: Scribe (:mod:`overlay.scribe`);
* 64-127: node-to-node messaging.

A message may carry another registered message as a field
(:meth:`MessageRegistry.message_field`): a routed message holds its payload as a
nested ``[tag, field, ...]`` array, not as msgpack bytes inside msgpack.

Decoding trusts nothing: the frame size, every msgpack container and string is
bounded before it is allocated, maps and extension types have no use here,
nesting is limited, and each field is checked for type and range. Anything
unknown, malformed or too large raises :class:`WireError` naming the problem, and
the caller drops that one link. Ids travel as 16-byte big-endian ``bin`` (msgpack
integers stop at 64 bits); application payloads are opaque ``bin``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any

import msgpack  # type: ignore[import-untyped]

from overlay.ids import ID_BYTES

WIRE_VERSION = 1
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024 + 4096
"""A 16 MiB application payload plus its envelope."""
MAX_ADDRESS = 256
MAX_ARRAY = 1024
"""Longest list in a message: enough for a full routing table (32 x 15) and leaf set."""
MAX_NESTING = 4
"""Messages inside messages (a route holding a Scribe message holding a payload is 3)."""
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


class Float(Field):
    """A finite, non-negative float (capacities, weights)."""

    def encode(self, value: float) -> object:
        value = float(value)
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{value} is not a finite non-negative number")
        return value

    def decode(self, raw: object) -> float:
        if type(raw) is not float or not (math.isfinite(raw) and raw >= 0.0):
            raise WireError("expected a finite non-negative float")
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
        return value if type(value) is bytes else bytes(value)

    def decode(self, raw: object) -> bytes:
        if type(raw) is not bytes:
            raise WireError("expected bytes")
        if self.max_len is not None and len(raw) > self.max_len:
            raise WireError(f"bytes longer than {self.max_len}")
        return raw


class Text(Field):
    """A name: UTF-8 that survives any bytes (``surrogateescape``), at most ``max_len`` bytes."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def encode(self, value: str) -> object:
        data = value.encode("utf-8", "surrogateescape")
        if len(data) > self.max_len:
            raise ValueError(f"name of {len(data)} bytes exceeds {self.max_len}")
        return data

    def decode(self, raw: object) -> str:
        if type(raw) is not bytes or len(raw) > self.max_len:
            raise WireError(f"expected a name of at most {self.max_len} bytes")
        return raw.decode("utf-8", "surrogateescape")


class NodeId(Field):
    def encode(self, value: int) -> object:
        return value.to_bytes(ID_BYTES, "big")

    def decode(self, raw: object) -> int:
        if type(raw) is not bytes or len(raw) != ID_BYTES:
            raise WireError(f"an id is {ID_BYTES} bytes")
        return int.from_bytes(raw, "big")


class Struct(Field):
    """A fixed tuple of fields, as a msgpack array."""

    def __init__(self, *fields: Field) -> None:
        self.fields = fields

    def encode(self, value: tuple[Any, ...]) -> object:
        return [f.encode(v) for f, v in zip(self.fields, value, strict=True)]

    def decode(self, raw: object) -> tuple[object, ...]:
        if type(raw) is not list or len(raw) != len(self.fields):
            raise WireError(f"expected a record of {len(self.fields)} fields")
        return tuple(f.decode(r) for f, r in zip(self.fields, raw, strict=True))


class ListOf(Field):
    """A list of one kind of item, at most ``max_items`` long; decoded as a tuple."""

    def __init__(self, item: Field, max_items: int = MAX_ARRAY) -> None:
        self.item = item
        self.max_items = max_items

    def encode(self, value: tuple[Any, ...]) -> object:
        if len(value) > self.max_items:
            raise ValueError(f"{len(value)} items exceed {self.max_items}")
        return [self.item.encode(v) for v in value]

    def decode(self, raw: object) -> tuple[object, ...]:
        if type(raw) is not list or len(raw) > self.max_items:
            raise WireError(f"expected a list of at most {self.max_items} items")
        decode = self.item.decode
        return tuple(decode(r) for r in raw)


class _Nested(Field):
    """Another registered message, as its ``[tag, field, ...]`` array."""

    def __init__(self, registry: MessageRegistry) -> None:
        self.registry = registry

    def encode(self, value: object) -> object:
        return self.registry.body(value)

    def decode(self, raw: object) -> object:
        return self.registry.from_body(raw)


ID = NodeId()
ADDRESS = Bin(MAX_ADDRESS)
PAYLOAD = Bin()
"""Bounded by the frame size given to :meth:`MessageRegistry.decode`."""
BOOL = Bool()
FLOAT = Float()
U8 = UInt(0xFF)
U32 = UInt(0xFFFFFFFF)
U64 = UInt(0xFFFFFFFFFFFFFFFF)


# --------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    tag: int
    cls: type
    names: tuple[str, ...]
    fields: tuple[Field, ...]


class MessageRegistry:
    """Message types by tag: one per node, filled by each message family's ``register``."""

    def __init__(self) -> None:
        self._by_tag: dict[int, _Entry] = {}
        self._by_type: dict[type, _Entry] = {}
        self._depth = 0

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

    def message_field(self) -> Field:
        """A field holding any message registered here (a routed message's payload)."""
        return _Nested(self)

    def tag_of(self, cls: type) -> int:
        return self._by_type[cls].tag

    def knows(self, message: object) -> bool:
        return type(message) in self._by_type

    def body(self, message: object) -> list[object]:
        """``[tag, field, ...]`` of a registered message (a ValueError/KeyError is our bug)."""
        entry = self._by_type[type(message)]
        body: list[object] = [entry.tag]
        for name, field in zip(entry.names, entry.fields, strict=True):
            body.append(field.encode(getattr(message, name)))
        return body

    def encode(self, message: object) -> bytes:
        """The wire bytes of a registered message."""
        body = self.body(message)
        body.insert(0, WIRE_VERSION)
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
                max_array_len=MAX_ARRAY,
                max_map_len=_MAX_MAP,
                max_ext_len=0,
            )
        except (ValueError, TypeError) as e:
            raise WireError(f"malformed msgpack: {type(e).__name__}") from None
        if type(body) is not list or len(body) < 2:
            raise WireError("not a message envelope")
        version = body[0]
        if version != WIRE_VERSION or type(version) is not int:
            raise WireError(f"unsupported envelope version {version!r}")
        self._depth = 0
        return self.from_body(body[1:])

    def from_body(self, body: object) -> object:
        """The message in a ``[tag, field, ...]`` array (a nested one too)."""
        if type(body) is not list or not body:
            raise WireError("not a message")
        tag = body[0]
        entry = self._by_tag.get(tag) if type(tag) is int else None
        if entry is None:
            raise WireError(f"unknown message type {tag!r}")
        raw_fields = body[1:]
        if len(raw_fields) != len(entry.fields):
            raise WireError(f"{entry.cls.__name__} needs {len(entry.fields)} fields")
        if self._depth >= MAX_NESTING:
            raise WireError(f"messages nested more than {MAX_NESTING} deep")
        self._depth += 1
        try:
            values = [f.decode(raw) for f, raw in zip(entry.fields, raw_fields, strict=True)]
        except WireError as e:
            raise WireError(f"{entry.cls.__name__}: {e.reason}") from None
        finally:
            self._depth -= 1
        return entry.cls(*values)
