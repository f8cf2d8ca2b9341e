"""The client side of one relay connection, without I/O (spec sections 4-10).

:class:`ClientCore` is a state machine in the style of h11/wsproto: feed it the
bytes the node sent with :meth:`~ClientCore.receive_data`, call its commands
(``request``, ``subscribe``, ``tunnel_send`` ...), then collect what it produced:
:meth:`~ClientCore.data_to_send` for the socket and
:meth:`~ClientCore.take_events` for the application. It never reads a clock:
every input that starts or checks a timer takes ``now`` (seconds, any monotonic
origin), and :meth:`~ClientCore.next_deadline` / :meth:`~ClientCore.on_timer`
let one adapter timer drive all of them.

What it guarantees, so that adapters stay thin:

* every request ends in exactly one of ``ReplyReceived``, ``FaultReceived``,
  ``RequestTimedOut`` or ``RequestAborted``; a late REPLY for an id it no longer
  tracks is ignored (the Go binding's B7);
* every outbound tunnel ends in ``TunnelOpened`` or ``TunnelOpenFailed``; every
  tunnel send in ``TunnelSent`` or ``TunnelSendFailed``; every tunnel that was
  open ends in exactly one ``TunnelClosed``;
* ``ConnectionClosed`` is the last event, after all of the above were settled;
* an inbound tunnel offer is confirmed and granted its window at once, whatever
  the application is doing (the node drops connections that take over 3 s);
* local refusals (double subscribe, unsubscribing an unknown topic) never reach
  the wire (the Go binding's B3).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from relay import codec
from relay.client import errors
from relay.errors import LocalProtocolError

DEFAULT_TUNNEL_WINDOW = 64 * 1024 * 1024
"""Bytes a binding lets the node send on a tunnel before it consumes any (the Go value)."""

DEFAULT_REPLY_GRACE = 2.0
"""Seconds past a request's (or tunnel set-up's) own timeout before we stop waiting for the node."""

DEFAULT_CLOSE_GRACE = 10.0
"""Seconds we wait for the node to acknowledge a connection or tunnel close."""

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds we wait for the node to answer INIT (the Go binding waited forever)."""


class State(enum.Enum):
    AWAITING_ACCEPT = "awaiting accept"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# --------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Connected:
    """The node accepted the handshake."""

    version: str


@dataclass(frozen=True, slots=True)
class Denied:
    """The node refused the handshake; a ``ConnectionClosed`` follows."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over; always the last event.

    ``graceful`` when the node acknowledged a close (or closed with an empty
    reason); ``violation`` when the node broke the protocol and we dropped it.
    """

    reason: str
    graceful: bool
    violation: bool = False


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """The node delivers a request to this service; answer with ``reply`` or ``fault``."""

    request_id: int
    request: bytes
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class BroadcastReceived:
    message: bytes


@dataclass(frozen=True, slots=True)
class EventReceived:
    topic: str
    event: bytes


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    request_id: int
    reply: bytes


@dataclass(frozen=True, slots=True)
class FaultReceived:
    request_id: int
    fault: str


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    """The node reported a timeout, or it stayed silent past our safety margin."""

    request_id: int


@dataclass(frozen=True, slots=True)
class RequestAborted:
    """The connection ended while the request was outstanding; ``reason`` empty if gracefully."""

    request_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelOffered:
    """A remote party opened a tunnel to this service; it is already confirmed and open."""

    tunnel_id: int
    chunk_limit: int


@dataclass(frozen=True, slots=True)
class TunnelOpened:
    tunnel_id: int
    chunk_limit: int


@dataclass(frozen=True, slots=True)
class TunnelOpenFailed:
    """``timed_out``: the node found no member in time (or did not answer at all).

    Otherwise the connection ended first; ``reason`` is empty if it ended gracefully.
    """

    tunnel_id: int
    timed_out: bool
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelData:
    """A complete message; grant its size back with ``tunnel_consumed`` once it is used."""

    tunnel_id: int
    message: bytes


@dataclass(frozen=True, slots=True)
class TunnelSent:
    """Every chunk of send ``send_id`` has been handed to the connection."""

    tunnel_id: int
    send_id: int


@dataclass(frozen=True, slots=True)
class TunnelSendFailed:
    """``timed_out``: credit did not arrive in time; otherwise the tunnel closed first."""

    tunnel_id: int
    send_id: int
    timed_out: bool


@dataclass(frozen=True, slots=True)
class TunnelClosed:
    """The tunnel is gone; ``reason`` is empty when it ended normally."""

    tunnel_id: int
    reason: str


