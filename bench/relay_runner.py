"""The relay benchmark's scenarios and how they run: :class:`Runner` drives one node.

A scenario starts its services (members, subscribers, sinks) in worker processes,
then its loads, opens a measured window, and reads the node's CPU (and the load
generators') from /proc across it. ``bench/relay_bench.py`` runs it against one
node on loopback; ``bench/lan_messaging.py`` runs it with the services in one
network namespace and the loads in another, each next to its own node.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bench.relay_node import NodeError, ProcStats
from bench.relay_pool import Pool, Result, RoleFailed, Window, Worker
from bench.relay_report import Record, percentile

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
    others: dict[str, tuple[float, float]] | None = None  # the same for Runner.others


@dataclass
class Execution:
    services: list[Result]
    loads: list[Result]
    window: Window
    cpu: Measured


@dataclass
class Runner:
    """Runs scenarios against one node with one pool of workers.

    On a LAN the services and the loads may sit in two network namespaces
    (``service_netns``, ``load_netns``), each reaching its own node at ``address``;
    ``stats`` is then the services' node and ``others`` the further nodes whose CPU
    is measured across the same window (``record["other_nodes"]``).
    """

    pool: Pool
    address: tuple[str, int]
    stats: ProcStats | None
    duration: float
    warmup: float
    requester_procs: int = 4
    settle_limit: float = 3.0
    service_netns: str | None = None
    load_netns: str | None = None
    others: dict[str, ProcStats] = field(default_factory=dict)
    before_loads: Callable[[], None] | None = None
    """Called once the services are ready, before any load starts (on a LAN: until
    the loads' node can reach them)."""
    rss_peak: int = 0
    last_tunnel_bytes: int = 0
    _scenario_peak: int = 0
    _other_peaks: dict[str, int] = field(default_factory=dict)
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
        if run.cpu.others is not None:
            record["other_nodes"] = {
                label: {
                    "cpu_s": user + system,
                    "cpu_user_s": user,
                    "cpu_system_s": system,
                    "busy": (user + system) / seconds,
                    "cpu_us_per_op": (user + system) * 1e6 / per if per else None,
                    "rss_peak_bytes": self._other_peaks.get(label),
                }
                for label, (user, system) in run.cpu.others.items()
            }

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
                worker.run(role, params, self.service_netns)
            infos = [worker.expect("ready", deadline) for worker in service_workers]
            if self.before_loads is not None:
                self.before_loads()
            loads = list(loads_for(infos))
            load_workers = self.pool.take(len(services) + len(loads))[len(services) :]
            used += load_workers
            for worker, (role, params) in zip(load_workers, loads, strict=True):
                worker.run(role, params, self.load_netns)
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
        self._other_peaks = dict.fromkeys(self.others, 0)
        _sleep_until(window.start_ns)
        generators_before = _total_cpu(generators)
        if stats is None:
            _sleep_until(window.end_ns)
            return Measured(None, _total_cpu(generators) - generators_before)
        others_before = {label: other.cpu_times() for label, other in self.others.items()}
        user, system = stats.cpu_times()
        while time.monotonic_ns() < window.end_ns:
            self._sample_rss()
            _sleep_until(min(window.end_ns, time.monotonic_ns() + 50_000_000))
        user_after, system_after = stats.cpu_times()
        others = {
            label: _spent(others_before[label], other.cpu_times())
            for label, other in self.others.items()
        }
        generators_cpu = _total_cpu(generators) - generators_before
        self._sample_rss()
        self.rss_peak = max(self.rss_peak, self._scenario_peak)
        node = _spent((user, system), (user_after, system_after))
        return Measured(node, generators_cpu, others if self.others else None)

    def _sample_rss(self) -> None:
        if self.stats is not None:
            self._scenario_peak = max(self._scenario_peak, self.stats.rss())
        for label, other in self.others.items():
            self._other_peaks[label] = max(self._other_peaks[label], other.rss())

    def settle(self) -> None:
        """Wait (briefly) until the nodes are idle, so one scenario's tail is not billed to
        the next."""
        nodes = [*([self.stats] if self.stats is not None else []), *self.others.values()]
        if not nodes:
            return
        deadline = time.monotonic() + self.settle_limit
        last = [node.cpu_seconds() for node in nodes]
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = [node.cpu_seconds() for node in nodes]
            if now == last:
                return
            last = now


def _spent(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    """(user, system) CPU seconds between two readings."""
    return after[0] - before[0], after[1] - before[1]


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
