"""The relay protocol v1.0-draft2, byte for byte (``shared/spec/relay-protocol.md``).

Pure: no sockets, no clocks. Every packet is an immutable ``NamedTuple`` whose
``encode()`` returns its wire bytes; a :class:`Decoder` turns a byte stream of one
direction back into packets. Several opcodes have different layouts per
direction, so there is one packet class per (opcode, direction) and two decoders:

* :func:`node_decoder` parses what a *client* sends (C→N), used by the node;
* :func:`client_decoder` parses what a *node* sends (N→C), used by bindings.

Names and texts (the spec's ``str``) are raw bytes on the wire; they are
surfaced as ``str`` decoded with ``surrogateescape`` so that any byte string
survives a round trip unchanged. Payloads (``bin``) stay ``bytes``.

Limits are explicit constructor arguments of :class:`Decoder`; anything that
breaks them, or the grammar, raises :class:`RemoteProtocolError` naming the
problem, as early as it can be seen (an oversize length is refused before its
bytes arrive).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from relay.errors import LocalProtocolError, RemoteProtocolError

CLIENT_MAGIC = "iris-client-magic"
RELAY_MAGIC = "iris-relay-magic"
PROTOCOL_VERSION = "v1.0-draft2"

DEFAULT_CHUNK_LIMIT = 65536
"""Largest TUN_TRANSFER payload a binding may send (announced by the node)."""

MAX_VARINT_BYTES = 10
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
DEFAULT_MAX_NAME = 4096
_U64_LIMIT = 1 << 64

OP_INIT = 0x00
OP_DENY = 0x01
OP_CLOSE = 0x02
OP_BROADCAST = 0x03
OP_REQUEST = 0x04
OP_REPLY = 0x05
OP_SUBSCRIBE = 0x06
OP_UNSUBSCRIBE = 0x07
OP_PUBLISH = 0x08
OP_TUN_INIT = 0x09
OP_TUN_CONFIRM = 0x0A
OP_TUN_ALLOW = 0x0B
OP_TUN_TRANSFER = 0x0C
OP_TUN_CLOSE = 0x0D


# --------------------------------------------------------------------------------
# Primitives (spec section 2)

_SMALL_VARINTS = [bytes([i]) for i in range(128)]


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128, at most 10 bytes."""
    if value < 128:
        if value < 0:
            raise LocalProtocolError(f"varint must not be negative: {value}")
        return _SMALL_VARINTS[value]
    if value >= _U64_LIMIT:
        raise LocalProtocolError(f"varint does not fit in 64 bits: {value}")
    out = bytearray()
    while value > 127:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_bin(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def encode_str(text: str) -> bytes:
    return encode_bin(text.encode("utf-8", "surrogateescape"))


def _encode_bool(flag: bool) -> bytes:
    return b"\x01" if flag else b"\x00"


# --------------------------------------------------------------------------------
# Packets sent by a client (C→N)


class Init(NamedTuple):
    """First packet of a connection; a non-empty cluster registers a service."""

    cluster: str = ""
    version: str = PROTOCOL_VERSION
    magic: str = CLIENT_MAGIC

    def encode(self) -> bytes:
        return (
            b"\x00" + encode_str(self.magic) + encode_str(self.version) + encode_str(self.cluster)
        )


class Close(NamedTuple):
    """Client asks for a graceful teardown."""

    def encode(self) -> bytes:
        return b"\x02"


class Broadcast(NamedTuple):
    cluster: str
    message: bytes

    def encode(self) -> bytes:
        return b"\x03" + encode_str(self.cluster) + encode_bin(self.message)


class Request(NamedTuple):
    request_id: int
    cluster: str
    request: bytes
    timeout_ms: int

    def encode(self) -> bytes:
        return (
            b"\x04"
            + encode_varint(self.request_id)
            + encode_str(self.cluster)
            + encode_bin(self.request)
            + encode_varint(self.timeout_ms)
        )


class Reply(NamedTuple):
    """A service's successful answer to a delivered request."""

    request_id: int
    reply: bytes

    def encode(self) -> bytes:
        return b"\x05" + encode_varint(self.request_id) + b"\x01" + encode_bin(self.reply)


class Fault(NamedTuple):
    """A service's failed answer to a delivered request; ``fault`` is passed on verbatim."""

    request_id: int
    fault: str

    def encode(self) -> bytes:
        return b"\x05" + encode_varint(self.request_id) + b"\x00" + encode_str(self.fault)


class Subscribe(NamedTuple):
    topic: str

    def encode(self) -> bytes:
        return b"\x06" + encode_str(self.topic)


class Unsubscribe(NamedTuple):
    topic: str

    def encode(self) -> bytes:
        return b"\x07" + encode_str(self.topic)


class Publish(NamedTuple):
    """Same layout both ways: a client publishes, the node delivers an event."""

    topic: str
    event: bytes

    def encode(self) -> bytes:
        return b"\x08" + encode_str(self.topic) + encode_bin(self.event)


class TunnelInit(NamedTuple):
    tunnel_id: int
    cluster: str
    timeout_ms: int

    def encode(self) -> bytes:
        return (
            b"\x09"
            + encode_varint(self.tunnel_id)
            + encode_str(self.cluster)
            + encode_varint(self.timeout_ms)
        )


class TunnelConfirm(NamedTuple):
    """A service accepts inbound offer ``build_id`` and names it ``tunnel_id``."""

    build_id: int
    tunnel_id: int

    def encode(self) -> bytes:
        return b"\x0a" + encode_varint(self.build_id) + encode_varint(self.tunnel_id)


class TunnelAllow(NamedTuple):
    """Same layout both ways: the receiver grants the sender ``size`` more payload bytes."""

    tunnel_id: int
    size: int

    def encode(self) -> bytes:
        return b"\x0b" + encode_varint(self.tunnel_id) + encode_varint(self.size)


class TunnelTransfer(NamedTuple):
    """Same layout both ways. ``size_or_cont`` is the message length on its first chunk, else 0."""

    tunnel_id: int
    size_or_cont: int
    chunk: bytes

    def encode(self) -> bytes:
        return (
            b"\x0c"
            + encode_varint(self.tunnel_id)
            + encode_varint(self.size_or_cont)
            + encode_bin(self.chunk)
        )


class TunnelClose(NamedTuple):
    tunnel_id: int

    def encode(self) -> bytes:
        return b"\x0d" + encode_varint(self.tunnel_id)


# --------------------------------------------------------------------------------
# Packets sent by a node (N→C)


class Accepted(NamedTuple):
    """The node accepted the handshake."""

    version: str = PROTOCOL_VERSION
    magic: str = RELAY_MAGIC

    def encode(self) -> bytes:
        return b"\x00" + encode_str(self.magic) + encode_str(self.version)


class Denied(NamedTuple):
    """The node refused the handshake (only for an unsupported version)."""

    reason: str
    magic: str = RELAY_MAGIC

    def encode(self) -> bytes:
        return b"\x01" + encode_str(self.magic) + encode_str(self.reason)


class Closed(NamedTuple):
    """Empty reason: graceful close acknowledged; otherwise the node dropped the client."""

    reason: str = ""

    def encode(self) -> bytes:
        return b"\x02" + encode_str(self.reason)


class BroadcastDelivered(NamedTuple):
    message: bytes

    def encode(self) -> bytes:
        return b"\x03" + encode_bin(self.message)


class RequestDelivered(NamedTuple):
    """A request for this service; ``timeout_ms`` is the requester's original timeout."""

    request_id: int
    request: bytes
    timeout_ms: int

    def encode(self) -> bytes:
        return (
            b"\x04"
            + encode_varint(self.request_id)
            + encode_bin(self.request)
            + encode_varint(self.timeout_ms)
        )


class Replied(NamedTuple):
    """Outcome of the client's own request: a successful reply (possibly empty)."""

    request_id: int
    reply: bytes

    def encode(self) -> bytes:
        return b"\x05" + encode_varint(self.request_id) + b"\x00\x01" + encode_bin(self.reply)


class Faulted(NamedTuple):
    """Outcome of the client's own request: the service failed with this text."""

    request_id: int
    fault: str

    def encode(self) -> bytes:
        return b"\x05" + encode_varint(self.request_id) + b"\x00\x00" + encode_str(self.fault)


class TimedOut(NamedTuple):
    """Outcome of the client's own request: no answer in time."""

    request_id: int

    def encode(self) -> bytes:
        return b"\x05" + encode_varint(self.request_id) + b"\x01"


class TunnelOffered(NamedTuple):
    """A remote party opened a tunnel to this service; confirm ``build_id`` to accept."""

    build_id: int
    chunk_limit: int = DEFAULT_CHUNK_LIMIT

    def encode(self) -> bytes:
        return b"\x09" + encode_varint(self.build_id) + encode_varint(self.chunk_limit)


class TunnelConfirmed(NamedTuple):
    """The client's own TUN_INIT succeeded."""

    tunnel_id: int
    chunk_limit: int = DEFAULT_CHUNK_LIMIT

    def encode(self) -> bytes:
        return b"\x0a" + encode_varint(self.tunnel_id) + b"\x00" + encode_varint(self.chunk_limit)


class TunnelFailed(NamedTuple):
    """The client's own TUN_INIT failed (the wire calls every failure a timeout)."""

    tunnel_id: int

    def encode(self) -> bytes:
        return b"\x0a" + encode_varint(self.tunnel_id) + b"\x01"


class TunnelClosed(NamedTuple):
    """Empty reason: graceful (acknowledged or closed by the far side); else a failure text."""

    tunnel_id: int
    reason: str = ""

    def encode(self) -> bytes:
        return b"\x0d" + encode_varint(self.tunnel_id) + encode_str(self.reason)


ClientPacket = (
    Init
    | Close
    | Broadcast
    | Request
    | Reply
    | Fault
    | Subscribe
    | Unsubscribe
    | Publish
    | TunnelInit
    | TunnelConfirm
    | TunnelAllow
    | TunnelTransfer
    | TunnelClose
)
"""Anything a client may send to its node."""

NodePacket = (
    Accepted
    | Denied
    | Closed
    | BroadcastDelivered
    | RequestDelivered
    | Replied
    | Faulted
    | TimedOut
    | Publish
    | TunnelOffered
    | TunnelConfirmed
    | TunnelFailed
    | TunnelAllow
    | TunnelTransfer
    | TunnelClosed
)
"""Anything a node may send to a client."""


# --------------------------------------------------------------------------------
# Streaming decoder


class _Incomplete(Exception):
    """The buffer ends inside a packet: wait for more bytes.

    Raised as a fresh instance every time: re-raising one shared instance would
    chain every raise's traceback onto it and keep those frames (and the buffers
    they hold) alive forever. Where the packet's known part ends is in
    ``_Reader.need``, set just before.
    """


class _Reader:
    """A cursor over one buffer; every read raises ``_Incomplete`` at the end of data."""

    __slots__ = ("buf", "end", "max_name", "max_payload", "need", "pos")

    def __init__(self, max_payload: int, max_name: int) -> None:
        self.buf: bytes | bytearray = b""
        self.pos = 0
        self.end = 0
        self.need = 0  # offset in buf that the packet being read reaches at least
        self.max_payload = max_payload
        self.max_name = max_name

    def varint(self) -> int:
        buf, pos = self.buf, self.pos
        if pos >= self.end:
            raise _Incomplete
        byte = buf[pos]
        if byte < 0x80:
            self.pos = pos + 1
            return byte
        value = 0
        shift = 0
        for _ in range(MAX_VARINT_BYTES):
            if pos >= self.end:
                raise _Incomplete
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if value >= _U64_LIMIT:
                    raise RemoteProtocolError("varint overflows 64 bits")
                self.pos = pos
                return value
            shift += 7
        raise RemoteProtocolError(f"varint longer than {MAX_VARINT_BYTES} bytes")

    def bool(self) -> bool:
        pos = self.pos
        if pos >= self.end:
            raise _Incomplete
        byte = self.buf[pos]
        if byte > 1:
            raise RemoteProtocolError(f"invalid bool byte 0x{byte:02x}")
        self.pos = pos + 1
        return byte == 1

    def _bytes(self, limit: int, what: str) -> bytes:
        length = self.varint()
        if length > limit:
            raise RemoteProtocolError(f"{what} of {length} bytes exceeds the limit of {limit}")
        start = self.pos
        stop = start + length
        if stop > self.end:
            self.need = stop
            raise _Incomplete
        self.pos = stop
        buf = self.buf
        if length > 4096 and type(buf) is bytearray:
            with memoryview(buf) as view:  # one copy of a large field, not two
                return bytes(view[start:stop])
        return bytes(buf[start:stop])

    def bin(self) -> bytes:
        return self._bytes(self.max_payload, "payload")

    def name(self) -> str:
        return self._bytes(self.max_name, "name").decode("utf-8", "surrogateescape")

    def text(self) -> str:
        return self._bytes(self.max_payload, "text").decode("utf-8", "surrogateescape")


P = TypeVar("P")


def _reply_from_client(r: _Reader) -> Reply | Fault:
    request_id = r.varint()
    if r.bool():
        return Reply(request_id, r.bin())
    return Fault(request_id, r.text())


_CLIENT_PARSERS: dict[int, Callable[[_Reader], ClientPacket]] = {
    OP_INIT: lambda r: Init(magic=r.name(), version=r.name(), cluster=r.name()),
    OP_CLOSE: lambda r: Close(),
    OP_BROADCAST: lambda r: Broadcast(r.name(), r.bin()),
    OP_REQUEST: lambda r: Request(r.varint(), r.name(), r.bin(), r.varint()),
    OP_REPLY: _reply_from_client,
    OP_SUBSCRIBE: lambda r: Subscribe(r.name()),
    OP_UNSUBSCRIBE: lambda r: Unsubscribe(r.name()),
    OP_PUBLISH: lambda r: Publish(r.name(), r.bin()),
    OP_TUN_INIT: lambda r: TunnelInit(r.varint(), r.name(), r.varint()),
    OP_TUN_CONFIRM: lambda r: TunnelConfirm(r.varint(), r.varint()),
    OP_TUN_ALLOW: lambda r: TunnelAllow(r.varint(), r.varint()),
    OP_TUN_TRANSFER: lambda r: TunnelTransfer(r.varint(), r.varint(), r.bin()),
    OP_TUN_CLOSE: lambda r: TunnelClose(r.varint()),
}


def _reply_from_node(r: _Reader) -> Replied | Faulted | TimedOut:
    request_id = r.varint()
    if r.bool():
        return TimedOut(request_id)
    if r.bool():
        return Replied(request_id, r.bin())
    return Faulted(request_id, r.text())


def _tunnel_result(r: _Reader) -> TunnelConfirmed | TunnelFailed:
    tunnel_id = r.varint()
    if r.bool():
        return TunnelFailed(tunnel_id)
    return TunnelConfirmed(tunnel_id, r.varint())


_NODE_PARSERS: dict[int, Callable[[_Reader], NodePacket]] = {
    OP_INIT: lambda r: Accepted(magic=r.name(), version=r.name()),
    OP_DENY: lambda r: Denied(magic=r.name(), reason=r.text()),
    OP_CLOSE: lambda r: Closed(r.text()),
    OP_BROADCAST: lambda r: BroadcastDelivered(r.bin()),
    OP_REQUEST: lambda r: RequestDelivered(r.varint(), r.bin(), r.varint()),
    OP_REPLY: _reply_from_node,
    OP_PUBLISH: lambda r: Publish(r.name(), r.bin()),
    OP_TUN_INIT: lambda r: TunnelOffered(r.varint(), r.varint()),
    OP_TUN_CONFIRM: _tunnel_result,
    OP_TUN_ALLOW: lambda r: TunnelAllow(r.varint(), r.varint()),
    OP_TUN_TRANSFER: lambda r: TunnelTransfer(r.varint(), r.varint(), r.bin()),
    OP_TUN_CLOSE: lambda r: TunnelClosed(r.varint(), r.text()),
}


class Decoder(Generic[P]):
    """Turns a byte stream of one direction into packets.

    ``feed(data)`` returns every packet completed by ``data`` (possibly none); a
    partial packet stays buffered until the rest arrives. When the stream breaks
    the grammar or a limit, ``feed`` still returns the good packets that came
    before the fault and sets :attr:`error`; handle those packets, then drop the
    connection with ``str(error)``. Feeding a broken stream again raises the error.
    """

    def __init__(
        self,
        parsers: dict[int, Callable[[_Reader], P]],
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_name: int = DEFAULT_MAX_NAME,
    ) -> None:
        if max_payload < 0 or max_name < 0:
            raise ValueError("limits must not be negative")
        self._parsers = parsers
        self._reader = _Reader(max_payload, max_name)
        self._pending = bytearray()
        self._need = 0
        self.error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a packet that has not completely arrived yet."""
        return len(self._pending)

    @property
    def partial_need(self) -> int:
        """Bytes the packet in progress takes in all, as far as its lengths tell so far.

        At least :attr:`buffered` (one more, when only a length or a flag is missing);
        0 with no packet in progress. A holder of many connections can count what
        their packets are about to take before the bytes arrive.
        """
        return max(self._need, len(self._pending) + 1) if self._pending else 0

    @property
    def partial_opcode(self) -> int | None:
        """The opcode of the packet in progress, if any."""
        return self._pending[0] if self._pending else None

    def feed(self, data: bytes) -> list[P]:
        if self.error is not None:
            raise self.error
        pending = self._pending
        if pending:
            pending += data
            buf: bytes | bytearray = pending
        else:
            buf = data
        reader = self._reader
        reader.buf = buf
        reader.end = end = len(buf)
        reader.need = 0
        parsers = self._parsers
        packets: list[P] = []
        start = 0
        try:
            while start < end:
                opcode = buf[start]
                parse = parsers.get(opcode)
                if parse is None:
                    raise RemoteProtocolError(f"unknown opcode 0x{opcode:02x}")
                reader.pos = start + 1
                packets.append(parse(reader))
                start = reader.pos
        except _Incomplete:
            self._need = reader.need - start
        except RemoteProtocolError as error:
            self.error = error
            pending.clear()
            return packets
        finally:
            reader.buf = b""
        if pending:
            del pending[:start]
        elif start < end:
            pending += buf[start:]
        return packets


def node_decoder(
    *, max_payload: int = DEFAULT_MAX_PAYLOAD, max_name: int = DEFAULT_MAX_NAME
) -> Decoder[ClientPacket]:
    """Decoder for the node side: parses C→N packets."""
    return Decoder(_CLIENT_PARSERS, max_payload=max_payload, max_name=max_name)


def client_decoder(
    *, max_payload: int = DEFAULT_MAX_PAYLOAD, max_name: int = DEFAULT_MAX_NAME
) -> Decoder[NodePacket]:
    """Decoder for the binding side: parses N→C packets."""
    return Decoder(_NODE_PARSERS, max_payload=max_payload, max_name=max_name)
