"""The relay benchmark: ``python -m bench`` (``--help`` for the options).

Starts its own node (``irisnode --relay-port 0`` with this Python) or targets any
node that speaks the relay protocol (``--relay HOST:PORT``, loopback only), drives it
from spawned load-generator processes, and reports throughput, latency, and the
node's own CPU time per operation and memory, next to the original Go node's
figures and irisnode's targets. See ``docs/benchmarks.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import ipaddress
import json
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from bench.relay_node import NodeError, NodeProcess, ProcStats
from bench.relay_pool import Pool, Result, RoleFailed, Window, Worker
from bench.relay_report import (
    Record,
    checks_table,
    evaluate,
    node_summary,
    percentile,
    scenario_table,
)
from bench.relay_wire import RelayError, Wire

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POOL_SIZE = 8
"""Worker processes: enough for the largest scenario (4 services + 4 requester processes)."""

Part = tuple[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kind: str  # "request", "broadcast", "publish", "tunnel" or "tcp"
    concurrency: int = 0
    payload: int = 16
    services: int = 0
    receivers: int = 0
    message: int = 64 * 1024

    def params(self) -> dict[str, int]:
        if self.kind == "request":
            return {
                "concurrency": self.concurrency,
                "payload": self.payload,
                "services": self.services,
            }
        if self.kind in ("broadcast", "publish"):
            return {"receivers": self.receivers, "payload": self.payload}
        return {"message": self.message}


def _size_label(size: int) -> str:
    return f"{size // 1024}KiB" if size % 1024 == 0 else f"{size}B"


def all_scenarios() -> list[Scenario]:
    """Every scenario, in the order they run."""
    scenarios = [
        Scenario(f"rr-c{c}-{_size_label(p)}-s{s}", "request", concurrency=c, payload=p, services=s)
        for s in (1, 4)
        for p in (16, 1024)
        for c in (1, 8, 64)
    ]
    scenarios += [
        Scenario("bcast-m4", "broadcast", receivers=4),
        Scenario("pub-s1", "publish", receivers=1),
        Scenario("pub-s10", "publish", receivers=10),
        Scenario("tunnel-64KiB", "tunnel"),
        Scenario("tcp-64KiB", "tcp"),
    ]
    return scenarios


def select(patterns: str | None) -> tuple[list[Scenario], bool]:
    """Scenarios matching comma-separated glob patterns or prefixes; and whether ``ready`` is in."""
    scenarios = all_scenarios()
    if not patterns:
        return scenarios, True
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or name.startswith(p) for p in wanted)

    return [s for s in scenarios if matches(s.name)], matches("ready")


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class Measured(NamedTuple):
    node: tuple[float, float] | None  # the node's (user, system) CPU seconds in the window
    generators: float | None  # CPU seconds of all the scenario's worker processes


@dataclass
class Execution:
    services: list[Result]
    loads: list[Result]
    window: Window
    cpu: Measured


@dataclass
class Runner:
    """Runs scenarios against one node with one pool of workers."""

    pool: Pool
    address: tuple[str, int]
    stats: ProcStats | None
    duration: float
    warmup: float
    requester_procs: int = 4
    settle_limit: float = 3.0
    rss_peak: int = 0
    last_tunnel_bytes: int = 0
    _scenario_peak: int = 0
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))

    # -- one scenario ----------------------------------------------------------------

    def run(self, scenario: Scenario) -> Record:
        record: Record = {
            "name": scenario.name,
            "kind": scenario.kind,
            "params": scenario.params(),
            "ops": None,
            "unit": "MB/s" if scenario.kind in ("tunnel", "tcp") else "req/s",
            "seconds": None,
            "ops_per_s": None,
            "p50_us": None,
            "p99_us": None,
            "node_cpu_s": None,
            "node_cpu_user_s": None,
            "node_cpu_system_s": None,
            "node_busy": None,
            "cpu_us_per_op": None,
            "generators_cpu_s": None,
            "generators_busy": None,
            "rss_peak_bytes": None,
            "error": None,
            "detail": {},
        }
        if scenario.kind in ("broadcast", "publish"):
            record["unit"] = "deliveries/s"
        try:
            handler = getattr(self, f"_{scenario.kind}")
            handler(scenario, record)
        except (RoleFailed, NodeError, OSError) as error:
            summary, _, detail = str(error).partition("\n")
            record["error"] = summary
            record["detail"]["traceback"] = detail or None
        return record

    def _request(self, scenario: Scenario, record: Record) -> None:
        cluster = f"bench-echo-{scenario.services}"
        procs = min(scenario.concurrency, self.requester_procs)
        services = [
            ("echo_service", {"address": self.address, "cluster": cluster})
        ] * scenario.services
        loads = [
            (
                "requester",
                {
                    "address": self.address,
                    "cluster": cluster,
                    "slots": slots,
                    "payload_size": scenario.payload,
                },
            )
            for slots in _spread(scenario.concurrency, procs)
        ]
        run = self._execute(services, lambda infos: loads)
        latencies: list[float] = []
        for result in run.loads:
            values = memoryview(result["latencies_us"]).cast("d")
            latencies.extend(values.tolist())
        latencies.sort()
        completed = sum(r["completed"] for r in run.loads)
        self._fill(record, run, completed, completed)
        record["p50_us"] = percentile(latencies, 0.50)
        record["p99_us"] = percentile(latencies, 0.99)
        record["detail"] = {
            "requester_processes": procs,
            "slots_per_process": _spread(scenario.concurrency, procs),
            "errors": sum(r["errors"] for r in run.loads),
            "unanswered": sum(r["unanswered"] for r in run.loads),
            "served_per_service": [r.get("served") for r in run.services],
        }

    def _broadcast(self, scenario: Scenario, record: Record) -> None:
        self._fan_out(scenario, record, "broadcast", "bench-bcast")

    def _publish(self, scenario: Scenario, record: Record) -> None:
        self._fan_out(scenario, record, "publish", f"bench-topic-{scenario.receivers}")

    def _fan_out(self, scenario: Scenario, record: Record, kind: str, name: str) -> None:
        procs = min(scenario.receivers, 4)
        sinks = [
            (
                "member_sink",
                {
                    "address": self.address,
                    "kind": kind,
                    "name": name,
                    "connections": count,
                    "payload_size": scenario.payload,
                },
            )
            for count in _spread(scenario.receivers, procs)
        ]
        sender = (
            "flooder",
            {"address": self.address, "kind": kind, "name": name, "payload_size": scenario.payload},
        )
        run = self._execute(sinks, lambda infos: [sender])
        deliveries = sum(r["deliveries"] for r in run.services)
        sent = sum(r["sent"] for r in run.loads)
        self._fill(record, run, deliveries, deliveries)
        record["detail"] = {
            "receiver_processes": procs,
            "sent_in_window": sent,  # includes what the kernel buffered: not a loss measure
            "delivered_in_run": sum(r["total"] for r in run.services),
            "only_expected_frames": all(r["exact"] for r in run.services),
        }

    def _tunnel(self, scenario: Scenario, record: Record) -> None:
        cluster = "bench-tunnel"
        sink = ("tunnel_sink", {"address": self.address, "cluster": cluster})
        source = (
            "tunnel_source",
            {"address": self.address, "cluster": cluster, "message_size": scenario.message},
        )
        run = self._execute([sink], lambda infos: [source])
        received = run.services[0]["bytes"]
        self.last_tunnel_bytes = received
        self._fill(record, run, received / 1e6, received / 1e6)
        record["detail"] = {"bytes": received, "sent_in_window": run.loads[0]["sent"]}

    def _tcp(self, scenario: Scenario, record: Record) -> None:
        total = max(self.last_tunnel_bytes, 16 * 1024 * 1024)
        sink = ("tcp_sink", {"total_bytes": total})

        def source(infos: list[Any]) -> list[Part]:
            port = infos[0]["port"]
            params = {"port": port, "total_bytes": total, "block_size": scenario.message}
            return [("tcp_source", params)]

        run = self._execute([sink], source, timed=False)
        result = run.services[0]
        if result["bytes"] < total:
            raise RoleFailed(f"raw TCP copy received {result['bytes']} of {total} bytes")
        record["ops"] = result["bytes"] / 1e6
        record["seconds"] = result["seconds"]
        record["ops_per_s"] = result["bytes"] / 1e6 / max(result["seconds"], 1e-9)
        record["detail"] = {"bytes": result["bytes"], "note": "no relay node involved"}

    def _fill(self, record: Record, run: Execution, ops: float, per: float) -> None:
        seconds = run.window.seconds
        record["ops"] = ops
        record["seconds"] = seconds
        record["ops_per_s"] = ops / seconds
        if run.cpu.generators is not None:
            record["generators_cpu_s"] = run.cpu.generators
            record["generators_busy"] = run.cpu.generators / seconds
        if run.cpu.node is not None:
            user, system = run.cpu.node
            record["node_cpu_s"] = user + system
            record["node_cpu_user_s"] = user
            record["node_cpu_system_s"] = system
            record["node_busy"] = (user + system) / seconds
            if per:
                record["cpu_us_per_op"] = (user + system) * 1e6 / per
        if self.stats is not None:
            record["rss_peak_bytes"] = self._scenario_peak

    # -- the choreography shared by every scenario -----------------------------------------

    def _execute(
        self,
        services: Sequence[Part],
        loads_for: Callable[[list[Any]], Sequence[Part]],
        timed: bool = True,
    ) -> Execution:
        """Start services, then loads; open the window; measure the node; collect results.

        Always leaves every worker idle again (stopping, or killing and replacing it).
        """
        service_workers = self.pool.take(len(services))
        load_workers: list[Worker] = []
        used = list(service_workers)
        try:
            self.settle()
            deadline = time.monotonic() + 15.0
            for worker, (role, params) in zip(service_workers, services, strict=True):
                worker.run(role, params)
            infos = [worker.expect("ready", deadline) for worker in service_workers]
            loads = list(loads_for(infos))
            load_workers = self.pool.take(len(services) + len(loads))[len(services) :]
            used += load_workers
            for worker, (role, params) in zip(load_workers, loads, strict=True):
                worker.run(role, params)
            for worker in load_workers:
                worker.expect("ready", deadline)
            self.settle()
            lead = 0.02 + (self.warmup if timed else 0.0)
            start = time.monotonic_ns() + int(lead * 1e9)
            window = Window(start, start + int((self.duration if timed else 0.0) * 1e9))
            for worker in used:
                worker.go(window)
            generators = [ProcStats(w.pid) for w in used if w.pid is not None]
            measured = self._measure(window, generators) if timed else Measured(None, None)
            finish = window.end_ns / 1e9 + 15.0
            load_results = [worker.expect("result", finish) for worker in load_workers]
            for worker in service_workers:
                worker.stop()
            stop_deadline = time.monotonic() + 15.0
            service_results = [worker.expect("result", stop_deadline) for worker in service_workers]
            return Execution(service_results, load_results, window, measured)
        finally:
            for worker in used:
                if worker.busy:
                    worker.stop()
                    try:
                        worker.expect("result", time.monotonic() + 3.0)
                    except RoleFailed:
                        worker.restart()

    def _measure(self, window: Window, generators: list[ProcStats]) -> Measured:
        """CPU seconds inside the window of the node (user, system) and of the load
        generators (all worker processes of the scenario), sampling the node's RSS meanwhile."""
        stats = self.stats
        self._scenario_peak = 0
        _sleep_until(window.start_ns)
        generators_before = _total_cpu(generators)
        if stats is None:
            _sleep_until(window.end_ns)
            return Measured(None, _total_cpu(generators) - generators_before)
        user, system = stats.cpu_times()
        while time.monotonic_ns() < window.end_ns:
            self._scenario_peak = max(self._scenario_peak, stats.rss())
            _sleep_until(min(window.end_ns, time.monotonic_ns() + 50_000_000))
        user_after, system_after = stats.cpu_times()
        generators_cpu = _total_cpu(generators) - generators_before
        self._scenario_peak = max(self._scenario_peak, stats.rss())
        self.rss_peak = max(self.rss_peak, self._scenario_peak)
        return Measured((user_after - user, system_after - system), generators_cpu)

    def settle(self) -> None:
        """Wait (briefly) until the node is idle, so one scenario's tail is not billed to the next."""
        if self.stats is None:
            return
        deadline = time.monotonic() + self.settle_limit
        last = self.stats.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.stats.cpu_seconds()
            if now == last:
                return
            last = now


