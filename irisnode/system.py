"""Services the node itself offers to local applications, under reserved cluster names.

``$node.status`` answers with this node's state as JSON (``docs/relay.md`` says what
it tells); ``$node.lookup`` takes a 32-hex-digit key and answers with the id of the
node responsible for it, found by routing through the overlay. Any relay client can
ask (``irisnode status`` and ``irisnode lookup`` do); the answers describe *this*
node, so these clusters are never offered to other nodes. Every name starting with
``$`` is the node's (:func:`irisnode.api.is_reserved`): applications cannot register
one, and a request to one no service here answers fails at once.

Each service is an ordinary member of its cluster, attached to the broker like a
relay connection, so requests to it get the broker's usual guarantees (one
outcome, timeouts, the request budget) with no special case in the broker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from irisnode.api import RESERVED_PREFIX

if TYPE_CHECKING:
    from irisnode.broker import Broker

STATUS = "$node.status"
LOOKUP = "$node.lookup"
MAX_FAULT = 256
"""Longest fault text a node service sends: never an echo of unbounded input."""

__all__ = ["LOOKUP", "MAX_FAULT", "RESERVED_PREFIX", "STATUS", "SystemService"]

Handler = Callable[[bytes], Awaitable[bytes]]


def fault_text(error: BaseException) -> str:
    """What a requester is told when a node service fails: the error's text, bounded."""
    text = str(error) or type(error).__name__
    return text if len(text) <= MAX_FAULT else text[: MAX_FAULT - 3] + "..."


class SystemService:
    """One reserved cluster served inside the node by an async ``handler``.

    A member of its cluster and nothing else (:class:`relay.ports.Member`): it is
    only ever asked requests. A broadcast to it is ignored, and a tunnel offer is
    never accepted (the opener's tunnel times out, as for any silent member).
    """

    congested = False

    def __init__(self, broker: Broker, reactor: Any, handler: Handler) -> None:
        self._broker = broker
        self._reactor = reactor
        self._handler = handler
        self._queue: deque[tuple[int, bytes]] = deque()
        self._call: IDelayedCall | None = None

    def deliver_request(self, handle: int, request: bytes, timeout_ms: int) -> None:
        # Answer on a later turn: the broker is still in the middle of dispatching.
        self._queue.append((handle, request))
        if self._call is None:
            self._call = self._reactor.callLater(0, self._answer_queued)

    def stop(self) -> None:
        """Answer nothing more: the node is stopping (the broker gives every request its end)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._queue.clear()

    def _answer_queued(self) -> None:
        self._call = None
        queue, self._queue = self._queue, deque()
        for handle, request in queue:
            self._answer(handle, request)

    def _answer(self, handle: int, request: bytes) -> None:
        def replied(reply: bytes) -> None:
            self._broker.reply(self, handle, reply)

        def failed(failure: Any) -> None:
            self._broker.fault(self, handle, fault_text(failure.value))

        Deferred.fromCoroutine(self._run(request)).addCallbacks(replied, failed)

    async def _run(self, request: bytes) -> bytes:
        return await self._handler(request)

    def deliver_broadcast(self, message: bytes) -> None:
        pass  # nobody broadcasts to the node's own services

    def offer_tunnel(self, offer: int, chunk_limit: int) -> None:
        pass  # never accepted: the opener's tunnel times out
