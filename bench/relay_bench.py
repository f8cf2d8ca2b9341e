"""The relay benchmark: ``python -m bench`` (``--help`` for the options).

Starts its own node (``irisnode --relay-port 0`` with this Python) or targets any
node that speaks the relay protocol (``--relay HOST:PORT``, loopback only), drives it
from spawned load-generator processes, and reports throughput, latency, and the
node's own CPU time per operation and memory, next to the original Go node's
figures and irisnode's targets. See ``docs/benchmarks.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.relay_node import NodeError, NodeProcess, ProcStats
from bench.relay_pool import Pool
from bench.relay_report import Record, checks_table, evaluate, node_summary, scenario_table
from bench.relay_runner import Runner, all_scenarios, select
from bench.relay_wire import RelayError, Wire

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POOL_SIZE = 8
"""Worker processes: enough for the largest scenario (4 services + 4 requester processes)."""

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