Event = (
    Connected
    | Denied
    | ConnectionClosed
    | RequestReceived
    | BroadcastReceived
    | EventReceived
    | ReplyReceived
    | FaultReceived
    | RequestTimedOut
    | RequestAborted
    | TunnelOffered
    | TunnelOpened
    | TunnelOpenFailed
    | TunnelData
    | TunnelSent
    | TunnelSendFailed
    | TunnelClosed
)


# --------------------------------------------------------------------------------
# Argument checks shared by every API


def timeout_to_ms(timeout: float) -> int:
    """Seconds to the wire's whole milliseconds, truncated like the Go binding; at least 1."""
    if not math.isfinite(timeout):
        raise ValueError(f"timeout must be a finite number of seconds, got {timeout!r}")
    ms = round(timeout * 1_000_000) // 1000  # via microseconds: 0.57 s is 570 ms, not 569
    if ms < 1:
        raise ValueError(f"timeout must be at least 1 ms, got {timeout!r} s")
    if ms >= 1 << 64:
        raise ValueError(f"timeout is too large: {timeout!r} s")
    return ms


def _name(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"empty {what}")
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > codec.DEFAULT_MAX_NAME:
        # The node would drop the whole connection over it.
        raise ValueError(f"{what} of {size} bytes exceeds {codec.DEFAULT_MAX_NAME}")
    return value


def _payload(value: bytes, what: str, limit: int | None = None) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
    if not value:
        raise ValueError(f"empty {what}")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{what} of {len(value)} bytes exceeds the limit of {limit}")
    return bytes(value)


# --------------------------------------------------------------------------------
# Internal state


class _TunnelState(enum.Enum):
    OPENING = "opening"  # our TUN_INIT is waiting for TUN_CONFIRM
    OPEN = "open"
    CLOSING = "closing"  # our TUN_CLOSE is waiting for the node's TUN_CLOSE


@dataclass(slots=True)
class _Outgoing:
    send_id: int
    message: bytes
    offset: int = 0


@dataclass(slots=True)
class _Tunnel:
    state: _TunnelState
    chunk_limit: int = 0
    credit: int = 0  # signed: spec A4
    outbox: deque[_Outgoing] = field(default_factory=deque)
    partial: bytearray | None = None
    expected: int = 0


_Key = tuple[str, int]


class _Deadlines:
    """Named deadlines in a heap with lazy deletion, so thousands of timers stay cheap."""

    __slots__ = ("_heap", "_seq", "_when")

    def __init__(self) -> None:
        self._when: dict[_Key, float] = {}
        self._heap: list[tuple[float, int, _Key]] = []
        self._seq = itertools.count()

    def set(self, key: _Key, when: float) -> None:
        self._when[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))

    def cancel(self, key: _Key) -> None:
        self._when.pop(key, None)

    def next(self) -> float | None:
        heap = self._heap
        while heap and self._when.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_expired(self, now: float) -> list[_Key]:
        expired = []
        while (when := self.next()) is not None and when <= now:
            key = heapq.heappop(self._heap)[2]
            del self._when[key]
            expired.append(key)
        return expired

    def clear(self) -> None:
        self._when.clear()
        self._heap.clear()


# --------------------------------------------------------------------------------
# The core


