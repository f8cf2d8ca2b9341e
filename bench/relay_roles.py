"""What the worker processes do: services, requesters, members, senders, tunnel ends.

Every role follows one shape: connect, ``ctl.ready()``, ``ctl.wait_go()`` for the
measurement window, work, and return a small dict of counts. Load roles stop by
themselves at the end of the window; service roles run until the coordinator says
stop. Every socket read has a timeout, so a misbehaving node ends a role with an
error instead of hanging it.

Hot loops avoid the codec's packet objects where they can: requests are pre-encoded
apart from their id, and deliveries are counted by :class:`~bench.relay_wire.FrameCounter`,
so the generators stay cheap next to the node they measure.
"""

from __future__ import annotations

import os
import select
import socket
import time
from array import array
from typing import Any

from bench.relay_pool import Control, Result, Role
from bench.relay_wire import FrameCounter, RelayError, Wire, connect
from relay.codec import (
    BroadcastDelivered,
    Faulted,
    Publish,
    Replied,
    Reply,
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
    encode_bin,
    encode_str,
    encode_varint,
)

Address = tuple[str, int]

POLL_SECONDS = 0.2
"""How often an idle service looks for the coordinator's stop."""

TUNNEL_GRANT = 64 * 1024 * 1024
"""The receive window a tunnel end grants the node (what the Go binding grants)."""

FLOOD_SNDBUF = 64 * 1024

DRAIN_SECONDS = 1.0
QUIET_SECONDS = 0.05
"""A stopped receiver keeps reading deliveries still on their way until the line has been
quiet this long, but no longer than ``DRAIN_SECONDS``."""

clock = time.monotonic_ns


def _address(value: Any) -> Address:
    host, port = value
    return str(host), int(port)


# -- request / reply --------------------------------------------------------------------


def echo_service(ctl: Control, address: Any, cluster: str) -> Result:
    """A member of ``cluster`` that answers every request with its own payload."""
    wire = Wire(_address(address), cluster)
    try:
        ctl.ready()
        ctl.wait_go()
        watched = [wire.fileno(), ctl.fileno()]
        served = 0
        while True:
            readable, _, _ = select.select(watched, [], [], POLL_SECONDS)
            if (not readable or ctl.fileno() in readable) and ctl.stop_requested():
                break
            if wire.fileno() not in readable:
                continue
            packets = wire.recv()
            replies = [
                Reply(packet.request_id, packet.request).encode()
                for packet in packets
                if type(packet) is RequestDelivered
            ]
            if replies:
                served += len(replies)
                wire.send(b"".join(replies))
        return {"served": served}
    finally:
        wire.close()


def requester(
    ctl: Control,
    address: Any,
    cluster: str,
    slots: int,
    payload_size: int,
    timeout_ms: int = 10_000,
    drain_seconds: float = 2.0,
) -> Result:
    """``slots`` concurrent requesters on one connection, each sending its next request
    as soon as its previous one is answered (closed loop, like one goroutine each).

    Counts requests answered inside the window and their send→reply latencies (µs).
    """
    wire = Wire(_address(address))
    try:
        tail = encode_str(cluster) + encode_bin(b"x" * payload_size) + encode_varint(timeout_ms)
        ctl.ready()
        start, end = ctl.wait_go()
        sent_at: dict[int, int] = {}
        latencies = array("d")
        completed = errors = 0
        next_id = 0

        def issue(count: int) -> None:
            nonlocal next_id
            now = clock()
            frames = []
            for request_id in range(next_id, next_id + count):
                sent_at[request_id] = now
                frames.append(b"\x04" + encode_varint(request_id) + tail)
            next_id += count
            wire.send(b"".join(frames))

        issue(slots)
        while sent_at:
            try:
                packets = wire.recv()
            except TimeoutError:
                if clock() >= end:
                    break  # the drain after the window is over; the rest stays unanswered
                raise RelayError("node stopped answering requests") from None
            now = clock()
            counting = start <= now < end
            answered = 0
            for packet in packets:
                if not isinstance(packet, Replied | TimedOut | Faulted):
                    continue
                sent = sent_at.pop(packet.request_id, None)
                if sent is None:
                    continue
                answered += 1
                if not counting:
                    pass
                elif isinstance(packet, Replied):
                    completed += 1
                    latencies.append((now - sent) / 1000.0)
                else:
                    errors += 1
            if now < end:
                if answered:
                    issue(answered)
            else:
                # The window is over: collect what is still outstanding, briefly.
                left = (end - now) / 1e9 + drain_seconds
                if left <= 0:
                    break
                wire.sock.settimeout(left)
        return {
            "completed": completed,
            "errors": errors,
            "unanswered": len(sent_at),
            "latencies_us": latencies.tobytes(),
        }
    finally:
        wire.close()


