"""LAN benchmark: irisnode on a virtual LAN of network namespaces (root only).

    python -m bench.lan_bench [--runs N] [--ready-runs N] [--seconds S] [--handshakes N] [--quick]

Builds LANs with :class:`tests.lan.Lan` (a bridge in a switch namespace, one
namespace per node; nothing touches the host's interfaces) and measures:

* **ready**: spawning ``irisnode --net ... --key ...`` in a namespace to its
  ready line on stderr, one node alone (after one warm-up start), median of
  ``--ready-runs``; with the node's CPU time then and once its overlay started;
* **convergence** of 5 nodes started together: from the last spawn (and from
  the last ready line) until every node's leaf set holds the other four with a
  link up and all 5 route 50 random keys to the closest node (median of
  ``--runs`` fresh LANs);
* **failure detection**: on that converged LAN, one node SIGKILLed, then (once
  the 4 survivors have converged again) another one's switch port taken down:
  until no survivor lists it in its leaf set or with a link up;
* **join**: then a node with a new identity starts in the SIGKILLed node's
  namespace: from its spawn (and from its ready line) until it and the 3
  connected survivors have converged (one start, no contention: the figure to
  hold against the original Iris's 3.4 s for a second node);
* **handshake CPU** per link, both ends, over the veth/bridge path: N links
  set up and torn down in turn between two processes in two namespaces;
* **throughput** of 64 KiB frames over one link between two namespaces, next to
  raw TCP on the same path (the same two namespaces, ports and frame size).

Results print as a table and go to ``bench/results/lan-<timestamp>.json``. The
sending and receiving ends of the link figures are this file run as a module
with ``--send``/``--serve`` inside the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
LINK_PORT = 47100
RAW_PORT = 47101
END = b"END"
CPU = b"CPU"

Record = dict[str, Any]


# -- the two ends of the link figures (run inside the namespaces) ------------------------


def _fire(deferred: Any) -> None:
    if not deferred.called:
        deferred.callback(None)


def _emit(**fields: Any) -> None:
    """One JSON line on stderr: what the orchestrator's log reader parses."""
    print(json.dumps(fields), file=sys.stderr, flush=True)


async def serve(reactor: Any, mode: str, key_file: str) -> None:
    """Receive on all addresses until END (answer with the byte count) or CPU (answer
    with the CPU seconds since listening); exit when the sender is done."""
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Protocol, ServerFactory
    from zope.interface import implementer

    done: Deferred[None] = Deferred()
    safety = reactor.callLater(600, _fire, done)
    cpu_start = time.process_time()

    if mode == "link":
        from overlay.link_twisted import Link

        class Receiver:
            received = 0

            def link_established(self, link: Link) -> None:
                pass

            def frame_received(self, link: Link, data: bytes) -> None:
                if data == END:
                    link.send(str(self.received).encode())
                elif data == CPU:
                    link.send(str(time.process_time() - cpu_start).encode())
                    reactor.callLater(0.5, _fire, done)
                else:
                    self.received += len(data)

            def link_lost(self, link: Link, reason: str) -> None:
                if self.received:
                    _fire(done)

            def link_writable(self, link: Link) -> None:
                pass

        _link_service(reactor, _credentials(key_file), Receiver()).listen(LINK_PORT, "0.0.0.0")
    else:

        @implementer(IHalfCloseableProtocol)
        class Sink(Protocol):
            """Counts until the sender half-closes, answers with the count, hangs up."""

            received = 0

            def dataReceived(self, data: bytes) -> None:
                self.received += len(data)

            def readConnectionLost(self) -> None:
                assert self.transport is not None
                self.transport.write(str(self.received).encode())
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

            def connectionLost(self, reason: object = None) -> None:
                _fire(done)

        factory = ServerFactory()
        factory.protocol = Sink
        reactor.listenTCP(RAW_PORT, factory, interface="0.0.0.0")
    _emit(listening=mode)
    await done
    if safety.active():
        safety.cancel()


async def send(reactor: Any, options: argparse.Namespace) -> None:
    """The sending end: ``throughput`` over a link or raw TCP, or ``handshakes``."""
    if options.send == "raw":
        _emit(result=await _raw_throughput(reactor, options))
    elif options.send == "link":
        _emit(result=await _link_throughput(reactor, options))
    else:
        _emit(result=await _handshakes(reactor, options))


