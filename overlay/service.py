"""One node's overlay as a Twisted service: links, discovery and the pure overlay stack.

:class:`OverlayService` owns a :class:`~overlay.link_twisted.LinkService` (authenticated,
encrypted links), optionally a :class:`~overlay.discovery_twisted.MulticastDiscovery`
(LAN beacons), and a pure :class:`~overlay.stack.OverlayStack`: Pastry plus the layers
above it (lookups always; Scribe and messaging as the composition root adds them). It
turns the stack's effects into link traffic and link events into stack input, with one
timer for the whole stack:

* ``Send`` goes over the link to that peer; with no link yet, the link service
  dials it and holds the message (bounded) until the link is up, or gives it up,
  counted, if no link comes up in time.
* A node starts as a one-node overlay at once, so it is usable immediately; the
  first peer it hears of becomes its way in (``join_via``), and every later one is
  offered to Pastry as a hint, which dials it only if it would improve the state
  ("dial only when the overlay needs it").
* ``lookup(key)`` routes a probe to the node responsible for ``key`` and returns
  its id: what ``irisnode lookup`` and the LAN tests use to check routing.
* Effects of the upper layers that are meant for the application (Scribe's
  deliveries, for example) go to the ``upcalls`` callable the owner passed in.

Peer addresses inside Pastry are opaque bytes; here they are ``"PORT HOST HOST..."``
in ASCII: the link port and the addresses the node can be reached on. IPv6
link-local hosts travel without a scope (it only means something on the receiving
host) and get the scope of the interface the peer was heard on when dialled.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from overlay.discovery import PeerForgotten, PeerSeen, SeedCandidate
from overlay.identity import Credentials, NetworkKey
from overlay.ids import format_id
from overlay.link_frames import DEFAULT_LIMITS, LinkLimits
from overlay.link_twisted import Link, LinkService, describe_address
from overlay.lookup import LookupAnswered, LookupCore
from overlay.pastry import (
    Deliver,
    Dropped,
    LeafSetChanged,
    NodeRef,
    PastryConfig,
    PastryCore,
    PeerDead,
    Ready,
    Send,
    is_bulk,
)
from overlay.stack import OverlayStack, UpperLayer
from overlay.timer import DeadlineTimer
from overlay.wire import MessageRegistry, WireError

log = Logger(namespace="irisnode.overlay")

Entropy = Callable[[int], bytes]
UpperLayers = Callable[[PastryCore], Sequence[UpperLayer]]
"""Builds the layers above Pastry and lookups (Scribe, messaging) once Pastry exists."""


def encode_address(port: int, hosts: Sequence[str]) -> bytes:
    """Pastry's opaque address of a node: its link port and where it can be reached."""
    return " ".join([str(port), *hosts]).encode("ascii")


def decode_address(address: bytes) -> tuple[int, list[str]]:
    """The inverse of :func:`encode_address`; raises ValueError on anything else."""
    port_text, *hosts = address.decode("ascii").split(" ")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in address {address!r}")
    for host in hosts:
        ipaddress.ip_address(host.partition("%")[0])
    return port, hosts


def _is_link_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_link_local
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class OverlayConfig:
    link_port: int = 0
    """Where links are accepted (0: any free port)."""
    link_interface: str = "::"
    """Address the link listener binds: all of them by default (links authenticate)."""
    advertised_hosts: tuple[str, ...] = ()
    """Addresses others may dial; with none, the listener's own address is used."""
    scope_interface: str = ""
    """Interface that gives link-local peers without a known scope their scope."""
    pastry: PastryConfig = field(default_factory=PastryConfig)
    dial_timeout: float = 5.0
    """A peer that cannot be linked within this long loses the messages queued for it."""
    max_queued: int = 256
    """Messages held per peer while its link is being set up."""
    link_limits: LinkLimits = DEFAULT_LIMITS
    """Message, frame and queue limits of every link (the message limit should cover the
    relay's ``--max-message-size`` plus the node-to-node envelope)."""
    lookup_timeout: float = 2.0
    handshake_rate: float = 5.0
    """Link handshakes accepted per second from one source address (a burst of 20 first):
    each costs about half a millisecond of CPU (``--handshake-rate``)."""


