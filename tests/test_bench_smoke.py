"""The relay benchmark runs end to end with tiny counts: a table, and JSON with every figure.

These are smoke tests, not measurements: they prove the load generators, the node
bookkeeping and the report fit together, on a node started on port 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.relay_node import NodeProcess
from bench.relay_report import CHECKS

ROOT = Path(__file__).resolve().parent.parent

# One scenario of every kind, and every scenario a Go figure or a target refers to.
SCENARIOS = ["rr-c1-16B-s1", "rr-c64-16B-s1", "bcast-m4", "pub-s1", "pub-s10", "tunnel-64KiB"]
TINY = ["--quick", "--duration", "0.15", "--warmup", "0.05"]


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", *TINY, "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    document: dict[str, Any] = json.loads(out.read_text())
    return done.stdout, document


def test_own_node_reports_every_figure(tmp_path: Path) -> None:
    wanted = [*SCENARIOS, "tcp-64KiB"]
    table, document = run_bench(tmp_path, "--scenarios", ",".join([*wanted, "ready"]))

    for name in wanted:
        assert name in table
    assert "vs Go" in table and "verdict" in table

    records = {record["name"]: record for record in document["scenarios"]}
    assert sorted(records) == sorted(wanted)
    for record in records.values():
        assert record["error"] is None, record["name"]
        assert set(record) >= {"ops_per_s", "p50_us", "p99_us", "cpu_us_per_op", "rss_peak_bytes"}
    for name in ("rr-c1-16B-s1", "rr-c64-16B-s1", "tunnel-64KiB"):
        record = records[name]
        assert record["ops_per_s"] > 0, name
        assert record["cpu_us_per_op"] >= 0, name
        assert record["rss_peak_bytes"] > 0, name
    for name in ("rr-c1-16B-s1", "rr-c64-16B-s1"):
        assert 0 < records[name]["p50_us"] <= records[name]["p99_us"]
        assert records[name]["detail"]["errors"] == 0
    for name in ("bcast-m4", "pub-s1", "pub-s10"):
        # The node delivers in bursts, so a tiny window may catch none; the run as a whole must.
        assert records[name]["ops_per_s"] >= 0, name
        assert records[name]["detail"]["delivered_in_run"] > 0, name
        assert records[name]["detail"]["only_expected_frames"], name
    assert records["tcp-64KiB"]["ops_per_s"] > 0

    node = document["node"]
    assert node["mode"] == "started"
    assert len(node["ready_samples_s"]) == 2
    assert 0 < node["ready_s"] < 30
    assert 0 < node["rss_idle_bytes"] <= node["rss_peak_bytes"]

    assert [(c["scenario"], c["metric"]) for c in document["checks"]] == [
        (c.scenario, c.metric) for c in CHECKS
    ]
    for check in document["checks"]:
        fan_out = check["scenario"] in ("bcast-m4", "pub-s1", "pub-s10")
        assert check["measured"] is not None or fan_out, check["label"]
    assert document["machine"]["cpu_count"] >= 1


def test_external_node_by_address_and_pid(tmp_path: Path) -> None:
    node = NodeProcess()
    try:
        host, port = node.address
        table, document = run_bench(
            tmp_path,
            "--relay",
            f"{host}:{port}",
            "--node-pid",
            str(node.pid),
            "--scenarios",
            "rr-c8-16B-s4",
        )
        assert node.alive()
    finally:
        node.stop()

    assert "rr-c8-16B-s4" in table
    assert document["node"]["mode"] == "external"
    assert document["node"]["ready_s"] is None  # only measured when the benchmark starts the node
    [record] = document["scenarios"]
    assert record["ops_per_s"] > 0
    assert record["cpu_us_per_op"] is not None
    assert len(record["detail"]["served_per_service"]) == 4
