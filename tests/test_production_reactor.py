"""The relay's end-to-end tests again, on the reactor ``irisnode`` runs on (not asyncio)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_relay_e2e.py", "tests/test_twisted_internals.py"]


def test_relay_end_to_end_tests_pass_on_the_production_reactor() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *TESTS,
            "-p",
            "tests.production_reactor",
            "--reactor=default",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed[1]) >= 10, done.stdout[-2000:]
