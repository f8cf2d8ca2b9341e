"""Applications on the nodes of a :class:`tests.lan.Lan`: raw relay bytes and our bindings.

Two ways to be an application in a node's namespace, as ``tests/test_lan_messaging.py``
uses them:

* :func:`raw_wire`: a relay connection made inside the namespace from the test
  process (``bench.relay_wire.Wire``: plain sockets and ``relay.codec``), so the
  test writes and reads exactly the bytes of the protocol; :func:`take` reads
  packets, :class:`RawMember` answers requests in a thread, :func:`open_raw_tunnel`
  sets a tunnel up, :func:`closed_loop` keeps requests in flight and records every
  answer each one gets;
* :class:`Apps`: an agent process in the namespace (``python -m tests.lan_apps
  PORT``) that runs applications written with the blocking bindings
  (``relay.client.blocking``) and does what the test asks of them, one JSON line
  at a time (the same line protocol as the CLI agent of ``tests/lan.py``).

Every application that serves a cluster is an echo that says who it is
(``NAME:request``), faults on ``fail:TEXT``, records the broadcasts it gets and
echoes every tunnel message back. Broadcasts and events are handled one at a time
(``Limits(handlers=1)``), so they are recorded in the order the node delivered
them: by default the bindings run up to 16 handlers at once in threads, and their
order is then not the wire's.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import select
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.relay_wire import RelayError, Wire
from relay import codec
from tests.lan import Lan, in_netns

Answer = dict[str, Any]


def raw_wire(lan: Lan, i: int, cluster: str = "", timeout: float = 5.0) -> Wire:
    """A raw relay connection to node ``i`` (as a member of ``cluster`` if given),
    made in its namespace and usable from any thread of this process."""
    with in_netns(lan.namespaces[i]):
        return Wire(("127.0.0.1", lan.relay_port), cluster, timeout)


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ with ``seed`` and along the message (so an order or
    splicing mistake shows), made the same way on both sides."""
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB
    copies = -(-size // len(block))
    return (block * copies)[:size]


class AppError(AssertionError):
    """The agent could not do what it was asked (its answer carries why)."""


class Apps:
    """The applications of one node, run by an agent process in its namespace."""

    def __init__(self, lan: Lan, i: int) -> None:
        self.index = i
        self._agent = lan.start_agent(i, [lan.python, "-m", "tests.lan_apps", str(lan.relay_port)])

    def call(self, op: str, wait: float = 20.0, **args: Any) -> Answer:
        """Do ``op`` (a method of :class:`_Agent`) within ``wait`` seconds; its answer,
        or :class:`AppError`."""
        answer: Answer = self._agent.ask({"op": op, **args}, wait)
        if "failed" in answer:
            raise AppError(f"node {self.index}: {op} {args}: {answer['failed']}")
        return answer

    def serve(self, name: str, cluster: str) -> None:
        self.call("serve", name=name, cluster=cluster)

    def connect(self, name: str) -> None:
        self.call("connect", name=name)

    def request(self, name: str, cluster: str, data: bytes, timeout: float = 5.0) -> Answer:
        """``{"reply": bytes}``, or ``{"error": "Timeout" | "RemoteFault" | ..., "text": ...}``."""
        answer = self.call(
            "request", timeout + 10, name=name, cluster=cluster, data=_b64(data), timeout=timeout
        )
        if "reply" in answer:
            answer["reply"] = _unb64(answer["reply"])
        return answer

    def broadcast(self, name: str, cluster: str, messages: list[bytes]) -> None:
        self.call("broadcast", name=name, cluster=cluster, messages=[_b64(m) for m in messages])

    def subscribe(self, name: str, topic: str) -> None:
        self.call("subscribe", name=name, topic=topic)

    def publish(self, name: str, topic: str, events: list[bytes]) -> None:
        self.call("publish", name=name, topic=topic, events=[_b64(e) for e in events])

    def received(self, name: str, topic: str | None = None) -> list[bytes]:
        """Broadcasts a service ``name`` got, or events of ``topic`` its connection got, in order."""
        return [_unb64(m) for m in self.call("received", name=name, topic=topic)["messages"]]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


# -- raw applications (in this process, in a namespace) -------------------------------------


def take(wire: Wire, count: int, timeout: float = 10.0) -> list[Any]:
    """The next ``count`` packets from ``wire`` (AssertionError after ``timeout``)."""
    packets: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(packets) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(packets)} of {count} packets: {packets[:5]}")
        wire.sock.settimeout(left)
        try:
            packets += wire.recv()
        except TimeoutError:
            continue
    assert len(packets) == count, f"more packets than expected: {packets[count:][:5]}"
    return packets


