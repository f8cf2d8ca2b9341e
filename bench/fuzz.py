"""Fuzz a live node: malformed relay input, and malformed frames behind an authenticated link.

``python -m bench.fuzz`` starts a node of its own (``--net`` with a fresh test network
key, no discovery) and drives it from worker processes:

* **relay inputs** (``bench/fuzz_cases.py`` ``RelayCases``): random bytes, mutated valid
  streams, truncations, oversize varints, unknown opcodes, bad bools, names and
  payloads at and past the limits, tunnel and reply packets for unknown ids, odd
  handshakes, valid streams. One input is one connection's whole stream; the worker
  then half-closes and reads until the node closes.
* **link inputs**: a worker links to the node as a member of the test network
  (``overlay.link.LinkCore``, the real handshake), then sends one frame per input:
  valid node-to-node messages built from the wire registry, mutated or garbage
  messages, and frame-level tampering, replays, truncations and oversize lengths of
  what ``LinkCore`` produced. When the node drops the link, the worker links again.

It reports inputs sent by kind, connections and links the node dropped with their
reasons (from the node's JSON log), node crashes, tracebacks in the log, failed
health checks (a ``$node.status`` request every second) and RSS before and after.
Exit status 0 only with no crash, no traceback and every health check answered.

Link fuzzing makes the node dial whatever addresses the messages name, so it runs
only in a private network namespace with nothing but loopback (made here with
``unshare``; root only); without root the link part is skipped, and said so.
Documented in ``docs/relay.md``.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import multiprocessing
import os
import random
import re
import select
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.fuzz_cases import FRAME_KINDS, LinkCases, RelayCases, mutate_frame
from bench.relay_node import NodeProcess, ProcStats
from relay import codec

CLONE_NEWNET = 0x40000000
CONCURRENT = 48
"""Relay connections a worker keeps open at once."""
CASE_SECONDS = 10.0
"""A relay case the node has not closed by then counts as hung."""
LINK_DROP_SECONDS = 0.1
"""How long a link worker waits for the node to drop a link after a malformed frame."""
MAX_KEPT_IN_A_ROW = 20
"""Malformed frames a link may survive in a row before the worker links afresh."""
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LINK_PORT = re.compile(r"links on port (\d+)")
_NUMBER = re.compile(r"\b\d+\b|0x[0-9a-f]+|'[^']*'|\"[^\"]*\"|\([^)]*\)")

Counts = dict[str, Any]


# -- the node and its log -------------------------------------------------------------------


class LogTally:
    """Counts what the node's JSON log says it dropped, and why (numbers and names elided)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.relay: collections.Counter[str] = collections.Counter()
        self.links: collections.Counter[str] = collections.Counter()
        self.other_warnings: collections.Counter[str] = collections.Counter()
        self.link_port = 0

    def __call__(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        message = str(record.get("message", ""))
        reason = _NUMBER.sub("N", str(record.get("reason", "")))
        with self.lock:
            if not self.link_port:
                match = LINK_PORT.search(message)
                if match:
                    self.link_port = int(match[1])
            if message.startswith("dropping relay connection"):
                self.relay[reason] += 1
            elif message.startswith(("link failed", "dropping link")):
                self.links[reason] += 1
            elif record.get("level") in ("warn", "error", "critical"):
                self.other_warnings[_NUMBER.sub("N", message)[:120]] += 1


def enter_private_network() -> str | None:
    """Move this process (and all it starts) into a new network namespace with only loopback.

    Returns None on success, else why not.
    """
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no 'ip' command"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"unshare failed: {os.strerror(ctypes.get_errno())}"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return None


def status_ok(port: int) -> bool:
    from irisnode.commands.common import CommandError, ask

    try:
        json.loads(ask(port, "$node.status", b"", 5.0))
    except (CommandError, ValueError):
        return False
    return True


# -- relay workers ----------------------------------------------------------------------------


class _Case:
    __slots__ = ("data", "decoder", "kind", "sent", "started")

    def __init__(self, kind: str, data: bytes) -> None:
        self.kind = kind
        self.data = data
        self.sent = 0
        self.started = time.monotonic()
        self.decoder = codec.client_decoder(max_payload=1 << 30)


def relay_worker(port: int, count: int, seed: int, until: float) -> Counts:
    """Send ``count`` relay cases (fewer if ``until``, a monotonic time, comes first),
    ``CONCURRENT`` connections at a time."""
    rng = random.Random(seed)
    cases = RelayCases(rng)
    selector = selectors.DefaultSelector()
    open_cases: dict[socket.socket, _Case] = {}
    kinds: collections.Counter[str] = collections.Counter()
    closes: collections.Counter[str] = collections.Counter()
    started = hung = refused = 0
    while started < count or open_cases:
        if time.monotonic() > until:
            count = started
        while started < count and len(open_cases) < CONCURRENT:
            kind, data = cases.next()
            sock = socket.socket()
            sock.setblocking(False)
            if sock.connect_ex(("127.0.0.1", port)) not in (0, 115):  # 115: EINPROGRESS
                refused += 1
                sock.close()
                continue
            started += 1
            kinds[kind] += 1
            open_cases[sock] = _Case(kind, data)
            selector.register(sock, selectors.EVENT_WRITE)
        for key, events in selector.select(0.05):
            sock = key.fileobj  # type: ignore[assignment]
            case = open_cases[sock]
            try:
                if events & selectors.EVENT_WRITE:
                    case.sent += sock.send(case.data[case.sent :])
                    if case.sent >= len(case.data):
                        sock.shutdown(socket.SHUT_WR)  # the node sees the end of the stream
                        selector.modify(sock, selectors.EVENT_READ)
                    continue
                data = sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""  # reset: the node dropped it
            if data:
                for packet in case.decoder.feed(data) if case.decoder.error is None else ():
                    if isinstance(packet, codec.Closed):
                        closes[(packet.reason and "CLOSE with a reason") or "CLOSE (graceful)"] += 1
                continue
            selector.unregister(sock)
            sock.close()
            del open_cases[sock]
        now = time.monotonic()
        for sock, case in list(open_cases.items()):
            if now - case.started > CASE_SECONDS:
                hung += 1
                selector.unregister(sock)
                sock.close()
                del open_cases[sock]
    return {"inputs": started, "kinds": dict(kinds), "closes": dict(closes), "hung": hung,
            "refused": refused}  # fmt: skip


# -- link workers -----------------------------------------------------------------------------


class LinkClient:
    """One authenticated link to the node, as a member of the test network."""

    def __init__(self, port: int, credentials: Any) -> None:
        from overlay.link import Established, Failed, LinkCore, Role, Transmit

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait per frame
        self.core = LinkCore(Role.INITIATOR, credentials, os.urandom, time.monotonic())
        effects = self.core.start()
        deadline = time.monotonic() + 5.0
        while True:
            for effect in effects:
                if isinstance(effect, Transmit):
                    self.sock.sendall(effect.data)
                elif isinstance(effect, Failed):
                    raise ConnectionError(f"handshake failed: {effect.reason}")
                elif isinstance(effect, Established):
                    self.sock.setblocking(False)
                    return
            if time.monotonic() > deadline:
                raise ConnectionError("handshake timed out")
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the node closed the link during the handshake")
            effects = self.core.receive(data, time.monotonic())

    def drain(self) -> bool:
        """Read what the node sent (keeping the core in step); False once it has closed."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self.core.receive(data, time.monotonic())

    def closed_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if not self.drain():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.sock], [], [], left)

    def close(self) -> None:
        self.sock.close()


def link_worker(port: int, key_file: str, count: int, seed: int, until: float) -> Counts:
    """Send ``count`` link inputs (fewer if ``until`` comes first), linking again whenever the
    node drops the link."""
    from irisnode.network import message_registry
    from overlay.identity import Credentials, NetworkKey, NodeIdentity

    rng = random.Random(seed)
    cases = LinkCases(rng, message_registry())
    credentials = Credentials.for_network(
        NetworkKey.load(key_file), NodeIdentity.generate(os.urandom)
    )
    kinds: collections.Counter[str] = collections.Counter()
    outcome: collections.Counter[str] = collections.Counter()
    links = handshake_failures = sent = 0
    link: LinkClient | None = None
    previous = b""
    kept_in_a_row = 0
    while sent < count:
        if link is None:
            try:
                link = LinkClient(port, credentials)
            except (OSError, ConnectionError):
                handshake_failures += 1
                if handshake_failures > 50 + count // 10:
                    break
                time.sleep(0.05)
                continue
            links += 1
            previous = b""
        if rng.random() < 0.15:
            kind = rng.choice(FRAME_KINDS)
            _, plaintext = cases.next()
            frame = link.core.send(plaintext[: link.core.limits.max_message_size])
            data = mutate_frame(rng, kind, frame, previous)
        else:
            kind, plaintext = cases.next()
            data = frame = link.core.send(plaintext[: link.core.limits.max_message_size])
        previous = frame
        kinds[kind] += 1
        sent += 1
        try:
            link.sock.sendall(data)
        except BlockingIOError:
            link.sock.setblocking(True)
            link.sock.sendall(data)
            link.sock.setblocking(False)
        except OSError:
            outcome["dropped"] += 1
            link.close()
            link = None
            continue
        malformed = kind not in ("valid-message",)
        if malformed and link.closed_within(LINK_DROP_SECONDS):
            outcome["dropped"] += 1
            link.close()
            link = None
            kept_in_a_row = 0
        elif malformed:
            outcome["kept"] += 1  # well-formed after all (a mutation can be harmless)
            kept_in_a_row += 1
        elif not link.drain():
            outcome["dropped after a valid message"] += 1
            link.close()
            link = None
    if link is not None:
        link.close()
    return {"inputs": sent, "kinds": dict(kinds), "outcome": dict(outcome), "links": links,
            "handshake_failures": handshake_failures}  # fmt: skip


# -- the run ------------------------------------------------------------------------------------


def _merge(results: Sequence[Counts]) -> Counts:
    merged: Counts = {}
    for result in results:
        for key, value in result.items():
            if isinstance(value, dict):
                bucket = merged.setdefault(key, collections.Counter())
                bucket.update(value)
            else:
                merged[key] = merged.get(key, 0) + value
    return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in merged.items()}


def _run_workers(target: Any, jobs: Sequence[tuple[Any, ...]], health: Any) -> list[Counts]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(jobs)) as pool:
        pending = pool.starmap_async(target, jobs)
        while not pending.ready():
            health()
            pending.wait(1.0)
        results: list[Counts] = pending.get()
    return results


def fuzz(args: argparse.Namespace) -> Counts:
    private = enter_private_network() if args.link_inputs and not args.no_netns else "not asked"
    link_inputs = args.link_inputs if private is None else 0
    tally = LogTally()
    with tempfile.TemporaryDirectory(prefix="irisnode-fuzz-") as tmp:
        key_file = os.path.join(tmp, "fuzz.key")
        from overlay.identity import NetworkKey

        NetworkKey.generate("fuzz", os.urandom).save(key_file)
        node_args = ["--log-format", "json", "--net", "fuzz", "--key", key_file]
        node_args += ["--no-discovery", "--link-port", "0", "--handshake-rate", "100000"]
        node = NodeProcess(node_args, on_line=tally)
        stats = ProcStats(node.pid)
        health_failures = 0
        checks = 0

        def health() -> None:
            nonlocal health_failures, checks
            checks += 1
            if not node.alive() or not status_ok(node.port):
                health_failures += 1

        deadline = time.monotonic() + 10
        while not tally.link_port and time.monotonic() < deadline:
            time.sleep(0.05)
        rss_before = stats.rss()
        began = time.monotonic()
        until = time.monotonic() + args.seconds
        seeds = random.Random(args.seed)
        relay: Counts = {}
        if args.relay_inputs:
            share = -(-args.relay_inputs // args.workers)
            jobs = [
                (node.port, share, seeds.randrange(1 << 32), until) for _ in range(args.workers)
            ]
            relay = _merge(_run_workers(relay_worker, jobs, health))
        relay_seconds = time.monotonic() - began
        link: Counts = {}
        if link_inputs and node.alive():
            share = -(-link_inputs // args.workers)
            print(f"relay inputs done in {relay_seconds:.0f} s; links next", file=sys.stderr)
            link_jobs = [
                (tally.link_port, key_file, share, seeds.randrange(1 << 32), until)
                for _ in range(args.workers)
            ]
            link = _merge(_run_workers(link_worker, link_jobs, health))
        health()
        alive = node.alive()
        rss_after = stats.rss() if alive else 0
        node.stop()
        with tally.lock:
            report: Counts = {
                "seed": args.seed,
                "seconds": round(time.monotonic() - began, 1),
                "relay_seconds": round(relay_seconds, 1),
                "relay": relay,
                "relay_drops_logged": dict(tally.relay.most_common()),
                "link": link if link_inputs else {"skipped": private},
                "link_drops_logged": dict(tally.links.most_common()),
                "other_warnings_logged": dict(tally.other_warnings.most_common(20)),
                "node_crashes": 0 if alive else 1,
                "node_exit_code": node.process.returncode,
                "tracebacks": node.tracebacks,
                "log_lines": node.log_lines,
                "health_checks": checks,
                "health_failures": health_failures,
                "rss_before_mib": round(rss_before / (1 << 20), 1),
                "rss_after_mib": round(rss_after / (1 << 20), 1),
            }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--relay-inputs", type=int, default=20_000, help="relay cases to send")
    parser.add_argument("--link-inputs", type=int, default=2_000, help="link frames to send")
    parser.add_argument("--workers", type=int, default=2, help="fuzzing processes per phase")
    parser.add_argument("--seed", type=int, default=1, help="makes a run reproducible")
    parser.add_argument(
        "--seconds", type=float, default=1e9, help="stop sending after this long (report as usual)"
    )
    parser.add_argument(
        "--no-netns", action="store_true", help="skip the link part (no private namespace)"
    )
    parser.add_argument("--json", type=Path, help="where the JSON report goes")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.relay_inputs < 0 or args.link_inputs < 0:
        parser.error("counts must not be negative, and at least one worker")
    report = fuzz(args)
    text = json.dumps(report, indent=2)
    print(text)
    path = args.json or RESULTS_DIR / f"fuzz-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    failed = report["node_crashes"] or report["tracebacks"] or report["health_failures"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
