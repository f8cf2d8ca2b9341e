"""The node side of one relay connection: handshake, then packets into the node's messaging.

Pure: bytes come in with ``now``; writes and the end of the connection go out through
a :class:`Wire` that the adapter (``relay/server.py``) provides, so a test can drive a
session with a list for a wire. The session is also the node's
:class:`~irisnode.api.Endpoint` for this connection: deliveries become N→C packets.

States: ``awaiting-init`` → ``open`` → ``closed``. The node-side bugs listed in
spec §16 are fixed here without changing a byte: a silent handshake only times out
its own connection, unsubscribing an unknown topic is ignored, TUN_CLOSE for an
unknown tunnel is answered, a late TUN_CONFIRM closes only that tunnel, an empty
fault is still a fault.

Deadlines: the handshake must arrive within ``handshake_seconds``, and after it
every packet that has begun must be complete within ``packet_seconds`` of reading
time (time the adapter spends not reading the connection does not count).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from relay import codec
from relay.codec import (
    CLIENT_MAGIC,
    PROTOCOL_VERSION,
    Broadcast,
    Close,
    Fault,
    Init,
    Publish,
    Reply,
    Request,
    Subscribe,
    TunnelAllow,
    TunnelClose,
    TunnelConfirm,
    TunnelInit,
    TunnelTransfer,
    Unsubscribe,
    encode_bin,
    encode_str,
    encode_varint,
)
from relay.errors import RemoteProtocolError
from relay.ports import DEFAULT_CHUNK_LIMIT, LimitExceeded, Messaging, TunnelEnd

HANDSHAKE_SECONDS = 5.0
PACKET_SECONDS = 10.0
PACKETS_PER_TURN = 256
"""Packets of one connection handled per reactor turn: a client pipelining thousands of
cheap requests gets its share, and every other client still gets a turn in between."""


class Wire(Protocol):
    """What a session needs from its connection."""

    @property
    def congested(self) -> bool:
        """True while the client is not reading as fast as it is written to."""
        ...

    @property
    def overloaded(self) -> bool:
        """True when the client is so far behind that fan-out deliveries must be dropped."""
        ...

    def write(self, data: bytes) -> None: ...

    def drop_delivery(self, kind: str) -> None:
        """A ``kind`` delivery was dropped because the client is overloaded: count and log it."""

    def close(self) -> None:
        """Close after everything written so far has been sent."""

    def abort(self, reason: str) -> None:
        """The client misbehaved or timed out: log ``reason`` and close."""


class State(enum.Enum):
    AWAITING_INIT = "awaiting-init"
    OPEN = "open"
    CLOSED = "closed"


class _Placeholder:
    """A tunnel id the client has asked for whose tunnel is not built yet."""


_BUILDING = _Placeholder()


class SharedEncoding:
    """Encodes a broadcast or event once for all the sessions it fans out to.

    The node delivers one payload object to every receiver in turn, so the last
    encoding is kept (``*_key`` is the payload it encodes) and reused while the same
    object comes back. The owner calls :meth:`forget` once the fan-out is over (the
    relay server does, after each reactor turn's writes), so no payload outlives the
    turn that delivered it.
    """

    __slots__ = ("broadcast_bytes", "broadcast_key", "event_bytes", "event_key", "event_topic")

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        self.broadcast_key: bytes | None = None
        self.broadcast_bytes = b""
        self.event_key: bytes | None = None
        self.event_topic = ""
        self.event_bytes = b""

    def encode_broadcast(self, message: bytes) -> None:
        self.broadcast_key = message
        self.broadcast_bytes = b"".join((b"\x03", encode_varint(len(message)), message))

    def encode_event(self, topic: str, event: bytes) -> None:
        self.event_key = event
        self.event_topic = topic
        self.event_bytes = b"".join((b"\x08", encode_str(topic), encode_varint(len(event)), event))


def _nothing_reserved(name: str) -> bool:
    return False


class RelaySession:
    """One client connection as seen by the node."""

    def __init__(
        self,
        messaging: Messaging,
        wire: Wire,
        now: float,
        *,
        max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
        max_name: int = codec.DEFAULT_MAX_NAME,
        chunk_limit: int = DEFAULT_CHUNK_LIMIT,
        handshake_seconds: float = HANDSHAKE_SECONDS,
        packet_seconds: float = PACKET_SECONDS,
        packets_per_turn: int = PACKETS_PER_TURN,
        shared: SharedEncoding | None = None,
        reserved: Callable[[str], bool] = _nothing_reserved,
    ) -> None:
        self._reserved = reserved
        """Cluster names the node keeps for itself: an INIT for one is denied."""
        self._messaging = messaging
        self._wire = wire
        self._decoder = codec.node_decoder(max_payload=max_payload, max_name=max_name)
        self._chunk_limit = chunk_limit
        self._handshake_deadline: float | None = now + handshake_seconds
        self._packet_seconds = packet_seconds
        self._packet_deadline: float | None = None
        self._packets_per_turn = packets_per_turn
        self.unhandled: list[Any] = []
        """Packets that have arrived and wait for :meth:`handle_more` (this turn's share is done)."""
        self.partial_need = 0
        """Bytes the packet in progress takes in all, as far as known so far; 0 if none."""
        self._shared = shared if shared is not None else SharedEncoding()
        self.requests = 0
        """REQUEST packets handled so far (the adapter watches it for the request budget)."""
        self.state = State.AWAITING_INIT
        self.cluster = ""
        self._tunnels: dict[int, TunnelEnd | _Placeholder] = {}
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            Request: self._on_request,
            Reply: self._on_reply,
            Fault: self._on_fault,
            Broadcast: self._on_broadcast,
            Publish: self._on_publish,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
            TunnelInit: self._on_tunnel_init,
            TunnelConfirm: self._on_tunnel_confirm,
            TunnelAllow: self._on_tunnel_allow,
            TunnelTransfer: self._on_tunnel_transfer,
            TunnelClose: self._on_tunnel_close,
            Close: self._on_close,
            Init: self._on_second_init,
        }

    # -- input from the adapter --------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def data_received(self, data: bytes, now: float) -> None:
        """Handle what ``data`` completes: at most ``packets_per_turn`` packets now, the rest
        when :meth:`handle_more` is called (the adapter stops reading meanwhile)."""
        if self.closed or self._decoder.error is not None:
            return  # a broken stream is dropped once the packets before the fault are handled
        decoder = self._decoder
        packets = decoder.feed(data)
        if not decoder.buffered:
            self._packet_deadline = None
        elif packets or self._packet_deadline is None:
            self._packet_deadline = now + self._packet_seconds  # a new packet has begun
        self.partial_need = decoder.partial_need
        if self.unhandled:
            self.unhandled += packets
        else:
            self.unhandled = packets
        self.handle_more(now)

    def handle_more(self, now: float) -> None:
        """Handle the next share of the packets that have arrived."""
        packets = self.unhandled
        share = self._packets_per_turn
        if len(packets) > share:
            self.unhandled = packets[share:]
            packets = packets[:share]
        else:
            self.unhandled = []
        try:
            for packet in packets:
                state = self.state
                if state is State.OPEN:
                    self._handlers[type(packet)](packet, now)
                elif state is State.AWAITING_INIT:
                    self._handshake(packet)
                else:
                    self.unhandled = []
                    return  # whatever follows a close is ignored
        except (RemoteProtocolError, LimitExceeded) as error:
            self.unhandled = []
            self._drop(str(error))
            return
        if self._decoder.error is not None and not self.unhandled and not self.closed:
            self._drop(str(self._decoder.error))  # after the good packets that came before it

    @property
    def partial_request(self) -> bool:
        """Whether the packet in progress is a REQUEST."""
        return self._decoder.partial_opcode == codec.OP_REQUEST

    def connection_lost(self) -> None:
        """The socket is gone (client hung up, or we closed it)."""
        self.unhandled = []
        if self.state is State.OPEN:
            self._detach("connection lost")
        self.state = State.CLOSED

    def next_deadline(self) -> float | None:
        if self.state is State.AWAITING_INIT:
            return self._handshake_deadline
        return self._packet_deadline if self.state is State.OPEN else None

    def on_timer(self, now: float) -> None:
        if self.state is State.AWAITING_INIT:
            deadline = self._handshake_deadline
            if deadline is not None and now >= deadline:
                self.state = State.CLOSED
                self._wire.abort("no handshake before the deadline")
        elif self.state is State.OPEN:
            deadline = self._packet_deadline
            if deadline is not None and now >= deadline:
                self._drop(f"a packet took more than {self._packet_seconds:g} s to arrive")

    def reading_resumed(self, now: float) -> None:
        """The adapter reads the connection again after a pause: the packet deadline restarts."""
        if self._packet_deadline is not None:
            self._packet_deadline = now + self._packet_seconds

    def shut_down(self, reason: str) -> None:
        """The node is stopping: tell the client why and close after the last write."""
        if self.state is State.OPEN:
            self._detach(reason)
            self._wire.write(codec.Closed(reason).encode())
        self.state = State.CLOSED
        self._wire.close()

    def resumed(self) -> None:
        """The client caught up: let held-back requests and tunnel data flow again."""
        if self.state is not State.OPEN:
            return
        self._messaging.caught_up(self)
        for end in list(self._tunnels.values()):
            if not isinstance(end, _Placeholder):
                end.resume()

    # -- handshake and teardown -----------------------------------------------------------

    def _handshake(self, packet: object) -> None:
        if not isinstance(packet, Init):
            raise RemoteProtocolError(f"expected INIT, got {type(packet).__name__}")
        self._handshake_deadline = None
        if packet.magic != CLIENT_MAGIC:
            self.state = State.CLOSED
            self._wire.abort(f"bad magic {packet.magic!r}")
            return
        if packet.version != PROTOCOL_VERSION:
            self.state = State.CLOSED
            reason = f"Unsupported protocol. Client: {packet.version}. Iris: {PROTOCOL_VERSION}."
            self._wire.write(codec.Denied(reason).encode())
            self._wire.abort(f"unsupported protocol version {packet.version!r}")
            return
        if self._reserved(packet.cluster):
            self.state = State.CLOSED
            self._wire.write(
                codec.Denied(
                    f"cluster name {packet.cluster[:64]!r} is reserved for the node"
                ).encode()
            )
            self._wire.abort(f"tried to register reserved cluster {packet.cluster!r}")
            return
        self.cluster = packet.cluster
        self.state = State.OPEN
        self._wire.write(codec.Accepted().encode())
        self._messaging.attach(self, packet.cluster)  # may deliver waiting requests at once

    def _on_second_init(self, packet: Init, now: float) -> None:
        raise RemoteProtocolError("INIT after the handshake")

    def _on_close(self, packet: Close, now: float) -> None:
        self._detach("")
        self.state = State.CLOSED
        self._wire.write(codec.Closed("").encode())
        self._wire.close()

    def _drop(self, reason: str) -> None:
        """The client broke the protocol: tell it why (bindings report it as a drop) and close."""
        was_open = self.state is State.OPEN
        self.state = State.CLOSED
        if was_open:
            self._detach(reason)
            self._wire.write(codec.Closed(reason).encode())
        self._wire.abort(reason)

    def _detach(self, reason: str) -> None:
        self.state = State.CLOSED  # what the detach sends back to us is not for the client
        self._messaging.detach(self, reason)
        tunnels, self._tunnels = self._tunnels, {}
        for end in tunnels.values():
            if not isinstance(end, _Placeholder):
                end.close(reason)

    # -- C→N packets ---------------------------------------------------------------------

    def _on_request(self, packet: Request, now: float) -> None:
        self.requests += 1
        self._messaging.request(
            self, packet.request_id, packet.cluster, packet.request, packet.timeout_ms, now
        )

    def _on_reply(self, packet: Reply, now: float) -> None:
        self._messaging.reply(self, packet.request_id, packet.reply)

    def _on_fault(self, packet: Fault, now: float) -> None:
        self._messaging.fault(self, packet.request_id, packet.fault)

    def _on_broadcast(self, packet: Broadcast, now: float) -> None:
        self._messaging.broadcast(packet.cluster, packet.message)

    def _on_publish(self, packet: Publish, now: float) -> None:
        self._messaging.publish(packet.topic, packet.event)

    def _on_subscribe(self, packet: Subscribe, now: float) -> None:
        self._messaging.subscribe(self, packet.topic)

    def _on_unsubscribe(self, packet: Unsubscribe, now: float) -> None:
        self._messaging.unsubscribe(self, packet.topic)  # unknown topic: nothing to undo

    def _on_tunnel_init(self, packet: TunnelInit, now: float) -> None:
        if packet.tunnel_id in self._tunnels:
            raise RemoteProtocolError(f"tunnel id {packet.tunnel_id} is already in use")
        self._tunnels[packet.tunnel_id] = _BUILDING
        self._messaging.open_tunnel(self, packet.tunnel_id, packet.cluster, packet.timeout_ms, now)

    def _on_tunnel_confirm(self, packet: TunnelConfirm, now: float) -> None:
        if packet.tunnel_id in self._tunnels:
            raise RemoteProtocolError(f"tunnel id {packet.tunnel_id} is already in use")
        end = self._messaging.confirm_tunnel(self, packet.build_id, packet.tunnel_id)
        if end is None:
            self._write_tunnel_closed(packet.tunnel_id, "tunnel offer expired")
        else:
            self._tunnels[packet.tunnel_id] = end

    def _on_tunnel_allow(self, packet: TunnelAllow, now: float) -> None:
        end = self._tunnels.get(packet.tunnel_id)
        if end is not None and not isinstance(end, _Placeholder):
            end.allow(packet.size)

    def _on_tunnel_transfer(self, packet: TunnelTransfer, now: float) -> None:
        if len(packet.chunk) > self._chunk_limit:
            raise RemoteProtocolError(
                f"tunnel chunk of {len(packet.chunk)} bytes exceeds the limit of "
                f"{self._chunk_limit}"
            )
        end = self._tunnels.get(packet.tunnel_id)
        if end is not None and not isinstance(end, _Placeholder):
            end.transfer(packet.size_or_cont, packet.chunk)

    def _on_tunnel_close(self, packet: TunnelClose, now: float) -> None:
        end = self._tunnels.get(packet.tunnel_id)
        if end is None or isinstance(end, _Placeholder):
            if end is not None:  # still being built: give it up, so it never opens
                del self._tunnels[packet.tunnel_id]
                self._messaging.cancel_tunnel(self, packet.tunnel_id)
            # Unknown (or already closed) tunnel: still answer, so a client waiting
            # for the acknowledgement never hangs.
            self._write_tunnel_closed(packet.tunnel_id, "")
        else:
            end.close()

    # -- deliveries from the node (Endpoint) --------------------------------------------

    @property
    def congested(self) -> bool:
        return self._wire.congested

    def deliver_request(self, handle: int, request: bytes, timeout_ms: int) -> None:
        if self.state is State.OPEN:
            self._wire.write(
                b"".join(
                    (
                        b"\x04",
                        encode_varint(handle),
                        encode_varint(len(request)),
                        request,
                        encode_varint(timeout_ms),
                    )
                )
            )

    def request_replied(self, request_id: int, reply: bytes) -> None:
        if self.state is State.OPEN:
            self._wire.write(
                b"".join(
                    (
                        b"\x05",
                        encode_varint(request_id),
                        b"\x00\x01",
                        encode_varint(len(reply)),
                        reply,
                    )
                )
            )

    def request_faulted(self, request_id: int, fault: str) -> None:
        if self.state is State.OPEN:
            self._wire.write(codec.Faulted(request_id, fault).encode())

    def request_timed_out(self, request_id: int) -> None:
        if self.state is State.OPEN:
            self._wire.write(b"\x05" + encode_varint(request_id) + b"\x01")

    def deliver_broadcast(self, message: bytes) -> None:
        if self.state is State.OPEN:
            if self._wire.overloaded:
                self._wire.drop_delivery("broadcast")
                return
            shared = self._shared
            if shared.broadcast_key is not message:
                shared.encode_broadcast(message)
            self._wire.write(shared.broadcast_bytes)

    def deliver_event(self, topic: str, event: bytes) -> None:
        if self.state is State.OPEN:
            if self._wire.overloaded:
                self._wire.drop_delivery("event")
                return
            shared = self._shared
            if shared.event_key is not event or shared.event_topic != topic:
                shared.encode_event(topic, event)
            self._wire.write(shared.event_bytes)

    def offer_tunnel(self, offer: int, chunk_limit: int) -> None:
        if self.state is State.OPEN:
            self._wire.write(codec.TunnelOffered(offer, chunk_limit).encode())

    def tunnel_opened(self, tunnel_id: int, tunnel: TunnelEnd, chunk_limit: int) -> None:
        if self.state is State.OPEN:
            self._tunnels[tunnel_id] = tunnel
            self._wire.write(codec.TunnelConfirmed(tunnel_id, chunk_limit).encode())
        else:
            tunnel.close("connection closed")

    def tunnel_failed(self, tunnel_id: int) -> None:
        if self.state is State.OPEN:
            self._tunnels.pop(tunnel_id, None)
            self._wire.write(codec.TunnelFailed(tunnel_id).encode())

    def tunnel_transfer(self, tunnel_id: int, size_or_cont: int, chunk: bytes) -> None:
        if self.state is State.OPEN:
            self._wire.write(
                b"\x0c" + encode_varint(tunnel_id) + encode_varint(size_or_cont) + encode_bin(chunk)
            )

    def tunnel_allow(self, tunnel_id: int, size: int) -> None:
        if self.state is State.OPEN:
            self._wire.write(b"\x0b" + encode_varint(tunnel_id) + encode_varint(size))

    def tunnel_closed(self, tunnel_id: int, reason: str) -> None:
        if self.state is State.OPEN:
            self._tunnels.pop(tunnel_id, None)
            self._write_tunnel_closed(tunnel_id, reason)

    def _write_tunnel_closed(self, tunnel_id: int, reason: str) -> None:
        self._wire.write(codec.TunnelClosed(tunnel_id, reason).encode())
