"""Figures to compare against, and the two outputs: a table for people, JSON for tools.

The Go figures are those of the original Iris node (project-iris/iris v0.3.x) on a
2-core machine of this kind with a Go client, as quoted in the benchmark issue; the
targets are irisnode's goals on the same workloads. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Check:
    """One figure compared with the Go node and, where there is one, with our target.

    ``go`` and ``target`` are in display units: the measured value times ``scale``.
    Targets are upper bounds (CPU, latency, time, memory); throughput only has a Go
    figure, where higher is better.
    """

    scenario: str  # a scenario name, or "node" for node-wide figures
    metric: str  # key in that scenario's (or the node's) record
    label: str
    unit: str
    go: float | None
    target: float | None = None
    scale: float = 1.0
    higher_is_better: bool = False


CHECKS: tuple[Check, ...] = (
    Check(
        "rr-c64-16B-s1",
        "ops_per_s",
        "req/reply c=64 16 B throughput",
        "req/s",
        18_450,
        None,
        1,
        True,
    ),
    Check("rr-c64-16B-s1", "p99_us", "req/reply c=64 16 B p99", "ms", 17.8, None, 1e-3),
    Check("rr-c64-16B-s1", "cpu_us_per_op", "node CPU per request", "µs", 66, 33),
    Check("rr-c1-16B-s1", "p50_us", "req/reply c=1 16 B p50", "µs", 243, 150),
    Check(
        "bcast-m4", "ops_per_s", "broadcast to 4 members", "deliveries/s", 205_000, None, 1, True
    ),
    Check("bcast-m4", "cpu_us_per_op", "node CPU per broadcast delivery", "µs", 5.7, 3.5),
    Check(
        "pub-s10", "ops_per_s", "publish to 10 subscribers", "deliveries/s", 173_000, None, 1, True
    ),
    Check("pub-s10", "cpu_us_per_op", "node CPU per publish delivery (10 subs)", "µs", 4.4, 3.5),
    Check("pub-s1", "cpu_us_per_op", "node CPU per publish delivery (1 sub)", "µs", None, 3.5),
    Check(
        "tunnel-64KiB",
        "ops_per_s",
        "tunnel throughput, 64 KiB messages",
        "MB/s",
        181,
        None,
        1,
        True,
    ),
    Check("tunnel-64KiB", "cpu_us_per_op", "node CPU per tunnel MB", "ms", 8, 4, 1e-3),
    Check("node", "ready_s", "start to relay ready (median)", "s", 10.2, 0.3),
    Check("node", "rss_idle_bytes", "node RSS idle", "MB", 9, 30, 1e-6),
    Check("node", "rss_peak_bytes", "node RSS peak under load", "MB", 170, 120, 1e-6),
)


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def evaluate(scenarios: Sequence[Record], node: Record) -> list[Record]:
    """Every check with its measured value (None when not measured) and the two ratios."""
    by_name = {record["name"]: record for record in scenarios}
    results = []
    for check in CHECKS:
        source = node if check.scenario == "node" else by_name.get(check.scenario, {})
        raw = source.get(check.metric)
        measured = raw * check.scale if raw is not None else None
        ratio_go = measured / check.go if measured is not None and check.go else None
        ratio_target = measured / check.target if measured is not None and check.target else None
        results.append(
            {
                "scenario": check.scenario,
                "metric": check.metric,
                "label": check.label,
                "unit": check.unit,
                "measured": measured,
                "go": check.go,
                "ratio_to_go": ratio_go,
                "go_is_better": (
                    None
                    if ratio_go is None
                    else (ratio_go < 1)
                    if check.higher_is_better
                    else (ratio_go > 1)
                ),
                "target": check.target,
                "ratio_to_target": ratio_target,
                "meets_target": None if ratio_target is None else ratio_target <= 1.0,
            }
        )
    return results


# -- the human table ----------------------------------------------------------------------


def format_number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_latency(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def _cpu(record: Record) -> str:
    value = record.get("cpu_us_per_op")
    if value is None:
        return "n/a"
    if record["unit"] == "MB/s":
        return f"{value / 1000:.2f} ms/MB"
    return f"{value:.1f} µs"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns padded to width; the first ``left`` columns flush left, numbers flush right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def scenario_table(scenarios: Sequence[Record], checks: Sequence[Record]) -> str:
    """One row per scenario: "vs Go" is throughput over Go's, "vs target" the row's target
    figure over the target (at most 1 meets it)."""
    go_rate = {c["scenario"]: c for c in checks if c["metric"] == "ops_per_s"}
    targets = {c["scenario"]: c for c in checks if c["target"] is not None}
    rows = []
    for record in scenarios:
        name = record["name"]
        if record.get("error"):
            rows.append([name, "FAILED", "", "", "", "", "", "", "", ""])
            continue
        rate = record.get("ops_per_s")
        go = go_rate.get(name)
        target = targets.get(name)
        rows.append(
            [
                name,
                "n/a" if rate is None else f"{format_number(rate)} {record['unit']}",
                format_latency(record.get("p50_us")),
                format_latency(record.get("p99_us")),
                _cpu(record),
                "n/a" if record.get("node_busy") is None else f"{record['node_busy']:.0%}",
                "—" if go is None else f"{format_number(go['go'])}",
                _ratio(go["ratio_to_go"]) if go else "—",
                "—"
                if target is None
                else f"{target['metric'].split('_')[0]} ≤ {target['target']:g} {target['unit']}",
                _ratio(target["ratio_to_target"]) if target else "—",
            ]
        )
    header = [
        "scenario",
        "throughput",
        "p50",
        "p99",
        "node CPU/op",
        "node busy",
        "Go",
        "vs Go",
        "target",
        "vs target",
    ]
    return render_table(header, rows)


def checks_table(checks: Sequence[Record]) -> str:
    """Every Go figure and target with the measured value next to it."""
    rows = []
    for check in checks:
        measured = check["measured"]
        verdict = "n/a"
        if check["meets_target"] is not None:
            verdict = "meets" if check["meets_target"] else "MISSES"
        elif check["go_is_better"] is not None:
            verdict = "below Go" if check["go_is_better"] else "beats Go"
        rows.append(
            [
                check["label"],
                check["unit"],
                "n/a" if measured is None else format_number(measured),
                "—" if check["go"] is None else f"{check['go']:,g}",
                _ratio(check["ratio_to_go"]),
                "—" if check["target"] is None else f"≤ {check['target']:g}",
                verdict,
            ]
        )
    header = ["figure", "unit", "measured", "Go", "vs Go", "target", "verdict"]
    return render_table(header, rows, left=2)


def node_summary(node: Record) -> str:
    def mb(key: str) -> str:
        value = node.get(key)
        return "n/a" if value is None else f"{value / 1e6:.1f} MB"

    ready = node.get("ready_s")
    return (
        f"node: {node.get('mode')} at {node.get('address')} (pid {node.get('pid') or 'n/a'}); "
        f"ready {'n/a' if ready is None else f'{ready * 1000:.0f} ms'}; "
        f"RSS idle {mb('rss_idle_bytes')}, peak {mb('rss_peak_bytes')}, "
        f"after load {mb('rss_after_bytes')}"
    )