# -- broadcast and publish ------------------------------------------------------------------


def _subscribe_confirmed(wire: Wire, topic: str, probe_topic: str, seconds: float) -> None:
    """Subscribe, and make sure the node has acted on it before measuring anything.

    There is no acknowledgement in the protocol, so subscribe to a private probe topic
    too and publish to it until the probe comes back.
    """
    wire.send_packets([Subscribe(topic), Subscribe(probe_topic)])
    probe = Publish(probe_topic, b"probe")
    deadline = time.monotonic() + seconds
    wire.sock.settimeout(1.0)  # a busy node may be slow; each extra probe costs exactness
    while time.monotonic() < deadline:
        wire.send(probe.encode())
        try:
            packets = wire.recv()
        except TimeoutError:
            continue
        if probe in packets:
            return
    raise RelayError(f"subscription to {topic!r} never took effect")


def member_sink(
    ctl: Control,
    address: Any,
    kind: str,
    name: str,
    connections: int,
    payload_size: int,
) -> Result:
    """``connections`` receivers that count deliveries: members of cluster ``name``
    (``kind="broadcast"``) or subscribers of topic ``name`` (``kind="publish"``)."""
    payload = b"x" * payload_size
    wires: list[Wire] = []
    try:
        for index in range(connections):
            if kind == "broadcast":
                wires.append(Wire(_address(address), name))
            else:
                wire = Wire(_address(address))
                wires.append(wire)
                _subscribe_confirmed(wire, name, f"{name}-probe-{os.getpid()}-{index}", 5.0)
        expected = BroadcastDelivered(payload) if kind == "broadcast" else Publish(name, payload)
        counters = {wire.fileno(): (wire, FrameCounter(expected, wire.decoder)) for wire in wires}
        ctl.ready()
        start, end = ctl.wait_go()
        watched = [*counters, ctl.fileno()]
        counted = total = 0
        drain_until = 0.0
        while True:
            readable, _, _ = select.select(
                watched, [], [], QUIET_SECONDS if drain_until else POLL_SECONDS
            )
            now = clock()
            for fd in readable:
                entry = counters.get(fd)
                if entry is None:
                    continue
                wire, counter = entry
                count = counter.feed(wire.recv_bytes())
                total += count
                if start <= now < end:
                    counted += count
            if drain_until:
                # Told to stop: take in what is still on its way, so the total is complete.
                if not readable or time.monotonic() > drain_until:
                    break
                continue
            elif (not readable or ctl.fileno() in readable) and ctl.stop_requested():
                drain_until = time.monotonic() + DRAIN_SECONDS
                watched.remove(ctl.fileno())
        exact = all(counter.exact for _, counter in counters.values())
        return {"deliveries": counted, "total": total, "exact": exact}
    finally:
        for wire in wires:
            wire.close()


def flooder(
    ctl: Control, address: Any, kind: str, name: str, payload_size: int, batch: int = 256
) -> Result:
    """Sends broadcasts (``kind="broadcast"``) or events as fast as the node takes them.

    The node's backpressure is what paces it: when the receivers fall behind, the node
    stops reading this connection and ``sendall`` waits.
    """
    payload = b"x" * payload_size
    frame = encode_str(name) + encode_bin(payload)
    frame = (b"\x03" if kind == "broadcast" else b"\x08") + frame
    blob = frame * batch
    wire = Wire(_address(address))
    # A small send buffer keeps the backlog in the kernel, which the node cannot see and which
    # would outlive the window, small.
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FLOOD_SNDBUF)
    try:
        ctl.ready()
        start, end = ctl.wait_go()
        sent = 0
        while True:
            now = clock()
            if now >= end:
                break
            wire.send(blob)
            if now >= start:
                sent += batch
        return {"sent": sent}
    except TimeoutError:
        raise RelayError("node stopped reading") from None
    finally:
        wire.close()


# -- tunnels ---------------------------------------------------------------------------------


