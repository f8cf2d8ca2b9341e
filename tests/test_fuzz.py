"""A short run of the fuzzer (``python -m bench.fuzz``) against a node: no crash, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_fuzz_run_finds_the_node_standing(tmp_path: Path) -> None:
    report_path = tmp_path / "fuzz.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.fuzz", "--relay-inputs", "1500", "--link-inputs", "200",
         "--seed", "7", "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["node_crashes"] == 0 and report["tracebacks"] == 0
    assert report["health_failures"] == 0 and report["health_checks"] >= 1
    relay = report["relay"]
    assert relay["inputs"] == 1500 and relay["hung"] == 0
    assert len(relay["kinds"]) >= 10  # every kind of malformation was tried
    drops = report["relay_drops_logged"]
    assert drops.get("unknown opcode N", 0) > 0 and drops.get("invalid bool byte N", 0) > 0
    if os.geteuid() == 0:  # link fuzzing needs a private network namespace
        assert report["link"]["inputs"] == 200
        assert report["link"]["outcome"].get("dropped", 0) > 0
        assert sum(report["link_drops_logged"].values()) > 0
    else:
        assert report["link"] == {"skipped": "not root"}