class RawMember(threading.Thread):
    """A raw member of ``cluster`` on node ``i`` that answers ``NAME:request``, in a thread."""

    def __init__(self, lan: Lan, i: int, cluster: str, name: str) -> None:
        super().__init__(name=f"member-{name}", daemon=True)
        self.wire = raw_wire(lan, i, cluster)
        self.label = name.encode()
        self.served = 0
        self.stopping = threading.Event()
        self.ended: str | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                readable, _, _ = select.select([self.wire.sock], [], [], 0.05)
                if not readable:
                    continue
                replies = [
                    codec.Reply(p.request_id, self.label + b":" + p.request).encode()
                    for p in self.wire.recv()
                    if isinstance(p, codec.RequestDelivered)
                ]
                self.served += len(replies)
                if replies:
                    self.wire.send(b"".join(replies))
        except (RelayError, OSError) as error:
            self.ended = str(error)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.wire.close()


def open_raw_tunnel(sender: Wire, receiver: Wire, cluster: str) -> tuple[int, int]:
    """Open tunnel 1 from ``sender`` to member ``receiver`` (which names it 7 and grants
    64 MiB, as the Go binding does); (the sender's initial credit, the chunk limit)."""
    sender.send(codec.TunnelInit(1, cluster, 5000).encode())
    [offer] = take(receiver, 1)
    assert isinstance(offer, codec.TunnelOffered)
    receiver.send_packets([codec.TunnelConfirm(offer.build_id, 7), codec.TunnelAllow(7, 64 << 20)])
    credit, chunk_limit = 0, 0
    sender.sock.settimeout(10)
    while not chunk_limit:
        for packet in sender.recv():
            if isinstance(packet, codec.TunnelConfirmed):
                chunk_limit = packet.chunk_limit
            elif isinstance(packet, codec.TunnelAllow):
                credit += packet.size
    sender.send(codec.TunnelAllow(1, 64 << 20).encode())
    return credit, chunk_limit


@dataclass
class Outcomes:
    """Every request a requester sent: when, and each answer it got (exactly one, we hope)."""

    sent_at: dict[int, float] = field(default_factory=dict)
    answers: dict[int, list[tuple[float, Any]]] = field(default_factory=dict)


def closed_loop(wire: Wire, cluster: str, slots: int, stop_at: float, timeout_ms: int) -> Outcomes:
    """``slots`` requests in flight until ``stop_at``; then reads on until every request
    has its answer and nothing more came for a while (a second answer would show)."""
    out = Outcomes()
    next_id = 0

    def issue(count: int) -> None:
        nonlocal next_id
        now = time.monotonic()
        frames = []
        for request_id in range(next_id, next_id + count):
            out.sent_at[request_id] = now
            frames.append(codec.Request(request_id, cluster, b"%d" % request_id, timeout_ms))
        next_id += count
        wire.send_packets(frames)

    issue(slots)
    quiet_until = stop_at + timeout_ms / 1000 + 3.0
    wire.sock.settimeout(0.1)
    while time.monotonic() < quiet_until:
        try:
            packets = wire.recv()
        except TimeoutError:
            continue
        now = time.monotonic()
        answered = 0
        for packet in packets:
            if isinstance(packet, codec.Replied | codec.TimedOut | codec.Faulted):
                answers = out.answers.setdefault(packet.request_id, [])
                answered += not answers
                answers.append((now, packet))
        if answered and now < stop_at:
            issue(answered)
    return out


# -- the agent (runs in the namespace) ---------------------------------------------------------


