"""The node's HTTP monitor (``--metrics``): /metrics, /status.json and a status page at /.

* ``/metrics`` — Prometheus text (or OpenMetrics if the scraper asks for it),
  built at scrape time from the node's status (:mod:`irisnode.metrics`).
* ``/status.json`` — exactly what ``irisnode status --json`` prints.
* ``/`` — a live status page: plain HTML, CSS and JavaScript from ``static/``,
  served as they are (no build step, nothing fetched from elsewhere), refreshing
  itself from ``/status.json``.

Everything runs in the reactor thread, as the node does, so a scrape reads a
consistent state. Listens on loopback unless told otherwise: the page and the
metrics show the node's peers and groups to anyone who can reach the port.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from irisnode import metrics

STATIC = Path(__file__).resolve().parent / "static"


class MetricsPage(Resource):
    """Prometheus exposition of one registry, rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader("content-type", content_type)
        body: bytes = encoder(self._registry)
        return body


class StatusPage(Resource):
    """The node's status as JSON (what ``irisnode status --json`` prints)."""

    isLeaf = True

    def __init__(self, node: Any) -> None:
        super().__init__()
        self._node = node

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "application/json")
        request.setHeader("cache-control", "no-store")
        return json.dumps(self._node.status()).encode()


def monitor_site(node: Any) -> Site:
    """The whole monitor of ``node`` (an :class:`irisnode.node.Node`) as a Twisted site."""
    root = File(str(STATIC))
    root.putChild(b"metrics", MetricsPage(metrics.registry(node.status)))
    root.putChild(b"status.json", StatusPage(node))
    site = Site(root)
    site.noisy = False
    return site


def listen_monitor(reactor: Any, node: Any, host: str, port: int) -> IListeningPort:
    """Serve the monitor of ``node`` on ``host:port`` (0: a free port); raises if it cannot."""
    listener: IListeningPort = reactor.listenTCP(port, monitor_site(node), interface=host)
    return listener