def _total_cpu(processes: list[ProcStats]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(NodeError):  # a worker that just died: its scenario says so
            total += process.cpu_seconds()
    return total


def _sleep_until(deadline_ns: int) -> None:
    left = (deadline_ns - time.monotonic_ns()) / 1e9
    if left > 0:
        time.sleep(left)


# -- the command -----------------------------------------------------------------------------


def loopback_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` resolved to a loopback address (nothing leaves this host)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise argparse.ArgumentTypeError(f"cannot resolve {host!r}: {error}") from None
    for _, _, _, _, sockaddr in infos:
        if not ipaddress.ip_address(sockaddr[0]).is_loopback:
            raise argparse.ArgumentTypeError(f"{host!r} is not a loopback address")
    return str(infos[0][4][0]), int(port_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark an Iris relay node: request/reply, broadcast, publish, tunnels, "
        "node CPU and memory, start-up time.",
    )
    parser.add_argument(
        "--relay",
        type=loopback_address,
        metavar="HOST:PORT",
        help="measure this running node instead of starting one (loopback only)",
    )
    parser.add_argument(
        "--node-pid",
        type=int,
        metavar="PID",
        help="with --relay: the node's PID, for its CPU and memory figures (else n/a)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny runs: a smoke test, not figures")
    parser.add_argument("--duration", type=float, metavar="S", help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, metavar="S", help="unmeasured seconds before it")
    parser.add_argument(
        "--scenarios",
        metavar="PATTERNS",
        help="comma-separated names, prefixes or globs (e.g. 'rr-c64-*,bcast,ready'); see --list",
    )
    parser.add_argument("--list", action="store_true", help="list the scenario names and exit")
    parser.add_argument(
        "--ready-runs", type=int, metavar="N", help="node starts timed for 'ready' (median)"
    )
    parser.add_argument(
        "--requester-procs",
        type=int,
        default=4,
        metavar="N",
        help="processes the requesters of a scenario are spread over (default 4)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the results (default bench/results/relay-<timestamp>.json)",
    )
    return parser


def machine_info() -> dict[str, Any]:
    model = None
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
        "load_average": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join([s.name for s in all_scenarios()] + ["ready"]))
        return 0
    if args.node_pid is not None and args.relay is None:
        parser.error("--node-pid only makes sense with --relay")
    duration = args.duration if args.duration is not None else (0.3 if args.quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 0.5)
    ready_runs = args.ready_runs if args.ready_runs is not None else (2 if args.quick else 5)
    scenarios, want_ready = select(args.scenarios)
    if not scenarios and not want_ready:
        parser.error(f"no scenario matches {args.scenarios!r} (see --list)")
    started = datetime.now(UTC)
    machine = machine_info()  # the load average before this run loads the machine
    json_path = args.json or RESULTS_DIR / f"relay-{started:%Y%m%dT%H%M%SZ}.json"

    node: NodeProcess | None = None
    node_record: Record = {
        "mode": "external" if args.relay else "started",
        "address": None,
        "pid": args.node_pid,
        "ready_s": None,
        "ready_samples_s": [],
        "rss_idle_bytes": None,
        "rss_peak_bytes": None,
        "rss_after_bytes": None,
        "vm_hwm_bytes": None,
    }
    records: list[Record] = []
    try:
        if args.relay:
            address: tuple[str, int] = args.relay
        else:
            samples = []
            for _ in range(ready_runs - 1 if want_ready else 0):
                timed = NodeProcess()
                samples.append(timed.ready_seconds)
                timed.stop()
            node = NodeProcess()
            samples.append(node.ready_seconds)
            address = node.address
            node_record["pid"] = node.pid
            if want_ready:
                node_record["ready_samples_s"] = samples
                node_record["ready_s"] = sorted(samples)[len(samples) // 2]
        node_record["address"] = f"{address[0]}:{address[1]}"
        try:
            Wire(address).close()  # fail now, not once per scenario
        except (OSError, RelayError) as error:
            print(f"cannot use the relay at {node_record['address']}: {error}", file=sys.stderr)
            return 2
        stats = ProcStats(node_record["pid"]) if node_record["pid"] else None
        runner = Runner(
            Pool(POOL_SIZE if scenarios else 0),
            address,
            stats,
            duration,
            warmup,
            requester_procs=max(1, args.requester_procs),
            settle_limit=1.0 if args.quick else 3.0,
        )
        if stats is not None:
            runner.settle()
            node_record["rss_idle_bytes"] = stats.rss()
        try:
            for index, scenario in enumerate(scenarios, 1):
                if node is not None and not node.alive():
                    raise NodeError(f"the node exited; its log ends:\n{node.log}")
                began = time.monotonic()
                record = runner.run(scenario)
                records.append(record)
                runner.log(
                    f"[{index}/{len(scenarios)}] {_progress(record)} "
                    f"({time.monotonic() - began:.1f} s)"
                )
        finally:
            runner.pool.close()
        if stats is not None:
            runner.settle()
            memory = stats.memory()
            node_record["rss_after_bytes"] = memory.get("VmRSS")
            node_record["vm_hwm_bytes"] = memory.get("VmHWM")
            node_record["rss_peak_bytes"] = max(runner.rss_peak, memory.get("VmHWM", 0))
    finally:
        if node is not None:
            node.stop()

    checks = evaluate(records, node_record)
    print()
    print(node_summary(node_record))
    print()
    print(scenario_table(records, checks))
    print()
    print(checks_table(checks))
    document = {
        "schema": "irisnode-relay-bench/1",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *(argv or sys.argv[1:])]),
        "machine": {**machine, "load_average_after": os.getloadavg()},
        "settings": {
            "duration_s": duration,
            "warmup_s": warmup,
            "quick": args.quick,
            "ready_runs": ready_runs if want_ready and not args.relay else 0,
            "requester_processes": args.requester_procs,
            "scenarios": args.scenarios,
        },
        "node": node_record,
        "scenarios": records,
        "checks": checks,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {json_path}")
    return 1 if any(r["error"] for r in records) else 0


def _progress(record: Record) -> str:
    if record["error"]:
        return f"{record['name']}: FAILED: {record['error']}"
    parts = [f"{record['name']}: {record['ops_per_s']:,.1f} {record['unit']}"]
    if record["p50_us"] is not None:
        parts.append(f"p50 {record['p50_us']:.0f} µs, p99 {record['p99_us']:.0f} µs")
    if record["cpu_us_per_op"] is not None:
        parts.append(f"node CPU {record['cpu_us_per_op']:.1f} µs/op")
    if record["node_busy"] is not None:
        parts.append(f"node busy {record['node_busy']:.0%}")
    if record["generators_busy"] is not None:
        parts.append(f"generators {record['generators_busy']:.0%} of a core")
    detail = record["detail"]
    if detail.get("errors") or detail.get("unanswered"):
        parts.append(f"{detail['errors']} failed and {detail['unanswered']} unanswered requests")
    return "; ".join(parts)