class _Agent:
    """What the agent process holds: named connections and what they received."""

    def __init__(self, port: int) -> None:
        from relay.client import blocking

        self.port = port
        self.connections: dict[str, blocking.BlockingConnection] = {}
        self.services: dict[str, blocking.BlockingService] = {}
        self.received: dict[tuple[str, str | None], list[bytes]] = {}
        self.lock = threading.Lock()

    def _record(self, name: str, topic: str | None, message: bytes) -> None:
        with self.lock:
            self.received.setdefault((name, topic), []).append(message)

    def _connection(self, name: str) -> Any:
        found = self.connections.get(name)
        if found is None:
            raise KeyError(f"no connection named {name!r}")
        return found

    def serve(self, name: str, cluster: str) -> Answer:
        from relay.client import Limits, ServiceLimits, blocking, errors

        agent = self

        class Echo(blocking.ServiceHandler):
            def handle_request(self, request: bytes) -> bytes:
                if request.startswith(b"fail:"):
                    raise ValueError(request[5:].decode())
                return name.encode() + b":" + request

            def handle_broadcast(self, message: bytes) -> None:
                agent._record(name, None, message)

            def handle_tunnel(self, tunnel: blocking.BlockingTunnel) -> None:
                while True:
                    try:
                        tunnel.send(tunnel.recv())
                    except errors.ConnectionClosed:
                        return

        one_at_a_time = ServiceLimits(broadcasts=Limits(handlers=1))
        service = blocking.register(cluster, Echo(), self.port, limits=one_at_a_time)
        self.services[name] = service
        self.connections[name] = service.connection
        return {}

    def connect(self, name: str) -> Answer:
        from relay.client import blocking

        self.connections[name] = blocking.connect(self.port)
        return {}

    def request(self, name: str, cluster: str, data: str, timeout: float) -> Answer:
        from relay.client import errors

        try:
            reply = self._connection(name).request(cluster, _unb64(data), timeout)
        except errors.IrisError as error:
            return {"error": type(error).__name__, "text": str(error)}
        return {"reply": _b64(reply)}

    def broadcast(self, name: str, cluster: str, messages: list[str]) -> Answer:
        connection = self._connection(name)
        for message in messages:
            connection.broadcast(cluster, _unb64(message))
        return {}

    def subscribe(self, name: str, topic: str) -> Answer:
        from relay.client import Limits

        record = functools.partial(self._record, name, topic)
        self._connection(name).subscribe(topic, record, Limits(handlers=1))
        return {}

    def publish(self, name: str, topic: str, events: list[str]) -> Answer:
        connection = self._connection(name)
        for event in events:
            connection.publish(topic, _unb64(event))
        return {}

    def received_(self, name: str, topic: str | None) -> Answer:
        with self.lock:
            messages = list(self.received.get((name, topic), []))
        return {"messages": [_b64(m) for m in messages]}

    def tunnel_echo(self, name: str, cluster: str, size: int, timeout: float) -> Answer:
        """Open a tunnel to ``cluster``, send one ``size``-byte message, read it back."""
        message = pattern(size, seed=size)
        started = time.monotonic()
        with self._connection(name).tunnel(cluster, timeout) as tunnel:
            tunnel.send(message, timeout)
            echoed = tunnel.recv(timeout)
        return {
            "same": echoed == message,
            "size": len(echoed),
            "seconds": time.monotonic() - started,
        }

    def close(self, name: str) -> Answer:
        self.services.pop(name, None)
        connection = self.connections.pop(name, None)
        if connection is not None:
            connection.close()
        return {}

    def handle(self, question: dict[str, Any]) -> Answer:
        op = question.pop("op")
        method = getattr(self, "received_" if op == "received" else op, None)
        if op.startswith("_") or method is None or op == "handle":
            return {"failed": f"unknown op {op!r}"}
        try:
            answer: Answer = method(**question)
        except Exception as error:  # reported to the test, which fails with it
            return {"failed": f"{type(error).__name__}: {error}"}
        return answer


def agent_main(port: int) -> None:
    import json

    agent = _Agent(port)
    for line in sys.stdin:
        question = json.loads(line)
        answer = {} if question is None else agent.handle(question)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for name in list(agent.connections):
        agent.close(name)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m tests.lan_apps RELAY_PORT")
    agent_main(int(sys.argv[1]))
