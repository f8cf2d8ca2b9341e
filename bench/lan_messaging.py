"""Messaging across two nodes of a virtual LAN: ``python -m bench.lan_messaging`` (root).

Two network namespaces on the bridge of :class:`tests.lan.Lan`, one ``irisnode``
each, which find each other by multicast. Services, members, subscribers and
tunnel sinks attach to node A (the *service node*); requesters, senders and
tunnel sources to node B (the *client node*), so every operation crosses the
link. Measured:

* **linked**: both nodes spawned together, until each lists the other with a
  link up (``irisnode status``, polled every 20 ms), from the later spawn and from
  the later ready line; ``--link-runs`` starts, median;
* **first request served**: a raw member registers on A while a raw client on B
  sends a request (100 ms timeout) every millisecond to its new cluster: from the
  member's ACCEPTED to its first delivered request and to the first reply at B;
  ``--probe-runs`` fresh clusters, median;
* the relay benchmark's scenarios (``bench/relay_runner.py``: request/reply at
  1, 8 and 64 requesters, broadcast, publish, a tunnel), with the CPU of both
  nodes per operation from /proc.

Prints a table and the comparison with the Go figures of issue 7, and writes
``bench/results/lan-messaging-<timestamp>.json``. Nothing leaves the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.relay_node import ProcStats, compile_node
from bench.relay_pool import Pool
from bench.relay_report import Record, format_latency, format_number, render_table
from bench.relay_runner import Runner
from bench.relay_runner import select as select_scenarios
from bench.relay_wire import Wire
from relay import codec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCENARIOS = "rr-c1-16B-s1,rr-c8-16B-s1,rr-c64-16B-s1,bcast-m4,pub-s1,pub-s10,tunnel-64KiB"
SERVICE, CLIENT = 0, 1
"""The namespaces of the service node (A) and the client node (B)."""
PROBE_EVERY = 0.001
PROBE_TIMEOUT_MS = 100


@dataclass(frozen=True, slots=True)
class Comparison:
    """A figure of this run next to the Go node's and irisnode's target (issue 7)."""

    label: str
    unit: str
    go: float | None
    target: float | None
    higher_is_better: bool = False


COMPARISONS: dict[str, Comparison] = {
    "rr64_rate": Comparison("req/reply c=64 16 B", "req/s", 10_060, 15_000, True),
    "rr64_p50": Comparison("req/reply c=64 p50", "ms", 5.5, None),
    "rr64_p99": Comparison("req/reply c=64 p99", "ms", 21.7, None),
    "rr1_p50": Comparison("req/reply c=1 p50", "µs", 455, 300),
    "tunnel": Comparison("tunnel, 64 KiB messages", "MB/s", 129, 260, True),
    "first_reply": Comparison("new member answered from B", "ms", 8, 8),
    "linked": Comparison("two nodes linked after start", "s", 3.3, None),
}
"""The Go node's figures: two nodes in two namespaces on a veth pair, a Go client."""


# -- the two nodes ----------------------------------------------------------------------------


def _linked(lan: Any, ids: dict[int, int]) -> bool:
    from tests.lan import peers_up

    states = lan.statuses([SERVICE, CLIENT])
    return ids[CLIENT] in peers_up(states[SERVICE]) and ids[SERVICE] in peers_up(states[CLIENT])


def start_linked(lan: Any, ids: dict[int, int] | None) -> Record:
    """Spawn both nodes together; seconds until each has the other with a link up."""
    from tests.lan import own_id, wait_until

    nodes = [lan.start_node(i) for i in (SERVICE, CLIENT)]
    spawned = nodes[-1].started
    for node in nodes:
        node.wait_ready(30)
    if ids is None:  # the first start: learn the ids (their files stay: restarts keep them)
        ids = {i: own_id(state) for i, state in lan.statuses([SERVICE, CLIENT]).items()}
    wait_until(lambda: _linked(lan, ids), 30, "the two nodes to link", interval=0.02)
    at = time.monotonic()
    return {
        "after_last_start_s": at - spawned,
        "after_last_ready_s": at - max(node.ready_at or 0.0 for node in nodes),
        "ids": {str(i): f"{node_id:032x}" for i, node_id in ids.items()},
    }


