"""Prometheus metrics of a node, read from its status at scrape time.

Nothing on the node's hot paths is instrumented for this: the node already keeps
counters (relay, broker, discovery) and state (links, leaf set, routing table),
and :meth:`irisnode.node.Node.status` reads them all in one place. A scrape turns
that one dictionary into metric families (:func:`families`, pure), so
``/metrics``, ``/status.json`` and ``irisnode status`` never disagree. A counter
that another part of the node adds to its status shows up here by adding one
line to :func:`families`.

Names follow Prometheus conventions: ``irisnode_`` prefix, ``_total`` for
counters, base units (``_bytes``, ``_seconds``). Process CPU and memory come from
prometheus_client's own process collector (``process_cpu_seconds_total``,
``process_resident_memory_bytes``...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

Status = Mapping[str, Any]

WAITING_FOR_COUNTERS = ("irisnode_tunnel_bytes_total",)
"""Metrics the issue asks for whose counters the node does not keep yet (docs/metrics.md)."""

BROKER_COUNTERS = (
    ("requests", "irisnode_requests_total", "Requests received from applications."),
    ("replies", "irisnode_replies_total", "Requests answered with a reply."),
    ("faults", "irisnode_faults_total", "Requests answered with a fault."),
    ("timeouts", "irisnode_request_timeouts_total", "Requests that got no answer in time."),
    ("late", "irisnode_late_answers_total", "Answers that came after their request ended."),
    ("broadcasts", "irisnode_broadcasts_total", "Broadcasts sent by applications on this node."),
    ("events", "irisnode_events_total", "Events published by applications on this node."),
    (
        "broadcasts_from_other_nodes",
        "irisnode_broadcasts_received_total",
        "Broadcasts from other nodes delivered to members here.",
    ),
    (
        "events_from_other_nodes",
        "irisnode_events_received_total",
        "Events from other nodes delivered to subscribers here.",
    ),
)
"""``status["messaging"]`` key, metric name, help: one row per broker counter."""


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def families(status: Status) -> list[Metric]:
    """Every metric family of one node status (the dictionary ``irisnode status --json`` shows)."""
    info = GaugeMetricFamily(
        "irisnode_info",
        "This node's version, network and node id.",
        labels=["version", "network", "node_id"],
    )
    overlay = status.get("overlay")
    info.add_metric(
        [
            status["version"],
            overlay["network"] if overlay else "",
            overlay["node_id"] if overlay else "",
        ],
        1,
    )
    result: list[Metric] = [
        info,
        _gauge("irisnode_uptime_seconds", "Seconds since the node started.", status["uptime"]),
    ]
    result += _relay(status["relay"], status)
    messaging = status.get("messaging", {})
    result += [
        _counter(name, documentation, messaging[key])
        for key, name, documentation in BROKER_COUNTERS
        if key in messaging
    ]
    trees = messaging.get("trees")
    if trees is not None:
        yield_trees = _gauge(
            "irisnode_overlay_groups",
            "Scribe trees (clusters and topics) this node is in.",
            len(trees),
        )
        result.append(yield_trees)
    groups = status.get("groups")
    if groups is not None:
        result.append(
            _gauge(
                "irisnode_clusters", "Clusters with members on this node.", len(groups["clusters"])
            )
        )
        result.append(
            _gauge(
                "irisnode_topics", "Topics with subscribers on this node.", len(groups["topics"])
            )
        )
    if overlay:
        result += _overlay(overlay)
    return result


def _relay(relay: Status, status: Status) -> Iterator[Metric]:
    yield _gauge(
        "irisnode_relay_connections", "Open relay connections (applications).", relay["connections"]
    )
    yield _counter(
        "irisnode_relay_handshakes_total",
        "Relay connections that completed the handshake.",
        relay["handshakes"],
    )
    yield _counter(
        "irisnode_relay_dropped_connections_total",
        "Relay connections dropped for breaking the protocol or a limit.",
        relay["dropped_connections"],
    )
    yield _counter(
        "irisnode_relay_received_bytes_total",
        "Bytes received from applications.",
        relay["bytes_in"],
    )
    if "bytes_out" in relay:
        yield _counter(
            "irisnode_relay_sent_bytes_total", "Bytes sent to applications.", relay["bytes_out"]
        )
    if "backlog_bytes" in relay:
        yield _gauge(
            "irisnode_relay_backlog_bytes",
            "Bytes written to applications that are not keeping up, not yet sent.",
            relay["backlog_bytes"],
        )
    yield _counter(
        "irisnode_relay_paused_reads_total",
        "Times a connection stopped being read because a reader it feeds lagged.",
        relay["paused_reads"],
    )
    given_up = CounterMetricFamily(
        "irisnode_messages_given_up_total",
        "Messages the node gave up delivering, by reason.",
        labels=["reason"],
    )
    given_up.add_metric(["backlog"], relay["dropped_deliveries"])
    messaging = status.get("messaging") or {}
    for reason, count in (messaging.get("given_up") or {}).items():
        given_up.add_metric([f"request: {reason}"], count)
    for reason, count in (messaging.get("scribe") or {}).items():
        if reason != "redirects":
            given_up.add_metric([f"tree: {reason}"], count)
    links = (status.get("overlay") or {}).get("links") or {}
    for reason, count in (links.get("given_up") or {}).items():
        given_up.add_metric([f"link: {reason}"], count)
    yield given_up


def _overlay(overlay: Status) -> Iterator[Metric]:
    peers = overlay["peers"]
    yield _gauge("irisnode_overlay_ready", "1 once the overlay has joined.", int(overlay["ready"]))
    yield _gauge("irisnode_overlay_peers", "Peers in the leaf set or routing table.", len(peers))
    yield _gauge(
        "irisnode_overlay_links",
        "Authenticated links to other nodes that are up.",
        sum(1 for peer in peers if peer["link"] == "up"),
    )
    leaf = GaugeMetricFamily(
        "irisnode_overlay_leaf_set_nodes", "Nodes in the leaf set, by side.", labels=["side"]
    )
    leaf.add_metric(["left"], len(overlay["leaf_set"]["left"]))
    leaf.add_metric(["right"], len(overlay["leaf_set"]["right"]))
    yield leaf
    yield _gauge(
        "irisnode_overlay_routing_table_entries",
        "Entries in the Pastry routing table.",
        overlay["routing_table"]["entries"],
    )
    links = overlay.get("links")
    if links is not None:
        sent = CounterMetricFamily(
            "irisnode_link_bytes_total", "Bytes on links to other nodes.", labels=["direction"]
        )
        sent.add_metric(["sent"], links["bytes_sent"])
        sent.add_metric(["received"], links["bytes_received"])
        yield sent
        yield _counter(
            "irisnode_link_handshakes_refused_total",
            "Inbound link handshakes refused by the per-address rate limit.",
            links["handshakes_refused"],
        )
    discovery = overlay.get("discovery")
    if discovery is not None:
        yield from _discovery(discovery)


def _discovery(discovery: Status) -> Iterator[Metric]:
    yield _gauge(
        "irisnode_discovery_peers_heard",
        "Nodes of this network heard by multicast.",
        discovery["peers_heard"],
    )
    yield _counter("irisnode_discovery_beacons_sent_total", "Beacons sent.", discovery["sent"])
    yield _counter(
        "irisnode_discovery_beacons_accepted_total",
        "Beacons of this network accepted.",
        discovery["accepted"],
    )
    ignored = CounterMetricFamily(
        "irisnode_discovery_beacons_ignored_total",
        "Beacons ignored, by reason (another network and forgeries are both unauthenticated).",
        labels=["reason"],
    )
    for key, value in discovery.items():
        if key.startswith("ignored_"):
            ignored.add_metric([key.removeprefix("ignored_")], value)
    yield ignored


class StatusCollector(Collector):
    """Reads the node's status when scraped and turns it into metric families."""

    def __init__(self, read_status: Callable[[], Status]) -> None:
        self._read_status = read_status

    def collect(self) -> Iterable[Metric]:
        return families(self._read_status())


def registry(read_status: Callable[[], Status]) -> CollectorRegistry:
    """A registry of one node: its status, and this process's CPU and memory."""
    result = CollectorRegistry(auto_describe=False)
    result.register(StatusCollector(read_status))
    ProcessCollector(registry=result)
    return result