def tunnel_sink(ctl: Control, address: Any, cluster: str) -> Result:
    """A member of ``cluster`` that accepts every tunnel and consumes what arrives at once.

    It serves from the moment it is ready: the source opens its tunnel before the window.
    """
    wire = Wire(_address(address), cluster)
    try:
        ctl.ready()
        wire.sock.settimeout(POLL_SECONDS)
        watched = [wire.fileno(), ctl.fileno()]
        start = end = -1
        counted = total = 0
        next_tunnel = 0
        while True:
            readable, _, _ = select.select(watched, [], [], POLL_SECONDS)
            if not readable or ctl.fileno() in readable:
                if ctl.stop_requested():
                    break
                if ctl.window is not None:
                    start, end = ctl.window
            if wire.fileno() not in readable:
                continue
            try:
                packets = wire.recv()
            except TimeoutError:
                continue  # a packet is still arriving
            now = clock()
            out: list[bytes] = []
            grants: dict[int, int] = {}
            received = 0
            for packet in packets:
                if isinstance(packet, TunnelTransfer):
                    size = len(packet.chunk)
                    received += size
                    grants[packet.tunnel_id] = grants.get(packet.tunnel_id, 0) + size
                elif isinstance(packet, TunnelOffered):
                    next_tunnel += 1
                    out.append(TunnelConfirm(packet.build_id, next_tunnel).encode())
                    out.append(TunnelAllow(next_tunnel, TUNNEL_GRANT).encode())
            for tunnel_id, size in grants.items():
                out.append(TunnelAllow(tunnel_id, size).encode())
            if out:
                wire.send(b"".join(out))
            total += received
            if start <= now < end:
                counted += received
        return {"bytes": counted, "total": total, "tunnels": next_tunnel}
    finally:
        wire.close()


def tunnel_source(
    ctl: Control, address: Any, cluster: str, message_size: int, timeout_ms: int = 5000
) -> Result:
    """Opens a tunnel to ``cluster`` and sends ``message_size``-byte messages until the
    window ends, honouring the node's credit (TUN_ALLOW) and its chunk limit."""
    wire = Wire(_address(address))
    tunnel_id = 1
    try:
        wire.send(TunnelInit(tunnel_id, cluster, timeout_ms).encode())
        credit = 0
        chunk_limit = 0
        while not chunk_limit:
            for packet in wire.recv():
                if isinstance(packet, TunnelConfirmed):
                    chunk_limit = packet.chunk_limit
                elif isinstance(packet, TunnelFailed):
                    raise RelayError(f"tunnel to {cluster!r} failed")
                elif isinstance(packet, TunnelAllow):
                    credit += packet.size
        wire.send(TunnelAllow(tunnel_id, TUNNEL_GRANT).encode())
        message = b"x" * message_size
        chunks = []
        for offset in range(0, message_size, chunk_limit):
            piece = message[offset : offset + chunk_limit]
            first = message_size if offset == 0 else 0
            chunks.append((len(piece), TunnelTransfer(tunnel_id, first, piece).encode()))
        ctl.ready()
        start, end = ctl.wait_go()
        sent = 0
        while clock() < end:
            for size, frame in chunks:
                while credit < size:
                    for packet in wire.recv():
                        if isinstance(packet, TunnelAllow):
                            credit += packet.size
                        elif isinstance(packet, TunnelClosed):
                            raise RelayError(f"tunnel closed by the node: {packet.reason!r}")
                credit -= size
                wire.send(frame)
            if clock() >= start:
                sent += message_size
        wire.send(TunnelClose(tunnel_id).encode())
        return {"sent": sent}
    except TimeoutError:
        raise RelayError("node stopped granting tunnel credit") from None
    finally:
        wire.close()


# -- raw loopback TCP, for comparison ----------------------------------------------------------


def tcp_sink(ctl: Control, total_bytes: int, timeout: float = 30.0) -> Result:
    """Receives ``total_bytes`` on a fresh loopback port; times first byte to last."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(timeout)
        ctl.ready(port=listener.getsockname()[1])
        peer, _ = listener.accept()
    with peer:
        peer.settimeout(timeout)
        ctl.wait_go()
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        received = peer.recv_into(view)
        first = clock()
        while 0 < received < total_bytes:
            got = peer.recv_into(view)
            if not got:
                break
            received += got
        last = clock()
    return {"bytes": received, "seconds": (last - first) / 1e9}


def tcp_source(ctl: Control, port: int, total_bytes: int, block_size: int) -> Result:
    """Sends ``total_bytes`` in ``block_size`` writes to the sink on ``port``."""
    with connect(("127.0.0.1", port), 30.0) as sock:
        block = b"x" * block_size
        ctl.ready()
        ctl.wait_go()
        sent = 0
        while sent < total_bytes:
            piece = block if total_bytes - sent >= block_size else block[: total_bytes - sent]
            sock.sendall(piece)
            sent += len(piece)
    return {"sent": sent}


ROLES: dict[str, Role] = {
    "echo_service": echo_service,
    "requester": requester,
    "member_sink": member_sink,
    "flooder": flooder,
    "tunnel_sink": tunnel_sink,
    "tunnel_source": tunnel_source,
    "tcp_sink": tcp_sink,
    "tcp_source": tcp_source,
}