class _Sender:
    """LinkHandler of the sending end: the first link, and the receiver's answer."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.up: Deferred[Any] = Deferred()
        self.answer: Deferred[bytes] = Deferred()

    def link_established(self, link: Any) -> None:
        if not self.up.called:
            self.up.callback(link)

    def frame_received(self, link: Any, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data)

    def link_lost(self, link: Any, reason: str) -> None:
        pass

    def link_writable(self, link: Any) -> None:
        pass  # the sender waits on link.wait_writable()


def _credentials(key_file: str) -> Any:
    from overlay.identity import Credentials, NetworkKey, NodeIdentity

    network = NetworkKey.load(key_file)
    return Credentials.for_network(network, NodeIdentity.generate(os.urandom))


def _link_service(reactor: Any, credentials: Any, handler: Any) -> Any:
    from overlay.link_twisted import LinkService

    return LinkService(
        reactor,
        reactor,
        credentials,
        handler,
        entropy=os.urandom,
        rng=random.Random(),
        handshake_rate=1e6,  # the handshake figure sets up links from one source in a row
    )


async def _link_throughput(reactor: Any, options: argparse.Namespace) -> Record:
    handler = _Sender()
    service = _link_service(reactor, _credentials(options.key), handler)
    service.connect(options.host, LINK_PORT)
    link = await handler.up
    payload = os.urandom(options.frame_size)
    sent = 0
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + options.seconds
    while time.perf_counter() < deadline:
        while not link.congested:
            link.send(payload, bulk=True)
            sent += len(payload)
        await link.wait_writable()
    link.send(END, bulk=True)  # behind the data: control would overtake it
    answer = await handler.answer
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await service.stop()
    if int(answer) != sent:
        raise RuntimeError(f"the receiver got {int(answer)} bytes of {sent}")
    return {"mb_per_s": sent / elapsed / 1e6, "bytes": sent, "seconds": elapsed, "cpu_s": cpu}


async def _raw_throughput(reactor: Any, options: argparse.Namespace) -> Record:
    from bench.raw_tcp import push

    payload = os.urandom(options.frame_size)
    sent, answer, elapsed, cpu = await push(
        reactor, options.host, RAW_PORT, payload, options.seconds
    )
    if int(answer) != sent:
        raise RuntimeError(f"the receiver got {int(answer)} bytes of {sent}")
    return {"mb_per_s": sent / elapsed / 1e6, "bytes": sent, "seconds": elapsed, "cpu_s": cpu}


async def _handshakes(reactor: Any, options: argparse.Namespace) -> Record:
    """N links in turn (connect, authenticate, close), then ask the receiver's CPU.

    Identities are made before the clock starts: making one (a key pair and a
    certificate) is not part of a handshake."""
    identities = [_credentials(options.key) for _ in range(options.count + 1)]
    cpu = time.process_time()
    start = time.perf_counter()
    for credentials in identities[:-1]:
        handler = _Sender()
        service = _link_service(reactor, credentials, handler)
        service.connect(options.host, LINK_PORT)
        await handler.up
        await service.stop()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    handler = _Sender()
    service = _link_service(reactor, identities[-1], handler)
    service.connect(options.host, LINK_PORT)
    link = await handler.up
    link.send(CPU)
    receiver_cpu = float(await handler.answer)
    await service.stop()
    return {
        "links": options.count,
        "seconds": elapsed,
        "sender_cpu_s": cpu,
        "receiver_cpu_s": receiver_cpu,  # includes the extra link that asked for it
    }


# -- the orchestrator (host namespace) ---------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_ready(runs: int, warmups: int = 1) -> Record:
    """Spawn-to-ready of one node alone; its CPU time at ready and once its overlay ran."""
    from tests.lan import Lan

    record: Record = {"ready_s": [], "cpu_at_ready_s": [], "cpu_with_overlay_s": []}
    with Lan(1, tag="bench-ready") as lan:
        for run in range(warmups + runs):
            node = lan.start_node(0)
            ready = node.wait_ready(timeout=30)
            cpu_ready = _cpu_seconds(node.pid)
            node.wait_for_log("overlay started", 30)
            cpu_overlay = _cpu_seconds(node.pid)
            node.stop()
            if run >= warmups:
                record["ready_s"].append(ready)
                record["cpu_at_ready_s"].append(cpu_ready)
                record["cpu_with_overlay_s"].append(cpu_overlay)
    return record


def measure_lan(run: int, keys: list[int]) -> Record:
    """One fresh 5-node LAN: convergence, SIGKILL and cable-pull detection, a join."""
    from overlay.ids import closest
    from tests.lan import Lan, leaf_set, peers_up, wait_until

    with Lan(5, tag=f"bench-c{run}") as lan:
        lan.start_agents()
        for i in range(5):
            lan.start_node(i)
        converged = lan.wait_converged(range(5), keys, 30)
        ready = [lan.nodes[i].wait_ready() for i in range(5)]
        last_start = lan.nodes[4].started
        last_ready = max(node.ready_at or 0.0 for node in lan.nodes.values())
        ids = converged.node_ids
        record: Record = {
            "ready_together_s": ready,
            "converged_after_last_start_s": converged.at - last_start,
            "converged_after_last_ready_s": converged.at - last_ready,
        }

        def detect(victim: int, survivors: list[int], how: str) -> float:
            cut = time.monotonic()
            if how == "sigkill":
                lan.nodes[victim].kill(signal.SIGKILL)
            else:
                lan.pull_cable(victim)

            def forgotten() -> bool:
                states = lan.statuses(survivors)
                return all(ids[victim] not in leaf_set(s) | peers_up(s) for s in states.values())

            wait_until(forgotten, 20, f"the survivors to drop node {victim}", interval=0.01)
            return time.monotonic() - cut

        record["detect_sigkill_s"] = detect(2, [0, 1, 3, 4], "sigkill")
        survivors = [0, 1, 3, 4]
        again = lan.wait_converged(survivors, keys, 30)
        assert again.owners == [closest(k, [ids[i] for i in survivors]) for k in keys]
        record["detect_cable_pulled_s"] = detect(3, [0, 1, 4], "cable")
        joiner = lan.start_node(2, state_dir=lan.tmp / "state-new")  # a new identity
        joined = lan.wait_converged([0, 1, 2, 4], keys, 30)
        record["join_after_start_s"] = joined.at - joiner.started
        record["join_after_ready_s"] = joined.at - joiner.started - joiner.wait_ready()
        return record


def measure_links(seconds: float, frame_size: int, handshakes: int) -> Record:
    from tests.lan import Lan

    python = [sys.executable, "-m", "bench.lan_bench"]
    with Lan(2, tag="bench-link") as lan:
        key = str(lan.keygen())
        host = lan.address(1)
        record: Record = {}

        def exchange(mode: str, sender_args: list[str], timeout: float) -> Record:
            receiver = lan.spawn(1, [*python, "--serve", mode, "--key", key])
            receiver.wait_for_log(lambda r: r.get("listening") == mode, 30)
            sender = lan.spawn(0, [*python, *sender_args, "--host", host, "--key", key])
            result: Record = sender.wait_for_log(lambda r: "result" in r, timeout)["result"]
            sender.stop()
            receiver.stop()
            return result

        common = ["--seconds", str(seconds), "--frame-size", str(frame_size)]
        record["link"] = exchange("link", ["--send", "link", *common], seconds + 30)
        record["raw"] = exchange("raw", ["--send", "raw", *common], seconds + 30)
        shakes = exchange("link", ["--send", "handshakes", "--count", str(handshakes)], 120)
        shakes["cpu_ms_per_link"] = 1000 * (
            shakes["sender_cpu_s"] / handshakes + shakes["receiver_cpu_s"] / (handshakes + 1)
        )
        record["handshakes"] = shakes
        return record


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def report(document: Record) -> str:
    ready, lans, links = document["ready"], document["lans"], document["links"]

    def median(values: Sequence[float]) -> str:
        return _fmt(_median(values))

    def lan_median(key: str) -> str:
        return median([r[key] for r in lans])

    link, raw = links["link"]["mb_per_s"], links["raw"]["mb_per_s"]
    rows = [
        ("start to relay ready (one node)", median(ready["ready_s"]), "s", "<= 0.3"),
        ("  node CPU at ready", median(ready["cpu_at_ready_s"]), "s", ""),
        ("  node CPU once its overlay started", median(ready["cpu_with_overlay_s"]), "s", ""),
        ("slowest ready, 5 started together", median([max(r["ready_together_s"]) for r in lans]),
         "s", ""),
        ("5 nodes converged, from the last start", lan_median("converged_after_last_start_s"),
         "s", "<= 1 (Go 3.4 / 10)"),
        ("  from the last ready line", lan_median("converged_after_last_ready_s"), "s", ""),
        ("new node joins 3 others, from its start", lan_median("join_after_start_s"), "s",
         "(Go 3.4)"),
        ("  from its ready line", lan_median("join_after_ready_s"), "s", ""),
        ("failure detected, SIGKILL", lan_median("detect_sigkill_s"), "s", "<= 3"),
        ("failure detected, cable pulled", lan_median("detect_cable_pulled_s"), "s", "<= 3"),
        ("handshake CPU per link, both ends", _fmt(links["handshakes"]["cpu_ms_per_link"], 1, 2),
         "ms", ""),
        ("64 KiB frames over one link", _fmt(link, 1, 0), "MB/s", ""),
        ("raw TCP, same path and chunks", _fmt(raw, 1, 0), "MB/s", f"link/raw {link / raw:.2f}"),
    ]  # fmt: skip
    width = max(len(row[0]) for row in rows)
    lines = [f"{'figure (medians)':<{width}}  {'value':>7}  unit  target"]
    lines += [
        f"{name:<{width}}  {value:>7}  {unit:<4}  {target}" for name, value, unit, target in rows
    ]
    for key in ("converged_after_last_start_s", "detect_sigkill_s", "detect_cable_pulled_s"):
        lines.append(f"  {key}: {', '.join(_fmt(r[key], 1, 2) for r in lans)}")
    return "\n".join(lines)


def orchestrate(options: argparse.Namespace, argv: Sequence[str]) -> int:
    from tests.lan import netns_available

    reason = netns_available()
    if reason is not None:
        print(f"lan_bench: {reason}", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    rng = random.Random(11)
    keys = [rng.getrandbits(128) for _ in range(50)]
    print(f"ready: {options.ready_runs} starts of one node ...", flush=True)
    ready = measure_ready(options.ready_runs)
    lans = []
    for run in range(options.runs):
        print(f"5-node LAN {run + 1}/{options.runs} ...", flush=True)
        lans.append(measure_lan(run, keys))
    print("links between two namespaces ...", flush=True)
    links = measure_links(options.seconds, options.frame_size, options.handshakes)
    document: Record = {
        "schema": "irisnode-lan-bench/1",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.lan_bench", *argv]),
        "machine": {"cpus": os.cpu_count(), "load_average_after": os.getloadavg()},
        "settings": {
            "runs": options.runs,
            "ready_runs": options.ready_runs,
            "seconds": options.seconds,
            "frame_size": options.frame_size,
            "handshakes": options.handshakes,
        },
        "ready": ready,
        "lans": lans,
        "links": links,
    }
    print()
    print(report(document))
    path = options.output or RESULTS_DIR / f"lan-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from bench.relay_node import compile_node

    compile_node()  # time what a user's start costs, not compiling our modules
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="5-node LANs built (default 5)")
    parser.add_argument("--ready-runs", type=int, default=7, help="timed starts each way")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput figure")
    parser.add_argument("--frame-size", type=int, default=64 * 1024, help="bytes per frame")
    parser.add_argument("--handshakes", type=int, default=200, help="links set up for the CPU")
    parser.add_argument("--quick", action="store_true", help="2 runs, 3 starts, 1 s, 50 links")
    parser.add_argument("--output", type=Path, help="JSON path (default bench/results/lan-*.json)")
    parser.add_argument("--serve", choices=["link", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--send", choices=["link", "raw", "handshakes"], help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args(arguments)
    if options.quick:
        options.runs, options.ready_runs, options.seconds, options.handshakes = 2, 3, 1.0, 50
    if options.serve or options.send:
        from twisted.internet.defer import Deferred
        from twisted.internet.task import react

        def body(reactor: Any) -> Deferred[None]:
            if options.serve:
                return Deferred.fromCoroutine(serve(reactor, options.serve, options.key))
            return Deferred.fromCoroutine(send(reactor, options))

        react(body)
    return orchestrate(options, arguments)


if __name__ == "__main__":
    sys.exit(main())