class OverlayService:
    """The overlay of one node (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        network: NetworkKey,
        credentials: Credentials,
        config: OverlayConfig,
        *,
        registry: MessageRegistry,
        rng: random.Random,
        entropy: Entropy,
        upper_layers: UpperLayers = lambda pastry: (),
        upcalls: Callable[[object], None] = lambda effect: None,
    ) -> None:
        self.reactor = reactor
        self.network = network
        self.credentials = credentials
        self.config = config
        self.registry = registry
        self._rng = rng
        self._entropy = entropy
        self._upper_layers = upper_layers
        self._upcalls = upcalls
        self.node_id = credentials.identity.node_id
        self.links = LinkService(
            reactor,
            reactor,
            credentials,
            self,
            entropy=entropy,
            rng=rng,
            limits=config.link_limits,
            dial_timeout=config.dial_timeout,
            handshake_rate=config.handshake_rate,
            max_dial_queue=config.max_queued,
        )
        self.discovery: Any = None  # a MulticastDiscovery, see attach_discovery
        self._discovery_core: Any = None
        self.stack: OverlayStack | None = None
        self.pastry: PastryCore | None = None
        self._lookup: LookupCore | None = None
        self.address = b""
        self._timer = DeadlineTimer(reactor, self._on_timer)
        self._listener: IListeningPort | None = None
        self._heard_at: dict[int, tuple[str, int]] = {}  # where discovery heard a peer
        self._joined_via: int | None = None
        self._lookups: dict[int, Deferred[int]] = {}
        self.started_at = 0.0
        self.ready_at: float | None = None

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Listen for links and start as a one-node overlay; peers extend it as they appear."""
        self.started_at = self.reactor.seconds()
        self._listener = self.links.listen(self.config.link_port, self.config.link_interface)
        bound: Any = self._listener.getHost()
        port = int(bound.port)
        hosts = self.config.advertised_hosts or (bound.host,)
        self.address = encode_address(port, hosts)
        pastry = self.pastry = PastryCore(self.node_id, self.address, self._rng, self.config.pastry)
        self._lookup = LookupCore(self.node_id)
        self.stack = OverlayStack(pastry, (self._lookup, *self._upper_layers(pastry)))
        self._apply(self.stack.start(self.reactor.seconds()))

    @property
    def link_port(self) -> int:
        if self._listener is None:
            return 0
        bound: Any = self._listener.getHost()
        return int(bound.port)

    async def stop(self) -> None:
        """Say goodbye to the leaf set (so it repairs at once), then close everything."""
        if self.pastry is not None:
            self.run(self.pastry.leave(self.reactor.seconds()))
        self._timer.stop()
        for pending in self._lookups.values():
            pending.errback(TimeoutError("node stopping"))
        self._lookups.clear()
        if self.discovery is not None:
            await self.discovery.stop()
        await self.links.stop()

    # -- discovery -----------------------------------------------------------------------

    def on_discovery(self, event: object) -> None:
        """Events of :class:`~overlay.discovery_twisted.MulticastDiscovery`."""
        if isinstance(event, PeerSeen):
            if event.node_id == self.node_id:
                return
            self._heard_at[event.node_id] = (event.address, event.port)
            self._offer(NodeRef(event.node_id, encode_address(event.port, [event.address])))
        elif isinstance(event, SeedCandidate):
            self.links.connect(event.host, event.port)
        elif isinstance(event, PeerForgotten):
            self._heard_at.pop(event.node_id, None)

    def attach_discovery(self, adapter: Any, core: Any) -> None:
        """Let ``adapter`` (a started MulticastDiscovery) report peers; stop it with us."""
        self.discovery = adapter
        self._discovery_core = core

    def add_seed(self, host: str, port: int) -> None:
        """A static peer address (``--seed``): keep a link to it until it joins us."""
        self.links.connect(host, port)

    def _offer(self, ref: NodeRef) -> None:
        """A node we have heard of: the first one is our way in, later ones are hints."""
        pastry = self.pastry
        if pastry is None:
            return
        now = self.reactor.seconds()
        if self._joined_via is None:
            self._joined_via = ref.node_id
            self.run(pastry.join_via(ref, now))
        else:
            self.run(pastry.hint([ref], now))

    # -- links (LinkHandler) -------------------------------------------------------------

    def link_established(self, link: Link) -> None:
        peer = link.peer_node_id
        assert peer is not None
        pastry = self.pastry
        if pastry is None:
            return
        dialer = link.dialer
        if dialer is not None and dialer.expected_peer == peer:
            # We dialled it, so we know where it listens: first-hand knowledge.
            address = encode_address(dialer.port, [dialer.host.partition("%")[0]])
            self.run(pastry.link_up(peer, address, self.reactor.seconds()))
        elif link.initiated_locally and self._joined_via is None:
            # A seed answered: join the overlay through it.
            host = getattr(link.address, "host", "")
            port = getattr(link.address, "port", 0)
            if host and port:
                self._offer(NodeRef(peer, encode_address(port, [host])))

    def frame_received(self, link: Link, data: bytes) -> None:
        peer = link.peer_node_id
        stack = self.stack
        if peer is None or stack is None:
            return
        try:
            message = self.registry.decode(data, max_size=self.config.link_limits.max_message_size)
        except WireError as error:
            log.warn("dropping link to {peer}: {reason}", peer=format_id(peer), reason=str(error))
            link.close()
            return
        self._apply(stack.handle(peer, message, self.reactor.seconds()))

    def link_lost(self, link: Link, reason: str) -> None:
        peer = link.peer_node_id
        if peer is not None and self.pastry is not None:
            assert self.stack is not None
            self._apply(self.stack.link_down(peer, self.reactor.seconds()))

    def link_writable(self, link: Link) -> None:
        """Nothing here waits for a link to drain yet (tunnels have their own credit)."""

    # -- the stack's effects ---------------------------------------------------------------

    def _on_timer(self, now: float) -> float | None:
        stack = self.stack
        if stack is None:
            return None
        self._apply(stack.on_timer(now), rearm=False)
        return stack.next_deadline()

    def run(self, effects: Sequence[object]) -> None:
        """Effects of a direct call into Pastry or a layer: through the stack first."""
        assert self.stack is not None
        self._apply(self.stack.run(effects, self.reactor.seconds()))

    def _apply(self, effects: Sequence[object], rearm: bool = True) -> None:
        for effect in effects:
            if type(effect) is Send:
                message = effect.message
                data = self.registry.encode(message)
                self._send(effect.dst_id, effect.dst_address, data, is_bulk(message))
            elif type(effect) is LookupAnswered:
                pending = self._lookups.pop(effect.nonce, None)
                if pending is not None:
                    pending.callback(effect.owner)
            elif isinstance(effect, PeerDead):
                log.info(
                    "peer {peer} is gone ({why})", peer=format_id(effect.peer_id), why=effect.reason
                )
                self._forget(effect.peer_id)
            elif isinstance(effect, Ready):
                self.ready_at = self.reactor.seconds()
            elif isinstance(effect, Dropped):
                log.debug("routed message dropped: {reason}", reason=effect.reason)
            elif isinstance(effect, Deliver):
                log.debug(
                    "routed {kind} from {origin} has no layer to take it",
                    kind=type(effect.route.message).__name__,
                    origin=format_id(effect.route.origin_id),
                )
            elif not isinstance(effect, LeafSetChanged):
                self._upcalls(effect)
        if rearm and self.stack is not None:
            self._timer.wake(self.stack.next_deadline())

    def _send(self, peer: int, address: bytes, data: bytes, bulk: bool) -> None:
        dial_to = None if peer in self.links.links else self._dial_target(peer, address)
        self.links.send(peer, data, bulk=bulk, dial_to=dial_to)

    def _dial_target(self, peer: int, address: bytes) -> tuple[str, int] | None:
        heard = self._heard_at.get(peer)
        if heard is not None:
            return heard
        try:
            port, hosts = decode_address(address)
        except ValueError:
            # A peer's word, not ours: at debug, or any peer could fill the log.
            log.debug(
                "cannot dial {peer}: bad address {address!r}", peer=format_id(peer), address=address
            )
            return None
        if not hosts:
            return None
        # IPv4 first: it needs no scope. A bare link-local IPv6 address gets ours.
        hosts.sort(key=_is_link_local)
        host = hosts[0]
        if _is_link_local(host) and "%" not in host and self.config.scope_interface:
            host = f"{host}%{self.config.scope_interface}"
        return host, port

    def _forget(self, peer: int) -> None:
        self.links.close_peer(peer)

    # -- lookups ----------------------------------------------------------------------

    def lookup(self, key: int, timeout: float | None = None) -> Deferred[int]:
        """The id of the node responsible for ``key``, found by routing to it."""
        assert self._lookup is not None
        nonce, effects = self._lookup.lookup(key)

        def forget(_: object) -> None:
            self._lookups.pop(nonce, None)

        result: Deferred[int] = Deferred(forget)
        self._lookups[nonce] = result
        self.run(effects)

        def timed_out(outcome: object, seconds: float) -> int:
            raise TimeoutError(f"no answer for key {format_id(key)} within {seconds} s")

        delay = self.config.lookup_timeout if timeout is None else timeout
        return result.addTimeout(delay, self.reactor, onTimeoutCancel=timed_out)

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What a person needs to see the overlay from here (``irisnode status``)."""
        pastry = self.pastry
        left, right = pastry.leaf_set() if pastry is not None else ([], [])
        rows = pastry.routing_table() if pastry is not None else {}
        known = pastry.peers() if pastry is not None else {}
        peers = []
        for peer_id in sorted(set(known) | set(self.links.links)):
            link = self.links.links.get(peer_id)
            address = known.get(peer_id)
            peers.append(
                {
                    "node_id": format_id(peer_id),
                    "address": address.decode("ascii", "replace") if address else None,
                    "link": "up" if link is not None else "down",
                    "remote": describe_address(link.address) if link is not None else None,
                    "leaf": peer_id in left or peer_id in right,
                }
            )
        return {
            "node_id": format_id(self.node_id),
            "network": self.network.name,
            "ready": pastry is not None and pastry.is_ready,
            "link_port": self.link_port,
            "address": self.address.decode("ascii"),
            "peers": peers,
            "leaf_set": {
                "left": [format_id(p) for p in left],
                "right": [format_id(p) for p in right],
            },
            "routing_table": {
                "entries": sum(len(ids) for ids in rows.values()),
                "rows": {str(row): [format_id(p) for p in ids] for row, ids in rows.items()},
            },
            "discovery": self._discovery_status(),
            "links": {
                "bytes_sent": self.links.bytes_sent,
                "bytes_received": self.links.bytes_received,
                "handshakes_refused": self.links.handshakes_refused,
                "given_up": dict(self.links.given_up),
            },
            "dialling": [
                {
                    "address": f"[{d.host}]:{d.port}" if ":" in d.host else f"{d.host}:{d.port}",
                    "failure": d.last_failure,
                }
                for d in self.links.dialers
                if d.parked_on is None and (d.link is None or not d.link.established)
            ],
        }

    def _discovery_status(self) -> dict[str, Any] | None:
        core = self._discovery_core
        if core is None:
            return None
        return {
            "interfaces": list(self.discovery.interfaces),
            "peers_heard": len(core.peers),
            **dataclasses.asdict(core.stats),
        }
