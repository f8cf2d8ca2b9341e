"""A node process under each attack of issue 9: its RSS, read from /proc, stays bounded.

Each test runs one attack of ``bench/attack.py`` for a few seconds against a fresh
``irisnode`` process (default limits unless a test says otherwise), while an echo
service and a requester in another process keep using the node; then the node gets
SIGTERM with the attack still connected. Without the limits, each of these attacks
grows the node by hundreds of MiB within the same seconds (``docs/backpressure.md``
has the 30 s figures, before and after). The pure-layer tests of the same limits are
in ``tests/test_limits.py`` and ``tests/test_relay_server.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bench.attack import ATTACKS, run_attack
from overlay.identity import NetworkKey

SECONDS = 3.0


def attack(name: str, *node_args: str, seconds: float = SECONDS) -> dict[str, Any]:
    record = run_attack(ATTACKS[name], seconds, node_args)
    assert record["attack_error"] is None, record
    assert record["node_alive"], record
    assert record["tracebacks"] == 0, record
    probe = record["probe"]
    assert probe.get("errors") == 0 and probe.get("requests", 0) > 0, record  # others served
    assert record["shutdown_s"] is not None and record["shutdown_s"] < 1.5, record
    assert record["exit_code"] == 0, record
    return record


def grew(record: dict[str, Any]) -> float:
    """MiB the node's RSS rose above its idle size at the worst moment."""
    return float(record["rss_peak_mib"] - record["rss_idle_mib"])


def test_a_client_flooding_status_requests_without_reading_is_not_read() -> None:
    record = attack("status-flood")
    assert grew(record) < 24, record
    assert record["status"]["relay"]["paused_reads"] >= 1, record


def test_a_client_flooding_timeouts_without_reading_stays_small() -> None:
    record = attack("timeout-flood")
    assert grew(record) < 24, record


def test_requests_that_never_time_out_do_not_pile_up() -> None:
    record = attack("orphans")
    # Each round sends 200 MiB of requests: the node takes its request budget (and a fair
    # share more) and does not read the rest; what it took ends with the client, or at the
    # node's longest timeout if the client left while the node was not reading it.
    assert grew(record) < 160, record
    assert record["notes"]["rounds"] >= 2, record


def test_requests_end_with_the_client_that_sent_them() -> None:
    record = attack("orphans", "--max-request-bytes", "400M")  # room for a whole round
    assert record["notes"]["rounds"] >= 2, record
    messaging = record["status"]["messaging"]
    # Every round's requests, but for the round still under way (at most 200), ended with it.
    assert messaging["withdrawn"] >= max(1, record["notes"]["requests"] - 200), record
    assert messaging["request_bytes"] <= 201 << 20, record  # at most the round under way
    assert grew(record) < 300, record  # one round's worth, reused, not a round's more each


def test_one_connection_cannot_subscribe_without_limit() -> None:
    record = attack("subscriptions")
    assert grew(record) < 48, record
    assert "more than 1000 subscriptions on one connection" in record["notes"]["close_reasons"]


def test_partial_packets_are_bounded_node_wide_and_time_out() -> None:
    record = attack("partial-packets", "--packet-timeout", "1")
    assert grew(record) < 160, record  # 20 x 16 MiB held would be 320
    assert record["notes"]["dropped"] >= 1, record
    assert "a packet took more than 1 s to arrive" in record["notes"]["close_reasons"], record


def test_a_stuck_member_does_not_multiply_memory_per_requester() -> None:
    record = attack("stuck-member")
    assert grew(record) < 192, record  # 30 requesters of 16 MiB would be about 1 GiB
    assert record["notes"]["requests_sent"] < 30, record  # the rest are not read


def test_a_stuck_member_that_leaves_frees_what_it_held() -> None:
    record = attack("stuck-member-leaves")
    assert grew(record) < 160, record  # its requesters' requests now wait, counted, for a member
    assert record["status"]["messaging"]["request_bytes"] < 130 << 20, record


def test_lookup_faults_do_not_echo_the_request(tmp_path: Path) -> None:
    key = tmp_path / "test.key"
    NetworkKey.generate("memtest", os.urandom).save(key)
    record = attack(
        "lookup-fault",
        *("--net", "memtest", "--key", str(key), "--no-discovery", "--link-port", "0"),
    )
    assert 0 < record["notes"]["longest_fault_bytes"] <= 256, record
    assert record["notes"]["faults"] >= 1, record
    assert grew(record) < 128, record


@pytest.mark.parametrize("cap", [300])
def test_connections_beyond_the_cap_are_refused_and_logged_once_a_second(cap: int) -> None:
    record = attack("fd-hog", "--max-connections", str(cap))
    assert record["notes"]["held"] <= cap, record
    assert record["notes"]["refused"] >= 1, record
    assert record["status"]["relay"]["refused_connections"] >= 1, record
    assert record["log_lines"] <= 3 + SECONDS + 2, record  # start-up lines, then one a second
    assert grew(record) < 48, record
