"""One irisnode: the broker, its timer and the relay listeners, wired together.

This is the owner that connects the pure pieces to a reactor. Everything it needs
from the outside world (the reactor, and through it the clock) is passed in, so
tests run whole nodes on any reactor and the CLI is the only place that touches
the global one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger

from irisnode.broker import Broker
from overlay.timer import DeadlineTimer
from relay.server import RelayFactory, RelayLimits, listen_loopback

log = Logger(namespace="irisnode.node")

DEFAULT_RELAY_PORT = 55555


@dataclass(frozen=True, slots=True)
class NodeConfig:
    relay_port: int = DEFAULT_RELAY_PORT
    relay_limits: RelayLimits = field(default_factory=RelayLimits)


class Node:
    """A complete single node: applications attach over the relay and talk to each other."""

    def __init__(self, reactor: Any, config: NodeConfig) -> None:
        self.reactor = reactor
        self.config = config
        self._timer = DeadlineTimer(reactor, self._on_timer)
        self.broker = Broker(wake=self._timer.wake)
        self.relay = RelayFactory(self.broker, reactor, config.relay_limits)
        self._listeners: list[IListeningPort] = []

    def _on_timer(self, now: float) -> float | None:
        self.broker.on_timer(now)
        return self.broker.next_deadline()

    def start(self) -> None:
        """Start listening; raises if neither 127.0.0.1 nor [::1] can be bound."""
        self._listeners = listen_loopback(self.reactor, self.relay, self.config.relay_port)

    @property
    def relay_port(self) -> int:
        port: int = self._listeners[0].getHost().port  # type: ignore[attr-defined]
        return port

    @property
    def relay_addresses(self) -> list[str]:
        result = []
        for listener in self._listeners:
            host = listener.getHost()
            address = f"[{host.host}]" if ":" in host.host else host.host  # type: ignore[attr-defined]
            result.append(f"{address}:{host.port}")  # type: ignore[attr-defined]
        return result

    async def stop(self, reason: str = "node shutting down", grace: float = 0.5) -> None:
        """Answer everything pending, say goodbye to every client, stop listening.

        Clients get ``grace`` seconds to take their last bytes; then their connections
        are cut, so stopping always finishes promptly.
        """
        for listener in self._listeners:
            stopped = listener.stopListening()
            if stopped is not None:
                await stopped
        self._listeners = []
        self.broker.shut_down()
        self.relay.shut_down(reason)
        self._timer.stop()
        deadline = self.reactor.seconds() + grace
        while self.relay.connections and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.01)
        for connection in list(self.relay.connections):
            if connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
