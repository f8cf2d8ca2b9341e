"""Memory attacks on a node: what one hostile local application can make a node hold.

``python -m bench.attack`` starts a node (``irisnode --relay-port 0`` with this Python,
default limits unless ``--node-arg`` says otherwise), and for each attack: an echo
service and a requester probe the node from another process (their request/reply
p50 is what other clients see), the attack runs for ``--duration`` seconds while the
node's RSS is sampled from /proc, and then the node gets SIGTERM with the attack
still connected; the time to its exit is the shutdown figure. See
``docs/backpressure.md`` for the limits these attacks run into.

Every attack sends only well-formed relay packets, bounded in count and time, to
127.0.0.1, and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.relay_node import NodeProcess, ProcStats
from bench.relay_report import percentile
from bench.relay_wire import RelayError, Wire
from relay import codec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
FOREVER_MS = (1 << 64) - 1
PROBE_CLUSTER = "attack-probe-echo"

Address = tuple[str, int]
Notes = dict[str, Any]


# -- sending without reading ---------------------------------------------------------------


class Flood:
    """A raw relay connection that writes as fast as the node reads and never reads itself.

    Its kernel receive buffer is small, so what the node sends it stays in the node.
    """

    def __init__(self, address: Address, cluster: str = "") -> None:
        self.wire = Wire(address, cluster, receive_buffer=4096)
        self.sock = self.wire.sock
        self.sock.setblocking(False)
        self.closed = False
        self.close_reason: str | None = None
        self._decoder = codec.client_decoder()

    def push(self, data: memoryview, wait: float = 0.05) -> int:
        """Send what the socket takes of ``data`` within ``wait`` seconds; bytes sent."""
        if self.closed:
            return 0
        try:
            return self.sock.send(data)
        except BlockingIOError:
            select.select([], [self.sock], [], wait)
            return 0
        except OSError:
            self.closed = True
            return 0

    def peek(self) -> None:
        """Read what has arrived, only to learn whether the node closed us and why."""
        while not self.closed:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            for packet in self._decoder.feed(data):
                if isinstance(packet, codec.Closed):
                    self.close_reason = packet.reason

    def abort(self) -> None:
        self.sock.close()
        self.closed = True


def _flood_forever(
    address: Address, packet: bytes, stop: threading.Event, notes: Notes, repeat: int = 512
) -> None:
    """One connection writing ``packet`` over and over, never reading (reconnects if dropped)."""
    batch = memoryview(packet * repeat)
    while not stop.is_set():
        flood = Flood(address)
        notes["connections"] = notes.get("connections", 0) + 1
        offset = 0
        while not stop.is_set() and not flood.closed:
            offset += flood.push(batch[offset:])
            if offset >= len(batch):
                notes["packets"] = notes.get("packets", 0) + repeat
                offset = 0
        flood.abort()


def _count_reason(notes: Notes, flood: Flood) -> None:
    """Count why the node closed a connection (its CLOSE packet's reason)."""
    if flood.close_reason is not None:
        reasons = notes.setdefault("close_reasons", {})
        reasons[flood.close_reason] = reasons.get(flood.close_reason, 0) + 1


# -- the attacks ------------------------------------------------------------------------------


def status_flood(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 1: ``$node.status`` requests as fast as the node takes them, never reading."""
    _flood_forever(address, codec.Request(1, "$node.status", b"", 60_000).encode(), stop, notes)


def timeout_flood(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 1: 1 ms requests to a cluster without members, never reading the timeouts."""
    _flood_forever(address, codec.Request(1, "attack-nobody", b"x", 1).encode(), stop, notes)


def orphans(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 2: 200 requests of 1 MiB that never time out, then hang up; again and again."""
    packet = codec.Request(1, "attack-orphans", bytes(MIB), FOREVER_MS).encode()
    while not stop.is_set():
        flood = Flood(address)
        data = memoryview(packet * 8)
        sent = 0
        give_up = time.monotonic() + 2.0
        while sent < 200 * len(packet) and time.monotonic() < give_up and not stop.is_set():
            offset = 0
            while offset < len(data) and time.monotonic() < give_up and not flood.closed:
                offset += flood.push(data[offset:])
            sent += offset
        notes["requests"] = notes.get("requests", 0) + sent // len(packet)
        notes["rounds"] = notes.get("rounds", 0) + 1
        flood.abort()


def subscriptions(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 3: one connection subscribing 4 KiB topic names as fast as it can."""
    count = 0
    while not stop.is_set():
        flood = Flood(address)
        pending = memoryview(b"")
        while not stop.is_set() and not flood.closed:
            if not pending:
                batch = b"".join(
                    codec.Subscribe(f"{count + i:012d}".ljust(4096, "t")).encode()
                    for i in range(256)
                )
                count += 256
                pending = memoryview(batch)
            pending = pending[flood.push(pending) :]
            flood.peek()
        notes["subscribed"] = count
        _count_reason(notes, flood)
        notes["connections"] = notes.get("connections", 0) + 1
        flood.abort()


def partial_packets(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 4: 20 connections each sending a 16 MiB packet but its last byte, then idling."""
    packet = codec.Publish("attack-partial", bytes(16 * MIB)).encode()[:-1]
    floods: list[tuple[Flood, memoryview]] = []
    while not stop.is_set():
        for index, (flood, _) in enumerate(floods):
            flood.peek()
            if flood.closed:
                _count_reason(notes, flood)
                notes["dropped"] = notes.get("dropped", 0) + 1
                flood.abort()
                floods[index] = (Flood(address), memoryview(packet))
        while len(floods) < 20:
            floods.append((Flood(address), memoryview(packet)))
        progress = 0
        for index, (flood, rest) in enumerate(floods):
            if rest:
                sent = flood.push(rest, wait=0.0)
                progress += sent
                floods[index] = (flood, rest[sent:])
        if not progress:
            time.sleep(0.05)
    notes["connections"] = len(floods)
    for flood, _ in floods:
        flood.abort()


def _requesters(
    address: Address,
    stop: threading.Event,
    notes: Notes,
    count: int,
    size: int,
    cluster: str,
    until: Callable[[], bool] = lambda: False,
) -> list[Flood]:
    """``count`` clients each pushing one request of ``size`` bytes; returns once all are sent,
    ``until()`` is true, or ``stop`` is set."""
    packet = codec.Request(1, cluster, bytes(size), 1 << 32).encode()
    floods = [Flood(address) for _ in range(count)]
    rests = [memoryview(packet) for _ in floods]
    while not stop.is_set() and not until() and any(rests):
        progress = 0
        for index, flood in enumerate(floods):
            if rests[index] and not flood.closed:
                sent = flood.push(rests[index], wait=0.0)
                progress += sent
                rests[index] = rests[index][sent:]
        if not progress:
            time.sleep(0.01)
    notes["requests_sent"] = sum(1 for rest in rests if not rest)
    return floods


def stuck_member(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 5: a member that never reads, and 30 clients each sending it 16 MiB."""
    member = Flood(address, "attack-stuck")
    floods = _requesters(address, stop, notes, 30, 16 * MIB, "attack-stuck")
    stop.wait()
    for flood in [member, *floods]:
        flood.abort()


def stuck_member_leaves(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 5: 200 clients of 1 MiB to a member that never reads, which leaves after 1 s."""
    member = Flood(address, "attack-stuck")
    began = time.monotonic()
    floods = _requesters(
        address, stop, notes, 200, MIB, "attack-stuck", until=lambda: time.monotonic() > began + 1
    )
    member.abort()
    notes["member_left_after_s"] = round(time.monotonic() - began, 2)
    stop.wait()
    for flood in floods:
        flood.abort()


def lookup_fault(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 6: 16 MiB of 0xff to ``$node.lookup``, again and again; how long is the fault?"""
    request = codec.Request(1, "$node.lookup", b"\xff" * (16 * MIB), 5_000).encode()
    longest = 0
    while not stop.is_set():
        try:
            wire = Wire(address, timeout=10.0)
            wire.decoder = codec.client_decoder(max_payload=1 << 30)  # to see a fault of any size
            wire.send(request)
            for packet in wire.recv():
                if isinstance(packet, codec.Faulted):
                    longest = max(longest, len(packet.fault.encode("utf-8", "surrogateescape")))
                    notes["faults"] = notes.get("faults", 0) + 1
            wire.close()
        except (OSError, RelayError) as error:
            notes["error"] = str(error)[:200]
    notes["longest_fault_bytes"] = longest


def fd_hog(address: Address, stop: threading.Event, notes: Notes) -> None:
    """Issue item 9: open connections until the node refuses or the descriptors run out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[socket.socket] = []
    refused = 0
    limit = min(hard - 200, 30_000)
    while not stop.is_set() and len(held) < limit:
        try:
            sock = socket.create_connection(address, timeout=1.0)
            sock.sendall(codec.Init().encode())
            if not sock.recv(64):  # refused: closed before the handshake's answer
                refused += 1
                sock.close()
                if refused >= 100:
                    break
                continue
            held.append(sock)
        except OSError:
            refused += 1
            if refused >= 100:
                break
    notes["held"] = len(held)
    notes["refused"] = refused
    stop.wait()
    for sock in held:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass(frozen=True, slots=True)
class Attack:
    name: str
    item: int
    run: Callable[[Address, threading.Event, Notes], None]

    @property
    def what(self) -> str:
        return (self.run.__doc__ or "").split(": ", 1)[-1].strip()


ATTACKS = {
    attack.name: attack
    for attack in (
        Attack("status-flood", 1, status_flood),
        Attack("timeout-flood", 1, timeout_flood),
        Attack("orphans", 2, orphans),
        Attack("subscriptions", 3, subscriptions),
        Attack("partial-packets", 4, partial_packets),
        Attack("stuck-member", 5, stuck_member),
        Attack("stuck-member-leaves", 5, stuck_member_leaves),
        Attack("lookup-fault", 6, lookup_fault),
        Attack("fd-hog", 9, fd_hog),
    )
}


# -- the probe: what other clients see ----------------------------------------------------------


def _probe(address: Address, pipe: Connection) -> None:
    """An echo member and a requester, one request every 10 ms, until told to stop."""
    latencies: list[float] = []
    errors = 0
    try:
        service = Wire(address, PROBE_CLUSTER)
        client = Wire(address)
    except (OSError, RelayError) as error:
        pipe.send({"error": str(error)})
        return
    pipe.send({"ready": True})
    request = codec.Request(1, PROBE_CLUSTER, b"ping", 2_000).encode()
    while not pipe.poll(0.01):
        started = time.perf_counter()
        try:
            client.send(request)
            (delivered,) = service.recv()
            assert isinstance(delivered, codec.RequestDelivered)
            service.send(codec.Reply(delivered.request_id, b"pong").encode())
            (reply,) = client.recv()
        except (OSError, RelayError, ValueError, AssertionError):
            errors += 1
            break  # a lost or stalled reply leaves the stream out of step: stop counting
        if isinstance(reply, codec.Replied):
            latencies.append(time.perf_counter() - started)
        else:
            errors += 1
    latencies.sort()
    pipe.send(
        {
            "requests": len(latencies),
            "errors": errors,
            "p50_us": _us(percentile(latencies, 0.5)),
            "p99_us": _us(percentile(latencies, 0.99)),
        }
    )


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


class Probe:
    def __init__(self, address: Address) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_probe, args=(address, child), daemon=True)
        self._process.start()
        if not self._pipe.poll(20):
            self._process.kill()
            raise RuntimeError("the probe did not start")
        first = self._pipe.recv()
        if "error" in first:
            raise RuntimeError(f"the probe could not connect: {first['error']}")

    def finish(self) -> dict[str, Any]:
        self._pipe.send("stop")
        result: dict[str, Any] = (
            self._pipe.recv() if self._pipe.poll(10) else {"error": "no answer"}
        )
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
        return result


# -- one run ---------------------------------------------------------------------------------


def run_attack(
    attack: Attack,
    duration: float,
    node_args: Sequence[str] = (),
    node_path: str | None = None,
    sample_every: float = 0.05,
) -> dict[str, Any]:
    """Start a node, probe it, attack it for ``duration`` s, stop it; every figure as a dict."""
    node = NodeProcess(list(node_args), python_path=node_path)
    stats = ProcStats(node.pid)
    try:
        probe = Probe(node.address)
        rss_idle = stats.rss()
        stop = threading.Event()
        shutting_down = threading.Event()
        notes: Notes = {}
        failure: list[str] = []

        def attack_thread() -> None:
            try:
                attack.run(node.address, stop, notes)
            except Exception as error:  # the attack itself broke: report it, do not hang
                if not shutting_down.is_set():  # (once the node stops, reconnecting fails)
                    failure.append(f"{type(error).__name__}: {error}")

        worker = threading.Thread(target=attack_thread, name=attack.name, daemon=True)
        started = time.monotonic()
        worker.start()
        peak = rss_idle
        while time.monotonic() - started < duration and node.alive():
            peak = max(peak, stats.rss())
            time.sleep(sample_every)
        rss_end = stats.rss() if node.alive() else 0
        peak = max(peak, stats.memory().get("VmHWM", 0) if node.alive() else 0)
        probed = probe.finish()
        status = _status(node.port)
        alive = node.alive()
        # Shutdown while the attack still holds its connections (and may still be sending).
        shutting_down.set()
        began = time.perf_counter()
        node.process.terminate()
        try:
            node.process.wait(10)
            shutdown: float | None = round(time.perf_counter() - began, 3)
        except Exception:
            shutdown = None
        stop.set()
        worker.join(10)
    finally:
        node.stop()
    return {
        "attack": attack.name,
        "item": attack.item,
        "duration_s": duration,
        "node_alive": alive,
        "rss_idle_mib": round(rss_idle / MIB, 1),
        "rss_peak_mib": round(peak / MIB, 1),
        "rss_end_mib": round(rss_end / MIB, 1),
        "probe": probed,
        "shutdown_s": shutdown,
        "exit_code": node.process.returncode,
        "notes": notes,
        "status": status,
        "attack_error": failure[0] if failure else None,
        "log_lines": node.log_lines,
        "tracebacks": node.tracebacks,
    }


def _status(port: int) -> dict[str, Any] | None:
    """The node's own counters (``$node.status``), or None if it does not answer in time."""
    from irisnode.commands.common import CommandError, ask

    try:
        answer: dict[str, Any] = json.loads(ask(port, "$node.status", b"", 5.0))
    except (CommandError, ValueError):
        return None
    return answer


def _row(record: dict[str, Any]) -> str:
    probe = record["probe"]
    p50 = probe.get("p50_us")
    return (
        f"{record['attack']:<20} {record['rss_idle_mib']:>7.1f} {record['rss_peak_mib']:>8.1f} "
        f"{record['rss_end_mib']:>7.1f} {p50 if p50 is not None else 'n/a':>9} "
        f"{probe.get('requests', 0):>7} {probe.get('errors', 0):>5} "
        f"{record['shutdown_s'] if record['shutdown_s'] is not None else 'n/a':>9} "
        f"{record['log_lines']:>6}  {json.dumps(record['notes'])}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per attack")
    parser.add_argument("--attacks", default="", help="comma-separated names (default: all)")
    parser.add_argument(
        "--node-arg", action="append", default=[], help="an argument for the node (repeatable)"
    )
    parser.add_argument(
        "--node-path", help="run the node from this source tree (to compare with another commit)"
    )
    parser.add_argument("--json", type=Path, help="where the JSON goes")
    parser.add_argument("--list", action="store_true", help="list the attacks")
    args = parser.parse_args(argv)
    if args.list:
        for attack in ATTACKS.values():
            print(f"{attack.name:<20} item {attack.item}: {attack.what}")
        return 0
    names = [name for name in args.attacks.split(",") if name] or list(ATTACKS)
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        parser.error(f"unknown attacks: {', '.join(unknown)} (see --list)")
    print(
        f"{'attack':<20} {'RSS idle':>7} {'RSS peak':>8} {'RSS end':>7} {'probe p50':>9} "
        f"{'probes':>7} {'errs':>5} {'shutdown':>9} {'log':>6}  notes (MiB, µs, s)"
    )
    records = []
    for name in names:
        record = run_attack(ATTACKS[name], args.duration, args.node_arg, args.node_path)
        records.append(record)
        print(_row(record), flush=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or RESULTS_DIR / f"attack-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"when": stamp, "argv": sys.argv, "duration_s": args.duration, "attacks": records}
    path.write_text(json.dumps(document, indent=2))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
