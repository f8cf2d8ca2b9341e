"""Twisted shell around the link cores (docs/wire-link.md §6): :class:`LinkService`.

What a node holds: its credentials, a listening factory with a per-source
handshake rate limit, dialling (persistent loops for seeds and one-shot dials
with a deadline for ``send(..., dial_to=)``, see :mod:`overlay.link_dial`), the
duplicate-link rule, and one :class:`LinkHandler`. Each connection is a
:class:`Link` (:mod:`overlay.link_protocol`). Every failure is logged with its
specific ``reason`` and closes that one connection; every message given up is
counted by reason and logged in summary.

This module is the links' public API for the rest of the node: it also exports
:class:`Link`, :class:`LinkHandler`, :class:`GiveUp` and :func:`describe_address`.

The reactor and clock are constructor arguments; nothing here imports the
global reactor.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory

from overlay.identity import Credentials, Entropy
from overlay.link import DEFAULT_HANDSHAKE_TIMEOUT, LinkStateError, Reason, Role
from overlay.link_dial import Dialer
from overlay.link_frames import DEFAULT_LIMITS, LinkLimits
from overlay.link_policy import HandshakeLimiter, keep_new_link
from overlay.link_protocol import (
    GiveUp,
    Link,
    LinkHandler,
    LogSummary,
    describe_address,
    format_node_id,
    source_host,
)

__all__ = ["GiveUp", "Link", "LinkHandler", "LinkService", "describe_address", "format_node_id"]


class _ListeningFactory(ServerFactory):
    noisy = False

    def __init__(self, service: LinkService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> Link | None:
        """A responder link, unless this source used up its handshakes (then Twisted
        closes the connection before a byte is read: no CPU spent on it)."""
        service = self.service
        source = source_host(addr)
        if not service.handshake_limiter.allow(source, service.clock.seconds()):
            service.handshakes_refused += 1
            service.refusals.add("rate-limited", source)
            return None
        return Link(service, Role.RESPONDER)


@dataclass(slots=True)
class _Waiting:
    """Messages for a peer being dialled, flushed in order once its link is up."""

    dialer: Dialer
    deadline: IDelayedCall
    messages: deque[tuple[bytes, bool]] = field(default_factory=deque)
    bytes: int = 0


class LinkService:
    """A node's links: listen, dial, keep one link per peer, send, tell the handler."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        credentials: Credentials,
        handler: LinkHandler,
        *,
        entropy: Entropy,
        rng: random.Random,
        limits: LinkLimits = DEFAULT_LIMITS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        dial_timeout: float = 5.0,
        max_dial_queue: int = 256,
        max_dial_queue_bytes: int = 32 << 20,
        handshake_rate: float = 5.0,
        handshake_burst: float = 20.0,
        log_interval: float = 10.0,
        socket_buffer: int = 256 * 1024,
    ) -> None:
        if max_dial_queue_bytes < limits.max_message_size or max_dial_queue < 1:
            raise ValueError("the dial queue must hold at least one message of the largest size")
        self.reactor = reactor
        self.clock = clock
        self.credentials = credentials
        self.handler = handler
        self.entropy = entropy
        self.rng = rng
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.dial_timeout = dial_timeout
        self.max_dial_queue = max_dial_queue
        self.max_dial_queue_bytes = max_dial_queue_bytes
        self.socket_buffer = socket_buffer
        """SO_SNDBUF and SO_RCVBUF of each link (Linux doubles it; 0: the kernel's autotuning)."""
        self.handshake_limiter = HandshakeLimiter(handshake_rate, handshake_burst)
        self.given_up: Counter[str] = Counter()
        """Messages given up, by :class:`GiveUp` reason."""
        self.handshakes_refused = 0
        """Inbound connections closed unread: their source was over its handshake rate."""
        self.bytes_sent = 0
        self.bytes_received = 0
        """Wire bytes over every link, closed ones included (per link: ``Link.bytes_*``)."""
        self.give_ups = LogSummary(clock, log_interval, "messages given up")
        self.refusals = LogSummary(clock, log_interval, "inbound links refused")
        self._links: dict[int, Link] = {}
        self._all: set[Link] = set()
        self._dialers: dict[tuple[str, int], Dialer] = {}
        self._waiting: dict[int, _Waiting] = {}
        self._ports: list[IListeningPort] = []

    @property
    def node_id(self) -> int:
        return self.credentials.identity.node_id

    @property
    def links(self) -> Mapping[int, Link]:
        """The current link of each peer (at most one per peer)."""
        return self._links

    @property
    def dialers(self) -> list[Dialer]:
        """The addresses this service keeps dialling (seeds, peers being linked)."""
        return list(self._dialers.values())

    def factory(self) -> ServerFactory:
        """A listening factory, for callers that bind the port themselves."""
        return _ListeningFactory(self)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        listening = self.reactor.listenTCP(port, self.factory(), interface=interface)
        self._ports.append(listening)
        return listening

    def send(
        self,
        peer_id: int,
        data: bytes,
        *,
        bulk: bool = False,
        dial_to: tuple[str, int] | None = None,
    ) -> bool:
        """Send one message to a peer, dialling ``dial_to`` first if there is no link.

        Messages for a peer being dialled wait (at most ``max_dial_queue`` of them
        and ``max_dial_queue_bytes``) and go out in order once its link is up; if
        none comes up within ``dial_timeout`` they are given up. False means the
        message was given up at once (counted in ``given_up``).
        """
        link = self._links.get(peer_id)
        if link is not None:
            return link.send(data, bulk=bulk)
        if len(data) > self.limits.max_message_size:
            self._give_up(GiveUp.OVERSIZE, peer_id, 1, f"{len(data)} bytes")
            raise LinkStateError(
                f"message of {len(data)} bytes exceeds {self.limits.max_message_size}"
            )
        waiting = self._waiting.get(peer_id)
        if waiting is None:
            if dial_to is None:
                self._give_up(GiveUp.NO_LINK, peer_id, 1, "no address to dial")
                return False
            waiting = self._dial(peer_id, *dial_to)
        if (
            len(waiting.messages) >= self.max_dial_queue
            or waiting.bytes + len(data) > self.max_dial_queue_bytes
        ):
            self._give_up(GiveUp.DIAL_QUEUE_FULL, peer_id, 1, f"{len(waiting.messages)} waiting")
            return False
        waiting.messages.append((data, bulk))
        waiting.bytes += len(data)
        return True

    def connect(self, host: str, port: int, *, expected_peer: int | None = None) -> Dialer:
        """Keep a link to ``host:port`` (idempotent per address): a seed."""
        key = (host, port)
        dialer = self._dialers.get(key)
        if dialer is None or dialer.stopped:
            dialer = Dialer(self, host, port, expected_peer)
            self._dialers[key] = dialer
            dialer.start()
        return dialer

    def disconnect(self, host: str, port: int) -> None:
        """Stop the dial loop for that address and close its link."""
        dialer = self._dialers.pop((host, port), None)
        if dialer is not None:
            dialer.stop()
            if dialer.link is not None:
                dialer.link.close()

    def close_peer(self, peer_id: int) -> None:
        """Forget a peer: stop dialling it, give up what waits for it, close its link."""
        waiting = self._waiting.pop(peer_id, None)
        if waiting is not None:
            self._abandon(peer_id, waiting, GiveUp.CLOSED, "the peer was dropped")
        link = self._links.get(peer_id)
        if link is not None:
            link.close()

    def stop(self) -> Deferred[None]:
        """Stop dialing and listening, close every link."""
        for dialer in list(self._dialers.values()):
            dialer.stop()
        self._dialers.clear()
        for peer_id, waiting in list(self._waiting.items()):
            self._abandon(peer_id, waiting, GiveUp.CLOSED, "the node is stopping")
        self._waiting.clear()
        for link in list(self._all):
            link.close()
        self.give_ups.flush()
        self.refusals.flush()
        stopping = [Deferred.fromCoroutine(_stop_listening(port)) for port in self._ports]
        self._ports.clear()
        return gatherResults(stopping).addCallback(lambda _: None)

    # -- dialling for send()

    def _dial(self, peer_id: int, host: str, port: int) -> _Waiting:
        dialer = Dialer(self, host, port, peer_id, one_shot=True)
        deadline = self.clock.callLater(self.dial_timeout, self._dial_expired, peer_id)
        waiting = self._waiting[peer_id] = _Waiting(dialer, deadline)
        dialer.start()
        return waiting

    def _dial_expired(self, peer_id: int) -> None:
        waiting = self._waiting.pop(peer_id, None)
        if waiting is not None:
            dialer = waiting.dialer
            why = f"no link to {dialer.host}:{dialer.port} in {self.dial_timeout}s"
            if dialer.last_failure:
                why += f" (last: {dialer.last_failure})"
            self._abandon(peer_id, waiting, GiveUp.DIAL_TIMEOUT, why)

    def _abandon(self, peer_id: int, waiting: _Waiting, reason: GiveUp, why: str) -> None:
        if waiting.deadline.active():
            waiting.deadline.cancel()
        waiting.dialer.stop()
        if waiting.messages:
            self._give_up(reason, peer_id, len(waiting.messages), why)

    def _give_up(self, reason: GiveUp, peer_id: int | None, count: int, detail: str) -> None:
        self.given_up[reason] += count
        self.give_ups.add(str(reason), format_node_id(peer_id), count, detail=detail)

    # -- called by links and dialers

    def _outgoing_link(self, dialer: Dialer) -> Link:
        return Link(self, Role.INITIATOR, expected_peer=dialer.expected_peer, dialer=dialer)

    def _link_started(self, link: Link) -> None:
        self._all.add(link)

    def _link_established(self, link: Link) -> None:
        peer = link.peer_node_id
        assert peer is not None
        if link.dialer is not None:
            link.dialer._established(link)
        existing = self._links.get(peer)
        if existing is not None and existing is not link:
            if not keep_new_link(
                self.node_id,
                peer,
                existing_initiated_locally=existing.initiated_locally,
                new_initiated_locally=link.initiated_locally,
            ):
                link._close(Reason.DUPLICATE_LINK, "kept the existing link", abort=False)
                return
            self._links[peer] = link
            existing._close(Reason.DUPLICATE_LINK, "replaced by a new link", abort=False)
        self._links[peer] = link
        waiting = self._waiting.pop(peer, None)
        if waiting is not None:
            waiting.deadline.cancel()
            if waiting.dialer.link is not link:
                waiting.dialer.stop()
            for data, bulk in waiting.messages:
                link.send(data, bulk=bulk)
        self.handler.link_established(link)

    def _link_closed(self, link: Link, reason: Reason) -> None:
        self._all.discard(link)
        peer = link.peer_node_id
        if peer is not None and self._links.get(peer) is link:
            del self._links[peer]
            self.handler.link_lost(link, str(reason))
            for dialer in list(self._dialers.values()):
                dialer._peer_unlinked(peer)
        if link.dialer is not None:
            link.dialer._link_ended(link, reason)


async def _stop_listening(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