def measure_linked(lan: Any, runs: int) -> list[Record]:
    """``runs`` starts of both nodes; the nodes of the last one keep running."""
    samples: list[Record] = []
    ids: dict[int, int] | None = None
    for run in range(runs):
        sample = start_linked(lan, ids)
        ids = {int(i): int(x, 16) for i, x in sample["ids"].items()}
        samples.append(sample)
        if run < runs - 1:
            for i in (SERVICE, CLIENT):
                lan.nodes[i].stop()
    return samples


# -- a new member, probed from the other node every millisecond ---------------------------------


def first_request(lan: Any, cluster: str, timeout: float = 10.0) -> Record:
    """Register a member of the new ``cluster`` on A while B probes it every 1 ms."""
    from tests.lan import in_netns

    address = ("127.0.0.1", lan.relay_port)
    with in_netns(lan.namespaces[CLIENT]):
        prober = Wire(address)
    with in_netns(lan.namespaces[SERVICE]):
        member = socket.create_connection(address, timeout)
    member.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    member_decoder = codec.client_decoder()
    prober.sock.setblocking(False)
    member.setblocking(False)
    probe_tail = (
        codec.encode_str(cluster)
        + codec.encode_bin(b"probe")
        + codec.encode_varint(PROBE_TIMEOUT_MS)
    )
    record: Record = {"cluster": cluster}
    next_id = 0
    try:
        for _ in range(20):  # 20 ms of probes before the member exists
            prober.send(b"\x04" + codec.encode_varint(next_id) + probe_tail)
            next_id += 1
            time.sleep(PROBE_EVERY)
        member.sendall(codec.Init(cluster).encode())
        init_sent = time.monotonic()
        accepted = delivered = replied = None
        next_probe = init_sent
        deadline = init_sent + timeout
        while replied is None:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"no reply from the new member of {cluster!r} in {timeout} s")
            if now >= next_probe:
                prober.send(b"\x04" + codec.encode_varint(next_id) + probe_tail)
                next_id += 1
                next_probe += PROBE_EVERY
            wait = max(0.0, next_probe - time.monotonic())
            readable, _, _ = select.select([member, prober.sock], [], [], wait)
            now = time.monotonic()
            if member in readable:
                for packet in member_decoder.feed(member.recv(1 << 16)):
                    if isinstance(packet, codec.Accepted):
                        accepted = now
                    elif isinstance(packet, codec.RequestDelivered):
                        delivered = delivered or now
                        member.sendall(codec.Reply(packet.request_id, packet.request).encode())
            if prober.sock in readable:
                for packet in prober.decoder.feed(prober.sock.recv(1 << 16)):
                    if isinstance(packet, codec.Replied):
                        replied = now
        assert accepted is not None and delivered is not None
        record.update(
            accepted_after_init_s=accepted - init_sent,
            delivered_after_accepted_s=delivered - accepted,
            replied_after_accepted_s=replied - accepted,
            probes=next_id,
        )
        return record
    finally:
        member.close()
        prober.sock.close()


def measure_first_requests(lan: Any, runs: int) -> list[Record]:
    return [first_request(lan, f"fresh-{os.getpid()}-{run}") for run in range(runs)]


# -- the relay scenarios across the link ---------------------------------------------------------


