"""One irisnode: the broker, its timer, the relay listeners and the overlay, wired together.

This is the owner that connects the pure pieces to a reactor. Everything it needs
from the outside world (the reactor, and through it the clock; randomness and
entropy) is passed in, so tests run whole nodes on any reactor and the CLI is the
only place that touches the global one.

The relay serves applications the moment :meth:`Node.start` returns; the overlay
starts on the next reactor turn and joins in the background.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger

from irisnode import __version__, system
from irisnode.api import is_reserved
from irisnode.broker import Broker
from irisnode.limits import MessagingLimits
from irisnode.messaging.core import GaveUp, MessagingCore
from irisnode.messaging.service import MessagingService
from overlay.timer import DeadlineTimer
from relay.server import RelayFactory, RelayLimits, listen_loopback

log = Logger(namespace="irisnode.node")

DEFAULT_RELAY_PORT = 55555


DEFAULT_LINK_PORT = 55556


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """How the node joins a network of nodes (``--net`` and friends)."""

    name: str
    key_file: str
    link_port: int = DEFAULT_LINK_PORT
    link_interface: str = "::"
    interfaces: tuple[str, ...] = ()
    """Interfaces for discovery; empty: every up, multicast-capable, non-loopback one."""
    discovery: bool = True
    discovery_port: int = 0
    """0: the standard discovery port."""
    seeds: tuple[str, ...] = ()
    """``HOST:PORT`` of nodes to link to even without multicast."""
    advertise: tuple[str, ...] = ()
    """Addresses other nodes should dial us on; empty: this host's interface addresses."""
    state_dir: str | None = None
    """Where the node keeps its identity; without one it gets a new one every start."""
    handshake_rate: float = 5.0
    """Link handshakes accepted per second from one address (``--handshake-rate``)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    relay_port: int = DEFAULT_RELAY_PORT
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    messaging_limits: MessagingLimits = field(default_factory=MessagingLimits)
    network: NetworkConfig | None = None
    """None: developer mode, one node on its own with no overlay and no traffic off loopback."""
    monitor: tuple[str, int] | None = None
    """``(host, port)`` for /metrics, /status.json and the status page (``--metrics``)."""


class Node:
    """A complete single node: applications attach over the relay and talk to each other."""

    def __init__(
        self,
        reactor: Any,
        config: NodeConfig,
        *,
        rng: random.Random | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.rng = rng if rng is not None else random.Random(entropy(16))
        self.entropy = entropy
        self.overlay: Any = None  # overlay.service.OverlayService, once started
        self.started_at = reactor.seconds()
        self.failed: Exception | None = None
        self.on_failure: Callable[[Exception], None] | None = None
        """Called when the overlay cannot start (the CLI stops the process then)."""
        self.on_ready: Callable[[], None] | None = None
        """Called once everything the node listens on is bound (the overlay's link port
        a reactor turn after :meth:`start`): when the CLI says ``ready``."""
        self._timer = DeadlineTimer(reactor, self._on_timer)
        self.broker = Broker(config.messaging_limits, wake=self._timer.wake)
        self.messaging = MessagingCore(self.broker)
        self.messaging_service = MessagingService(self.messaging, reactor)
        self.relay = RelayFactory(
            self.messaging_service,
            reactor,
            config.relay_limits,
            request_budget=self.broker.request_budget,
            reserved=is_reserved,
        )
        self._services = [
            system.SystemService(self.broker, reactor, self._status_request),
            system.SystemService(self.broker, reactor, self._lookup_request),
        ]
        self._listeners: list[IListeningPort] = []
        self._monitor: IListeningPort | None = None
        self._relay_port = 0
        self.relay_addresses: list[str] = []
        """Where the relay listens, as ``host:port`` (IPv6 in brackets); empty once stopped."""

    def _on_timer(self, now: float) -> float | None:
        self.broker.on_timer(now)
        self.messaging_service.flush()  # an expired offer from another node is answered
        return self.broker.next_deadline()

    def start(self) -> None:
        """Start serving applications; the overlay follows on the next reactor turn.

        Raises if neither 127.0.0.1 nor [::1] can be bound for the relay, or if the
        monitor's port cannot be bound.
        """
        self._listeners = listen_loopback(self.reactor, self.relay, self.config.relay_port)
        if self.config.monitor is not None:
            from irisnode.web import listen_monitor

            try:
                self._monitor = listen_monitor(self.reactor, self, *self.config.monitor)
            except Exception:
                for listener in self._listeners:
                    listener.stopListening()
                self._listeners = []
                raise
        self.relay_addresses = [_format_address(listener) for listener in self._listeners]
        self._relay_port = self._listeners[0].getHost().port  # type: ignore[attr-defined]
        for service, cluster in zip(self._services, (system.STATUS, system.LOOKUP), strict=True):
            self.broker.attach(service, cluster)
        if self.config.network is not None:
            self.reactor.callLater(0, self._start_overlay, self.config.network)
        elif self.on_ready is not None:
            self.on_ready()

    def _start_overlay(self, network: NetworkConfig) -> None:
        from irisnode.network import start_overlay  # heavy imports: after the relay is up

        try:
            self.overlay = start_overlay(
                self.reactor,
                network,
                self.messaging,
                max_message_size=self.config.relay_limits.max_payload,
                upcalls=self._overlay_event,
                rng=self.rng,
                entropy=self.entropy,
            )
        except Exception as error:
            self.failed = error
            if self.on_failure is not None:
                self.on_failure(error)
            else:
                log.error("cannot start the overlay: {error}", error=str(error))
            return
        overlay = self.overlay
        self.messaging_service.carry_out = overlay.run
        log.info(
            "overlay started: node {node_id} in network {network}, links on port {link_port}",
            node_id=f"{overlay.node_id:032x}",
            network=overlay.network.name,
            link_port=overlay.link_port,
        )
        if self.on_ready is not None:
            self.on_ready()

    def _overlay_event(self, effect: object) -> None:
        """What the overlay stack hands up that nothing below took: for the log."""
        if isinstance(effect, GaveUp):
            log.debug(
                "{kind} to {cluster} given up: {reason}",
                kind=effect.kind,
                cluster=effect.cluster,
                reason=effect.reason,
            )

    async def _status_request(self, request: bytes) -> bytes:
        return json.dumps(self.status()).encode()

    async def _lookup_request(self, request: bytes) -> bytes:
        from overlay.ids import format_id, parse_id

        if self.overlay is None:
            raise RuntimeError("no overlay: this node runs in developer mode (see --net, --key)")
        key = request.strip()
        if len(key) != 32 or key.strip(b"0123456789abcdefABCDEF"):
            raise ValueError("a key is 32 hex digits")
        owner = await self.overlay.lookup(parse_id(key.decode("ascii")))
        return format_id(owner).encode()

    def status(self) -> dict[str, Any]:
        """This node as ``irisnode status`` shows it."""
        counters = self.relay.counters
        return {
            "version": __version__,
            "uptime": round(self.reactor.seconds() - self.started_at, 3),
            "relay": {
                "addresses": self.relay_addresses,
                "connections": len(self.relay.connections),
                "handshakes": counters.handshakes,
                "bytes_in": counters.bytes_in,
                "bytes_out": counters.bytes_out,
                "backlog_bytes": sum(c.backlog for c in self.relay.connections),
                "dropped_connections": counters.drops,
                "dropped_deliveries": counters.dropped_deliveries,
                "paused_reads": counters.paused_reads,
                "refused_connections": counters.refused_connections,
                "partial_bytes": self.relay.partial_budget.used,
            },
            "messaging": {
                **self.broker.counters,
                "request_bytes": self.broker.request_budget.used,
                **self.messaging.status(),
            },
            "groups": self.messaging.groups(),
            "overlay": self.overlay.status() if self.overlay is not None else None,
        }

    @property
    def relay_port(self) -> int:
        return self._relay_port

    @property
    def monitor_url(self) -> str | None:
        """``http://HOST:PORT/`` of the status page, if ``--metrics`` asked for one."""
        if self._monitor is None:
            return None
        bound: Any = self._monitor.getHost()
        host = f"[{bound.host}]" if ":" in bound.host else bound.host
        return f"http://{host}:{bound.port}/"

    async def stop(self, reason: str = "node shutting down", grace: float = 0.5) -> None:
        """Answer everything pending, say goodbye to every client, stop listening.

        Everything pending gets its outcome at once, before anything else can run
        (so a request still queued for a node service times out rather than being
        answered by a node half gone). Clients get ``grace`` seconds to take their
        last bytes; then their connections are cut, so stopping always finishes
        promptly.
        """
        for service in self._services:
            service.stop()
        self.messaging.shut_down()
        self.broker.shut_down()
        self.relay.shut_down(reason)
        self._timer.stop()
        monitor, self._monitor = self._monitor, None
        listeners, self._listeners = self._listeners, []
        self.relay_addresses = []
        for listener in [*listeners, *([monitor] if monitor is not None else [])]:
            stopped = listener.stopListening()
            if stopped is not None:
                await stopped
        if self.overlay is not None:
            await self.overlay.stop()
        deadline = self.reactor.seconds() + grace
        while self.relay.connections and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.01)
        for connection in list(self.relay.connections):
            if connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]


def _format_address(listener: IListeningPort) -> str:
    host = listener.getHost()
    address = f"[{host.host}]" if ":" in host.host else host.host  # type: ignore[attr-defined]
    return f"{address}:{host.port}"  # type: ignore[attr-defined]
