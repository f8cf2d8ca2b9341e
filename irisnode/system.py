"""Services the node itself offers to local applications, under reserved cluster names.

``$node.status`` answers with this node's state as JSON; ``$node.lookup`` takes a
32-hex-digit key and answers with the id of the node responsible for it, found by
routing through the overlay. Any relay client can ask (``irisnode status`` and
``irisnode lookup`` do); the answers describe *this* node, so these clusters are
never offered to other nodes, and applications cannot register them.

Each service is an ordinary member of its cluster, attached to the broker like a
relay connection, so requests to it get the broker's usual guarantees (one
outcome, timeouts) with no special case in the broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred

from irisnode.api import RESERVED_PREFIX, Messaging, TunnelEnd

STATUS = "$node.status"
LOOKUP = "$node.lookup"

__all__ = ["LOOKUP", "RESERVED_PREFIX", "STATUS", "SystemService"]

Handler = Callable[[bytes], Awaitable[bytes]]


class SystemService:
    """One reserved cluster served inside the node by an async ``handler``."""

    congested = False

    def __init__(self, messaging: Messaging, reactor: Any, handler: Handler) -> None:
        self._messaging = messaging
        self._reactor = reactor
        self._handler = handler

    def deliver_request(self, handle: int, request: bytes, timeout_ms: int) -> None:
        # Answer on a later turn: the broker is still in the middle of dispatching.
        self._reactor.callLater(0, self._answer, handle, request)

    def _answer(self, handle: int, request: bytes) -> None:
        def replied(reply: bytes) -> None:
            self._messaging.reply(self, handle, reply)

        def failed(failure: Any) -> None:
            self._messaging.fault(self, handle, failure.getErrorMessage() or "failed")

        Deferred.fromCoroutine(self._run(request)).addCallbacks(replied, failed)

    async def _run(self, request: bytes) -> bytes:
        return await self._handler(request)

    # A service is only ever asked requests; everything else has nothing to do.

    def request_replied(self, request_id: int, reply: bytes) -> None:
        pass

    def request_faulted(self, request_id: int, fault: str) -> None:
        pass

    def request_timed_out(self, request_id: int) -> None:
        pass

    def deliver_broadcast(self, message: bytes) -> None:
        pass

    def deliver_event(self, topic: str, event: bytes) -> None:
        pass

    def offer_tunnel(self, offer: int, chunk_limit: int) -> None:
        pass  # never confirmed: the opener's TUN_CONFIRM times out, as for any silent member

    def tunnel_opened(self, tunnel_id: int, tunnel: TunnelEnd, chunk_limit: int) -> None:
        tunnel.close("not a tunnel endpoint")

    def tunnel_failed(self, tunnel_id: int) -> None:
        pass

    def tunnel_transfer(self, tunnel_id: int, size_or_cont: int, chunk: bytes) -> None:
        pass

    def tunnel_allow(self, tunnel_id: int, size: int) -> None:
        pass

    def tunnel_closed(self, tunnel_id: int, reason: str) -> None:
        pass