def groups_reachable(lan: Any) -> None:
    """Until every cluster and topic with members or subscribers on A has A in its tree,
    so the client node's traffic can reach them before the window opens."""
    from tests.lan import wait_until

    def attached() -> bool:
        state = lan.status(SERVICE)
        trees = state["messaging"]["trees"]
        for kind in ("cluster", "topic"):
            for name, entry in state["groups"][f"{kind}s"].items():
                tree = trees.get(f"{kind} {name}")
                if entry["here"] and not (tree and (tree["root"] or tree["parent"])):
                    return False
        return True

    wait_until(attached, 10, "the service node to join its groups' trees", interval=0.01)


def run_scenarios(lan: Any, patterns: str, duration: float, warmup: float) -> list[Record]:
    scenarios, _ = select_scenarios(patterns)
    runner = Runner(
        Pool(8),
        ("127.0.0.1", lan.relay_port),
        ProcStats(lan.nodes[SERVICE].pid),
        duration,
        warmup,
        service_netns=lan.namespaces[SERVICE],
        load_netns=lan.namespaces[CLIENT],
        others={"client": ProcStats(lan.nodes[CLIENT].pid)},
        before_loads=lambda: groups_reachable(lan),
    )
    records = []
    try:
        for index, scenario in enumerate(scenarios, 1):
            began = time.monotonic()
            record = runner.run(scenario)
            records.append(record)
            print(
                f"[{index}/{len(scenarios)}] {_progress(record)} ({time.monotonic() - began:.1f} s)"
            )
    finally:
        runner.pool.close()
    return records


# -- the report ---------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(document: Record) -> dict[str, float | None]:
    """The figures compared with the Go node, in the units of :data:`COMPARISONS`."""
    by_name = {r["name"]: r for r in document["scenarios"] if not r.get("error")}

    def get(name: str, key: str, scale: float = 1.0) -> float | None:
        value = by_name.get(name, {}).get(key)
        return None if value is None else value * scale

    return {
        "rr64_rate": get("rr-c64-16B-s1", "ops_per_s"),
        "rr64_p50": get("rr-c64-16B-s1", "p50_us", 1e-3),
        "rr64_p99": get("rr-c64-16B-s1", "p99_us", 1e-3),
        "rr1_p50": get("rr-c1-16B-s1", "p50_us"),
        "tunnel": get("tunnel-64KiB", "ops_per_s"),
        "first_reply": _scaled(
            _median([r["replied_after_accepted_s"] for r in document["first_request"]]), 1e3
        ),
        "linked": _median([r["after_last_start_s"] for r in document["linked"]]),
    }


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def scenario_rows(records: Sequence[Record]) -> str:
    rows = []
    for record in records:
        if record.get("error"):
            rows.append([record["name"], "FAILED (below)", "", "", "", "", "", ""])
            continue
        client = record.get("other_nodes", {}).get("client", {})
        per_mb = record["unit"] == "MB/s"
        rows.append(
            [
                record["name"],
                f"{format_number(record['ops_per_s'])} {record['unit']}",
                format_latency(record.get("p50_us")),
                format_latency(record.get("p99_us")),
                _cpu(record.get("cpu_us_per_op"), per_mb),
                _busy(record.get("node_busy")),
                _cpu(client.get("cpu_us_per_op"), per_mb),
                _busy(client.get("busy")),
            ]
        )
    header = ["scenario", "throughput", "p50", "p99", "A CPU/op", "A busy", "B CPU/op", "B busy"]
    failures = [f"{r['name']} failed: {r['error']}" for r in records if r.get("error")]
    return "\n".join([render_table(header, rows), *failures])


def _cpu(value: float | None, per_mb: bool) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1000:.2f} ms/MB" if per_mb else f"{value:.1f} µs"


