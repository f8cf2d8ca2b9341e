"""The relay's view of messaging: :class:`MessagingService`, on the pure messaging core.

It implements :class:`relay.ports.Messaging` for the relay: it reads the clock
for each call, hands the call to :class:`~irisnode.messaging.core.MessagingCore`,
and carries out what the core leaves in its outbox through the overlay (once
there is one; a node without an overlay never produces any).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IReactorTime

from irisnode.messaging.core import MessagingCore
from relay.ports import Endpoint, TunnelEnd


class MessagingService:
    """:class:`relay.ports.Messaging` for the relay, backed by a messaging core."""

    def __init__(self, core: MessagingCore, clock: IReactorTime) -> None:
        self.core = core
        self._clock = clock
        self.carry_out: Callable[[Sequence[object]], None] | None = None
        """Runs effects through the overlay; set once the overlay is up."""
        core.on_output = self.flush

    def flush(self) -> None:
        """Carry out whatever the core has left in its outbox."""
        outbox = self.core.outbox
        if outbox:
            effects = list(outbox)
            outbox.clear()
            if self.carry_out is not None:
                self.carry_out(effects)

    def attach(self, endpoint: Endpoint, cluster: str) -> None:
        self.core.attach(endpoint, cluster, self._clock.seconds())
        self.flush()

    def detach(self, endpoint: Endpoint, reason: str) -> None:
        self.core.detach(endpoint, reason, self._clock.seconds())
        self.flush()

    def request(
        self,
        origin: Endpoint,
        request_id: int,
        cluster: str,
        request: bytes,
        timeout_ms: int,
        now: float,
    ) -> None:
        self.core.request(origin, request_id, cluster, request, timeout_ms, now)
        self.flush()

    def reply(self, member: Endpoint, handle: int, reply: bytes) -> None:
        self.core.reply(member, handle, reply, self._clock.seconds())
        self.flush()

    def fault(self, member: Endpoint, handle: int, fault: str) -> None:
        self.core.fault(member, handle, fault, self._clock.seconds())
        self.flush()

    def broadcast(self, cluster: str, message: bytes) -> None:
        self.core.broadcast(cluster, message, self._clock.seconds())
        self.flush()

    def subscribe(self, endpoint: Endpoint, topic: str) -> None:
        self.core.subscribe(endpoint, topic, self._clock.seconds())
        self.flush()

    def unsubscribe(self, endpoint: Endpoint, topic: str) -> bool:
        was = self.core.unsubscribe(endpoint, topic, self._clock.seconds())
        self.flush()
        return was

    def publish(self, topic: str, event: bytes) -> None:
        self.core.publish(topic, event, self._clock.seconds())
        self.flush()

    def open_tunnel(
        self, origin: Endpoint, tunnel_id: int, cluster: str, timeout_ms: int, now: float
    ) -> None:
        self.core.open_tunnel(origin, tunnel_id, cluster, timeout_ms, now)
        self.flush()

    def cancel_tunnel(self, origin: Endpoint, tunnel_id: int) -> None:
        self.core.cancel_tunnel(origin, tunnel_id, self._clock.seconds())
        self.flush()

    def caught_up(self, endpoint: Endpoint) -> None:
        self.core.caught_up(endpoint, self._clock.seconds())
        self.flush()

    def confirm_tunnel(self, member: Endpoint, offer: int, tunnel_id: int) -> TunnelEnd | None:
        end = self.core.confirm_tunnel(member, offer, tunnel_id, self._clock.seconds())
        self.flush()
        return end
