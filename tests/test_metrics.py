"""``--metrics``: Prometheus text at /metrics, /status.json, the status page's files."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from irisnode.metrics import families
from relay.client import blocking
from tests.lan import wait_until
from tests.processes import NodeProcess, network_key, network_node, run

FETCHED_FROM_ELSEWHERE = re.compile(rb"""(src=|href=|url\(|fetch\(|import )["']?(https?:)?//""")
"""A reference the browser would load from another host."""


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers["content-type"], response.read()


def scrape(url: str) -> dict[str, tuple[str, list[Sample]]]:
    """Every family of a scrape, parsed by Prometheus's own parser: name -> (type, samples)."""
    content_type, body = get(url + "metrics")
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(body.decode())}


def value(parsed: dict[str, tuple[str, list[Sample]]], name: str, **labels: str) -> float:
    _, samples = parsed[name.removesuffix("_total")]
    (match,) = [s for s in samples if s.name == name and s.labels == labels]
    return match.value


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    running = NodeProcess("--metrics", "0")
    yield running
    running.kill()


def test_metrics_follow_the_node(node: NodeProcess) -> None:
    assert node.status_page is not None and node.status_page.startswith("http://127.0.0.1:")
    before = scrape(node.status_page)
    with blocking.connect(node.port) as conn:
        for _ in range(3):
            conn.request("$node.status", b"status", timeout=2.0)
        conn.publish("news", b"x")
    after = scrape(node.status_page)
    assert value(after, "irisnode_requests_total") == value(before, "irisnode_requests_total") + 3
    assert value(after, "irisnode_replies_total") >= 3
    assert value(after, "irisnode_relay_received_bytes_total") > value(
        before, "irisnode_relay_received_bytes_total"
    )
    assert value(after, "irisnode_relay_sent_bytes_total") > 0
    assert value(after, "irisnode_relay_connections") == 0  # scraping needs no relay connection
    assert value(after, "irisnode_messages_given_up_total", reason="backlog") == 0
    assert value(after, "process_resident_memory_bytes") > 1_000_000
    assert value(after, "process_cpu_seconds_total") > 0
    (info,) = after["irisnode_info"][1]
    assert info.labels == {"version": "0.1.0", "network": "", "node_id": ""}


def test_metric_names_follow_prometheus_conventions(node: NodeProcess) -> None:
    assert node.status_page is not None
    parsed = scrape(node.status_page)
    assert len(parsed) > 20
    for name, (kind, samples) in parsed.items():
        assert name.startswith(("irisnode_", "process_")), name
        if kind == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in samples), name
        assert not name.endswith(("_ms", "_kb", "_mb", "_percent")), name  # base units


def test_status_json_is_what_status_json_prints(node: NodeProcess) -> None:
    assert node.status_page is not None
    content_type, body = get(node.status_page + "status.json")
    assert content_type == "application/json"
    served = json.loads(body)
    printed = node.status_json()
    assert served.keys() == printed.keys()
    assert served["relay"]["addresses"] == printed["relay"]["addresses"]
    assert served["groups"] == {"scope": "node", "clusters": {}, "topics": {}}


def test_the_status_page_is_served_as_plain_files(node: NodeProcess) -> None:
    assert node.status_page is not None
    content_type, page = get(node.status_page)
    assert content_type.startswith("text/html")
    assert b'<script src="app.js">' in page
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        content_type, body = get(node.status_page + name)
        assert kind in content_type and body, name
    for text in (page, get(node.status_page + "app.js")[1], get(node.status_page + "style.css")[1]):
        assert not FETCHED_FROM_ELSEWHERE.search(text), FETCHED_FROM_ELSEWHERE.search(text)


def test_overlay_metrics_of_a_network_node(tmp_path: Path) -> None:
    key = network_key(tmp_path, "metered")
    first = network_node(key, "metered", "--metrics", "0")
    second = network_node(key, "metered", seeds=[first.link_port or 0])
    try:
        assert first.status_page is not None

        def joined() -> dict[str, tuple[str, list[Sample]]]:
            parsed = scrape(first.status_page or "")
            links = value(parsed, "irisnode_overlay_links")
            leaf = value(parsed, "irisnode_overlay_leaf_set_nodes", side="left")
            return parsed if links and leaf else {}

        parsed = wait_until(joined, 15, "the two nodes in each other's leaf set")
        assert value(parsed, "irisnode_overlay_links") == 1
        assert value(parsed, "irisnode_overlay_peers") == 1
        assert value(parsed, "irisnode_overlay_leaf_set_nodes", side="right") == 1
        assert value(parsed, "irisnode_overlay_routing_table_entries") >= 0
        (info,) = parsed["irisnode_info"][1]
        assert info.labels["network"] == "metered" and len(info.labels["node_id"]) == 32
    finally:
        second.stop()
        first.stop()


@pytest.mark.parametrize(
    ("argument", "message"),
    [("::1:9090", "write an IPv6 address as [ADDRESS]:PORT"), (":9090", "not HOST:PORT or PORT")],
)
def test_bad_metrics_addresses(argument: str, message: str) -> None:
    result = run("--metrics", argument)
    assert result.returncode == 2 and message in result.stderr


def status(**overlay: Any) -> dict[str, Any]:
    """A node status as :meth:`irisnode.node.Node.status` makes it."""
    return {
        "version": "0.1.0",
        "uptime": 5.0,
        "relay": {
            "addresses": ["127.0.0.1:1"],
            "connections": 2,
            "handshakes": 4,
            "bytes_in": 10,
            "bytes_out": 20,
            "backlog_bytes": 0,
            "dropped_connections": 1,
            "dropped_deliveries": 3,
            "paused_reads": 0,
        },
        "messaging": {"requests": 7, "replies": 5, "faults": 1, "timeouts": 1, "late": 0},
        "groups": {
            "scope": "node",
            "clusters": {"a": {"here": 1, "other_nodes": None}},
            "topics": {
                "t": {"here": 2, "other_nodes": None},
                "u": {"here": 1, "other_nodes": None},
            },
        },
        "overlay": overlay or None,
    }


def test_families_of_a_status_with_discovery() -> None:
    overlay = {
        "node_id": "ab" * 16,
        "network": "n",
        "ready": True,
        "peers": [{"node_id": "cd" * 16, "link": "up"}, {"node_id": "ef" * 16, "link": "down"}],
        "leaf_set": {"left": ["cd" * 16], "right": []},
        "routing_table": {"entries": 2, "rows": {}},
        "discovery": {
            "peers_heard": 1,
            "sent": 9,
            "accepted": 4,
            "ignored_oversize": 0,
            "ignored_malformed": 1,
            "ignored_unauthenticated": 2,
            "ignored_own": 3,
            "ignored_stale": 0,
            "peers_evicted": 0,
        },
    }
    by_name = {family.name: family for family in families(status(**overlay))}
    assert len(by_name) == len(families(status(**overlay)))  # no name twice
    assert by_name["irisnode_overlay_links"].samples[0].value == 1
    assert by_name["irisnode_overlay_peers"].samples[0].value == 2
    ignored = {
        s.labels["reason"]: s.value for s in by_name["irisnode_discovery_beacons_ignored"].samples
    }
    assert ignored == {"oversize": 0, "malformed": 1, "unauthenticated": 2, "own": 3, "stale": 0}
    assert by_name["irisnode_topics"].samples[0].value == 2
    assert by_name["irisnode_messages_given_up"].samples[0].labels == {"reason": "backlog"}
    developer = {family.name for family in families(status())}
    assert not any(
        name.startswith(("irisnode_overlay", "irisnode_discovery")) for name in developer
    )