def _busy(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def comparison_rows(figures: dict[str, float | None]) -> str:
    rows = []
    for key, comparison in COMPARISONS.items():
        value = figures.get(key)
        verdict = "—"
        if value is not None and comparison.target is not None:
            met = (
                value >= comparison.target
                if comparison.higher_is_better
                else value <= comparison.target
            )
            verdict = "meets" if met else f"MISSES ({value / comparison.target:.2f} of target)"
        bound = "≥" if comparison.higher_is_better else "≤"
        rows.append(
            [
                comparison.label,
                comparison.unit,
                "n/a" if value is None else format_number(value),
                "—" if comparison.go is None else format_number(comparison.go),
                "—" if value is None or not comparison.go else f"{value / comparison.go:.2f}",
                "—" if comparison.target is None else f"{bound} {comparison.target:g}",
                verdict,
            ]
        )
    header = ["figure", "unit", "measured", "Go", "/Go", "target", "verdict"]
    return render_table(header, rows, left=2)


def _progress(record: Record) -> str:
    if record.get("error"):
        return f"{record['name']}: FAILED: {record['error']}"
    text = f"{record['name']}: {format_number(record['ops_per_s'])} {record['unit']}"
    if record.get("p50_us") is not None:
        text += f", p50 {format_latency(record['p50_us'])}, p99 {format_latency(record['p99_us'])}"
    return text


# -- the command ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from tests.lan import Lan, netns_available

    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m bench.lan_messaging", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds (3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds (0.5)")
    parser.add_argument("--scenarios", default=SCENARIOS, help=f"patterns (default {SCENARIOS})")
    parser.add_argument("--link-runs", type=int, default=5, help="starts of both nodes (5)")
    parser.add_argument("--probe-runs", type=int, default=10, help="new members probed (10)")
    parser.add_argument("--quick", action="store_true", help="tiny runs: plumbing, not figures")
    parser.add_argument("--json", type=Path, help="default bench/results/lan-messaging-*.json")
    options = parser.parse_args(arguments)
    if options.quick:
        options.duration, options.warmup, options.link_runs, options.probe_runs = 0.3, 0.1, 1, 2
    reason = netns_available()
    if reason is not None:
        print(f"lan_messaging: {reason}", file=sys.stderr)
        return 2
    compile_node()
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with Lan(2, tag="bench-msg") as lan:
        lan.start_agents()
        print(f"two nodes, {options.link_runs} starts ...", flush=True)
        linked = measure_linked(lan, options.link_runs)
        print(f"a new member on A, probed from B every ms, {options.probe_runs} times ...")
        first = measure_first_requests(lan, options.probe_runs)
        scenarios = run_scenarios(lan, options.scenarios, options.duration, options.warmup)
    document: Record = {
        "schema": "irisnode-lan-messaging-bench/1",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.lan_messaging", *arguments]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "settings": {
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "link_runs": options.link_runs,
            "probe_runs": options.probe_runs,
            "scenarios": options.scenarios,
        },
        "linked": linked,
        "first_request": first,
        "scenarios": scenarios,
    }
    figures = summary(document)
    document["summary"] = figures
    print()
    print(scenario_rows(scenarios))
    print()
    linked_s = [r["after_last_start_s"] for r in linked]
    ready_s = [r["after_last_ready_s"] for r in linked]
    replies = [r["replied_after_accepted_s"] * 1e3 for r in first]
    deliveries = [r["delivered_after_accepted_s"] * 1e3 for r in first]
    print(
        f"linked after the later start: median {_median(linked_s):.3f} s"
        f" ({min(linked_s):.3f}-{max(linked_s):.3f}); after the later ready line"
        f" {_median(ready_s):.3f} s"
    )
    print(
        f"new member on A: first request delivered {_median(deliveries):.1f} ms, answered at B"
        f" {_median(replies):.1f} ms after its ACCEPTED (median of {len(first)};"
        f" {min(replies):.1f}-{max(replies):.1f} ms)"
    )
    print(
        f"load average before {load_before[0]:.2f}, after {document['machine']['load_average_after'][0]:.2f}"
    )
    print()
    print(comparison_rows(figures))
    path = options.json or RESULTS_DIR / f"lan-messaging-{started:%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 1 if any(r.get("error") for r in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