class ClientCore:
    """One client connection to a node: handshake, requests, topics, tunnels.

    ``cluster`` non-empty registers the connection as a member of that cluster
    (a service); only services may receive requests, broadcasts and tunnels.
    The INIT packet is ready in :meth:`data_to_send` from the start.
    """

    def __init__(
        self,
        cluster: str = "",
        *,
        tunnel_window: int = DEFAULT_TUNNEL_WINDOW,
        reply_grace: float = DEFAULT_REPLY_GRACE,
        close_grace: float = DEFAULT_CLOSE_GRACE,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
    ) -> None:
        if not isinstance(cluster, str):
            raise TypeError("cluster must be a str")
        if tunnel_window < 1:
            raise ValueError("tunnel_window must be at least 1 byte")
        if reply_grace < 0 or close_grace < 0 or handshake_timeout < 0:
            raise ValueError("grace periods and timeouts must not be negative")
        self.cluster = cluster
        self.state = State.AWAITING_ACCEPT
        self._tunnel_window = tunnel_window
        self._reply_grace = reply_grace
        self._close_grace = close_grace
        self._handshake_timeout = handshake_timeout
        self._max_payload = max_payload
        """Largest request, message or event we send, and accept (the node's decoder limit)."""
        self._decoder = codec.client_decoder(max_payload=max_payload)
        self._out = bytearray(codec.Init(cluster).encode())
        self._events: list[Event] = []
        self._timers = _Deadlines()
        self._requests: set[int] = set()
        self._next_request_id = 0
        self._topics: set[str] = set()
        self._tunnels: dict[int, _Tunnel] = {}
        self._next_tunnel_id = 0
        self._sends: dict[int, int] = {}  # send id -> tunnel id
        self._next_send_id = 0

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def is_service(self) -> bool:
        return bool(self.cluster)

    # ---- output ------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket, in order; empties the buffer."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def take_events(self) -> list[Event]:
        """Events produced since the last call, in order; empties the list."""
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        return self._timers.next()

    # ---- connection ----------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The socket is up (INIT goes out now): start waiting for the node's answer."""
        if self.state is State.AWAITING_ACCEPT:
            self._timers.set(("connection", 0), now + self._handshake_timeout)

    def close(self, now: float) -> None:
        """Ask the node for a graceful close; ``ConnectionClosed`` follows its acknowledgement."""
        if self.state is State.AWAITING_ACCEPT:
            self._terminate("closed before the handshake completed", graceful=True)
        elif self.state is State.OPEN:
            self._send(codec.Close())
            self.state = State.CLOSING
            self._timers.set(("connection", 0), now + self._close_grace)

    def connection_lost(self, reason: str) -> None:
        """The socket is gone (the node never closes it on purpose before its CLOSE)."""
        if self.state is not State.CLOSED:
            self._terminate(reason or "connection lost", graceful=False)

    def receive_data(self, data: bytes, now: float) -> None:
        if self.state is State.CLOSED:
            return  # after CLOSE (either way) nothing more is read
        packets = self._decoder.feed(data)
        for packet in packets:
            if self.closed:
                return
            self._handle(packet, now)
        error = self._decoder.error
        if error is not None and not self.closed:
            self._violation(str(error))

    def on_timer(self, now: float) -> None:
        for kind, ident in self._timers.pop_expired(now):
            if self.state is State.CLOSED:
                return
            if kind == "request":
                self._requests.discard(ident)
                self._emit(RequestTimedOut(ident))
            elif kind == "open":
                del self._tunnels[ident]
                self._emit(
                    TunnelOpenFailed(ident, True, "the node did not answer the tunnel set-up")
                )
            elif kind == "send":
                self._expire_send(ident)
            elif kind == "tunnel-close":
                del self._tunnels[ident]
                self._emit(TunnelClosed(ident, ""))
            elif self.state is State.AWAITING_ACCEPT:
                self._terminate("the node did not answer the handshake in time", graceful=False)
            else:
                self._terminate("the node did not acknowledge the close", graceful=False)

    # ---- requests, broadcasts, topics ------------------------------------------------

    def request(self, cluster: str, data: bytes, timeout: float, now: float) -> int:
        """Send a request; returns its id, which names its one outcome event."""
        cluster = _name(cluster, "cluster name")
        data = _payload(data, "request", self._max_payload)
        timeout_ms = timeout_to_ms(timeout)
        self._check_open()
        request_id = self._next_request_id
        self._next_request_id += 1
        self._requests.add(request_id)
        self._send(codec.Request(request_id, cluster, data, timeout_ms))
        self._timers.set(("request", request_id), now + timeout_ms / 1000 + self._reply_grace)
        return request_id

    def reply(self, request_id: int, reply: bytes) -> None:
        """Answer a delivered request; an empty reply is a valid success."""
        if not isinstance(reply, bytes | bytearray | memoryview):
            raise TypeError(f"reply must be bytes, got {type(reply).__name__}")
        if len(reply) > self._max_payload:
            raise ValueError(
                f"reply of {len(reply)} bytes exceeds the limit of {self._max_payload}"
            )
        if self.state is not State.CLOSED:  # the node drains replies while closing
            self._send(codec.Reply(request_id, bytes(reply)))

    def fault(self, request_id: int, fault: str) -> None:
        """Fail a delivered request; the requester sees ``fault`` verbatim."""
        if not fault:
            # The node takes an empty fault for "no answer" (spec B4).
            raise ValueError("empty fault text")
        if self.state is not State.CLOSED:
            self._send(codec.Fault(request_id, fault))

    def broadcast(self, cluster: str, message: bytes) -> None:
        cluster = _name(cluster, "cluster name")
        message = _payload(message, "message", self._max_payload)
        self._check_open()
        self._send(codec.Broadcast(cluster, message))

    def subscribe(self, topic: str) -> None:
        topic = _name(topic, "topic name")
        self._check_open()
        if topic in self._topics:
            raise ValueError(f"already subscribed to topic {topic!r}")
        self._topics.add(topic)
        self._send(codec.Subscribe(topic))

    def unsubscribe(self, topic: str) -> None:
        topic = _name(topic, "topic name")
        self._check_open()
        if topic not in self._topics:
            raise ValueError(f"not subscribed to topic {topic!r}")
        self._topics.remove(topic)
        self._send(codec.Unsubscribe(topic))

    def publish(self, topic: str, event: bytes) -> None:
        topic = _name(topic, "topic name")
        event = _payload(event, "event", self._max_payload)
        self._check_open()
        self._send(codec.Publish(topic, event))

    # ---- tunnels ---------------------------------------------------------------------

    def open_tunnel(self, cluster: str, timeout: float, now: float) -> int:
        """Ask for a tunnel to one member of ``cluster``; returns the tunnel id."""
        cluster = _name(cluster, "cluster name")
        timeout_ms = timeout_to_ms(timeout)
        self._check_open()
        tunnel_id = self._new_tunnel_id()
        self._tunnels[tunnel_id] = _Tunnel(_TunnelState.OPENING)
        self._send(codec.TunnelInit(tunnel_id, cluster, timeout_ms))
        self._timers.set(("open", tunnel_id), now + timeout_ms / 1000 + self._reply_grace)
        return tunnel_id

    def tunnel_send(
        self, tunnel_id: int, message: bytes, now: float, timeout: float | None = None
    ) -> int:
        """Queue a message; chunks leave as the node grants credit. Returns the send id.

        Messages of one tunnel leave strictly one after another, so concurrent
        senders never interleave chunks. ``timeout`` (seconds, ``None`` = no
        limit) bounds the wait for credit; a message that times out half-sent is
        discarded by the receiver when the next one starts.
        """
        message = _payload(message, "message")  # chunked: any size
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None or tunnel.state is not _TunnelState.OPEN:
            raise errors.ConnectionClosed("tunnel is closed")
        if self.state is not State.OPEN:
            raise errors.ConnectionClosed("connection is closing")
        send_id = self._next_send_id
        self._next_send_id += 1
        tunnel.outbox.append(_Outgoing(send_id, message))
        self._sends[send_id] = tunnel_id
        if timeout is not None:
            self._timers.set(("send", send_id), now + timeout)
        self._flush_tunnel(tunnel_id, tunnel)
        return send_id

    def tunnel_consumed(self, tunnel_id: int, size: int) -> None:
        """The application took a ``size``-byte message: let the node send that much more."""
        tunnel = self._tunnels.get(tunnel_id)
        if size > 0 and tunnel is not None and tunnel.state is _TunnelState.OPEN:
            self._send(codec.TunnelAllow(tunnel_id, size))

    def close_tunnel(self, tunnel_id: int, now: float) -> None:
        """Close an open tunnel; ``TunnelClosed`` follows the node's acknowledgement."""
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None or tunnel.state is not _TunnelState.OPEN:
            return
        tunnel.state = _TunnelState.CLOSING
        tunnel.partial = None
        self._fail_sends(tunnel_id, tunnel)
        self._send(codec.TunnelClose(tunnel_id))
        self._timers.set(("tunnel-close", tunnel_id), now + self._close_grace)

    # ---- internals ---------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _send(self, packet: codec.ClientPacket) -> None:
        self._out += packet.encode()

    def _check_open(self) -> None:
        if self.state is State.OPEN:
            return
        if self.state is State.AWAITING_ACCEPT:
            raise LocalProtocolError("the handshake has not completed yet")
        raise errors.ConnectionClosed(f"connection is {self.state.value}")

    def _new_tunnel_id(self) -> int:
        tunnel_id = self._next_tunnel_id
        self._next_tunnel_id += 1
        return tunnel_id

    def _violation(self, what: str) -> None:
        self._terminate(f"protocol violation: {what}", graceful=False, violation=True)

    def _terminate(self, reason: str, *, graceful: bool, violation: bool = False) -> None:
        """Settle everything still outstanding, then report the end of the connection."""
        self.state = State.CLOSED
        self._out.clear()
        self._timers.clear()
        lost = "" if graceful else f"connection dropped: {reason}"
        for request_id in sorted(self._requests):
            self._emit(RequestAborted(request_id, lost))
        for tunnel_id, tunnel in sorted(self._tunnels.items()):
            if tunnel.state is _TunnelState.OPENING:
                self._emit(TunnelOpenFailed(tunnel_id, False, lost))
                continue
            self._fail_sends(tunnel_id, tunnel)
            # A graceful end, or a close we had asked for, is not a failure (Go's B11).
            self._emit(
                TunnelClosed(tunnel_id, "" if tunnel.state is _TunnelState.CLOSING else lost)
            )
        self._requests.clear()
        self._tunnels.clear()
        self._sends.clear()
        self._topics.clear()
        self._emit(ConnectionClosed(reason, graceful, violation))

    def _handle(self, packet: codec.NodePacket, now: float) -> None:
        if self.state is State.AWAITING_ACCEPT:
            self._handle_handshake(packet)
            return
        match packet:
            case codec.Replied(request_id=request_id, reply=reply):
                if self._settle_request(request_id):
                    self._emit(ReplyReceived(request_id, reply))
            case codec.Faulted(request_id=request_id, fault=fault):
                if self._settle_request(request_id):
                    self._emit(FaultReceived(request_id, fault))
            case codec.TimedOut(request_id=request_id):
                if self._settle_request(request_id):
                    self._emit(RequestTimedOut(request_id))
            case codec.Publish(topic=topic, event=event):
                if topic in self._topics:  # else: in flight across our UNSUBSCRIBE
                    self._emit(EventReceived(topic, event))
            case codec.RequestDelivered(request_id=request_id, request=data, timeout_ms=ms):
                if self._require_service("request"):
                    self._emit(RequestReceived(request_id, data, ms))
            case codec.BroadcastDelivered(message=message):
                if self._require_service("broadcast"):
                    self._emit(BroadcastReceived(message))
            case codec.TunnelOffered(build_id=build_id, chunk_limit=chunk_limit):
                if self._require_service("tunnel offer"):
                    self._on_tunnel_offered(build_id, chunk_limit)
            case codec.TunnelConfirmed(tunnel_id=tunnel_id, chunk_limit=chunk_limit):
                self._on_tunnel_confirmed(tunnel_id, chunk_limit)
            case codec.TunnelFailed(tunnel_id=tunnel_id):
                tunnel = self._tunnels.get(tunnel_id)
                if tunnel is not None and tunnel.state is _TunnelState.OPENING:
                    del self._tunnels[tunnel_id]
                    self._timers.cancel(("open", tunnel_id))
                    self._emit(TunnelOpenFailed(tunnel_id, True, "tunnel set-up timed out"))
            case codec.TunnelAllow(tunnel_id=tunnel_id, size=size):
                tunnel = self._tunnels.get(tunnel_id)
                if tunnel is not None and tunnel.state is not _TunnelState.OPENING:
                    tunnel.credit += size
                    self._flush_tunnel(tunnel_id, tunnel)
            case codec.TunnelTransfer(tunnel_id=tunnel_id, size_or_cont=size, chunk=chunk):
                self._on_transfer(tunnel_id, size, chunk)
            case codec.TunnelClosed(tunnel_id=tunnel_id, reason=reason):
                tunnel = self._tunnels.get(tunnel_id)
                if tunnel is not None and tunnel.state is not _TunnelState.OPENING:
                    del self._tunnels[tunnel_id]
                    self._timers.cancel(("tunnel-close", tunnel_id))
                    self._fail_sends(tunnel_id, tunnel)
                    self._emit(TunnelClosed(tunnel_id, reason))
            case codec.Closed(reason=reason):
                self._terminate(reason, graceful=not reason)
            case _:
                self._violation(f"unexpected {type(packet).__name__} after the handshake")

    def _handle_handshake(self, packet: codec.NodePacket) -> None:
        match packet:
            case codec.Accepted(magic=magic, version=version):
                if magic != codec.RELAY_MAGIC:
                    self._violation(f"bad magic {magic!r} in the init response")
                    return
                self.state = State.OPEN
                self._timers.cancel(("connection", 0))
                self._emit(Connected(version))
            case codec.Denied(magic=magic, reason=reason):
                if magic != codec.RELAY_MAGIC:
                    self._violation(f"bad magic {magic!r} in the init response")
                    return
                self._emit(Denied(reason))
                self._terminate(f"connection denied: {reason}", graceful=False)
            case _:
                self._violation(f"invalid init response {type(packet).__name__}")

    def _require_service(self, what: str) -> bool:
        if not self.is_service:
            self._violation(f"{what} sent to a connection that registered no cluster")
            return False
        return True

    def _settle_request(self, request_id: int) -> bool:
        """True if the request was still waiting; a late or unknown id is ignored."""
        if request_id not in self._requests:
            return False
        self._requests.remove(request_id)
        self._timers.cancel(("request", request_id))
        return True

    def _on_tunnel_offered(self, build_id: int, chunk_limit: int) -> None:
        if chunk_limit < 1:
            self._violation("tunnel offer with a zero chunk limit")
            return
        tunnel_id = self._new_tunnel_id()
        self._send(codec.TunnelConfirm(build_id, tunnel_id))
        if self.state is State.CLOSING:
            # The node must have an answer, but nobody will use this tunnel.
            self._send(codec.TunnelClose(tunnel_id))
            return
        self._tunnels[tunnel_id] = _Tunnel(_TunnelState.OPEN, chunk_limit)
        self._send(codec.TunnelAllow(tunnel_id, self._tunnel_window))
        self._emit(TunnelOffered(tunnel_id, chunk_limit))

    def _on_tunnel_confirmed(self, tunnel_id: int, chunk_limit: int) -> None:
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None or tunnel.state is not _TunnelState.OPENING:
            if tunnel is None and tunnel_id < self._next_tunnel_id:
                # We gave up on it; release the node's side instead of leaking it.
                self._send(codec.TunnelClose(tunnel_id))
            return
        if chunk_limit < 1:
            self._violation("tunnel confirmation with a zero chunk limit")
            return
        self._timers.cancel(("open", tunnel_id))
        tunnel.state = _TunnelState.OPEN
        tunnel.chunk_limit = chunk_limit
        self._send(codec.TunnelAllow(tunnel_id, self._tunnel_window))
        self._emit(TunnelOpened(tunnel_id, chunk_limit))

    def _on_transfer(self, tunnel_id: int, size: int, chunk: bytes) -> None:
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None or tunnel.state is not _TunnelState.OPEN:
            return
        if size:
            if tunnel.partial is not None:
                # A new first chunk abandons the half-received message; return its credit.
                self._send(codec.TunnelAllow(tunnel_id, len(tunnel.partial)))
            tunnel.partial = bytearray()
            tunnel.expected = size
        elif tunnel.partial is None:
            # Continuation with no message in progress (spec A3): drop it, return its credit.
            if chunk:
                self._send(codec.TunnelAllow(tunnel_id, len(chunk)))
            return
        tunnel.partial += chunk
        if len(tunnel.partial) > tunnel.expected:
            self._violation(
                f"tunnel {tunnel_id} message overruns its announced {tunnel.expected} bytes"
            )
            return
        if len(tunnel.partial) == tunnel.expected:
            message = bytes(tunnel.partial)
            tunnel.partial = None
            self._emit(TunnelData(tunnel_id, message))

    def _flush_tunnel(self, tunnel_id: int, tunnel: _Tunnel) -> None:
        """Send chunks while credit lasts; a chunk waits until the whole of it is covered."""
        outbox = tunnel.outbox
        limit = tunnel.chunk_limit
        while outbox:
            out = outbox[0]
            chunk = out.message[out.offset : out.offset + limit]
            if tunnel.credit < len(chunk):
                return
            tunnel.credit -= len(chunk)
            size = len(out.message) if out.offset == 0 else 0
            self._send(codec.TunnelTransfer(tunnel_id, size, chunk))
            out.offset += len(chunk)
            if out.offset == len(out.message):
                outbox.popleft()
                del self._sends[out.send_id]
                self._timers.cancel(("send", out.send_id))
                self._emit(TunnelSent(tunnel_id, out.send_id))

    def _fail_sends(self, tunnel_id: int, tunnel: _Tunnel) -> None:
        for out in tunnel.outbox:
            del self._sends[out.send_id]
            self._timers.cancel(("send", out.send_id))
            self._emit(TunnelSendFailed(tunnel_id, out.send_id, False))
        tunnel.outbox.clear()

    def _expire_send(self, send_id: int) -> None:
        tunnel_id = self._sends.pop(send_id)
        tunnel = self._tunnels[tunnel_id]
        tunnel.outbox = deque(out for out in tunnel.outbox if out.send_id != send_id)
        self._emit(TunnelSendFailed(tunnel_id, send_id, True))
        self._flush_tunnel(tunnel_id, tunnel)  # the next message may fit where this one did not
