"""LAN discovery: sealed beacons, their schedule, and the table of peers heard.

A pure core (see ``docs/discovery.md``). It takes datagrams and ``now`` and returns
events; the Twisted adapter (``overlay.discovery_twisted``) owns the sockets and
carries them out. Nothing here reads a clock, draws randomness of its own, or logs:
what a caller may want to know about ignored datagrams is in :attr:`Discovery.stats`.

A beacon is sealed with XChaCha20-Poly1305 under a key derived from the network's
``beacon_key``: a beacon from another network or a forged one fails to open and is
ignored, and outsiders learn nothing from it -- not the network, not the node id,
not the ports or the boot time.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

__all__ = [
    "MAX_BEACON_SIZE",
    "Beacon",
    "BeaconError",
    "Discovery",
    "DiscoveryConfig",
    "DiscoveryEvent",
    "DiscoveryStats",
    "PeerForgotten",
    "PeerSeen",
    "Seed",
    "SeedCandidate",
    "SendBeacon",
    "beacon_cipher_key",
    "open_beacon",
    "parse_seed",
    "seal_beacon",
]

# ---------------------------------------------------------------------------------
# Wire format (docs/discovery.md, "Beacon format")

MAGIC = b"IRB"
VERSION = 1
_HEADER = MAGIC + bytes([VERSION])
NONCE_SIZE = 24
TAG_SIZE = 16
MAX_ADDRESSES = 8
_FIXED = struct.Struct("!16sQQHB")  # node id, incarnation, sequence, link port, count
_ADDRESS_SIZE = {4: 4, 6: 16}
MAX_BEACON_SIZE = 256
"""Anything longer is refused before any cryptography is spent on it."""
_MIN_BEACON_SIZE = len(_HEADER) + NONCE_SIZE + _FIXED.size + 1 + 4 + TAG_SIZE
_KEY_CONTEXT = b"irisnode beacon v1"
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Beacon:
    """What a beacon says, once opened."""

    node_id: int
    incarnation: int
    """When the sender started (ms of its clock): orders its restarts."""
    sequence: int
    """Counts the sender's beacons within one incarnation."""
    port: int
    addresses: tuple[str, ...]
    """Where the sender can be reached on the link the beacon was sent on."""


class BeaconError(ValueError):
    """A datagram is not a beacon we accept; ``reason`` names the counter it goes to."""

    def __init__(
        self, reason: Literal["oversize", "malformed", "unauthenticated"], detail: str
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def beacon_cipher_key(beacon_key: bytes) -> bytes:
    """The AEAD key, kept apart from any other use of ``beacon_key``."""
    if len(beacon_key) != 32:
        raise ValueError(f"beacon_key must be 32 bytes, not {len(beacon_key)}")
    return hashlib.blake2b(_KEY_CONTEXT, key=beacon_key, digest_size=32).digest()


def seal_beacon(cipher_key: bytes, beacon: Beacon, nonce: bytes) -> bytes:
    """Encode and encrypt ``beacon``; ``nonce`` must never repeat under one key."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    if not 1 <= len(beacon.addresses) <= MAX_ADDRESSES:
        raise ValueError(f"a beacon carries 1 to {MAX_ADDRESSES} addresses")
    body = bytearray(
        _FIXED.pack(
            beacon.node_id.to_bytes(16, "big"),
            beacon.incarnation,
            beacon.sequence,
            beacon.port,
            len(beacon.addresses),
        )
    )
    for text in beacon.addresses:
        address = ipaddress.ip_address(text)
        body.append(address.version)
        body += address.packed
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(body), _HEADER, nonce, cipher_key)
    return _HEADER + nonce + sealed


def open_beacon(cipher_key: bytes, data: bytes) -> Beacon:
    """Authenticate, decrypt and decode one datagram, or raise :class:`BeaconError`."""
    if len(data) > MAX_BEACON_SIZE:
        raise BeaconError("oversize", f"{len(data)} bytes")
    if len(data) < _MIN_BEACON_SIZE or data[: len(MAGIC)] != MAGIC:
        raise BeaconError("malformed", "not a beacon")
    if data[len(MAGIC)] != VERSION:
        raise BeaconError("malformed", f"version {data[len(MAGIC)]}")
    nonce = data[len(_HEADER) : len(_HEADER) + NONCE_SIZE]
    try:
        body = crypto_aead_xchacha20poly1305_ietf_decrypt(
            data[len(_HEADER) + NONCE_SIZE :], _HEADER, nonce, cipher_key
        )
    except CryptoError:
        raise BeaconError("unauthenticated", "other network or forged") from None
    raw_id, incarnation, sequence, port, count = _FIXED.unpack_from(body)
    if not 1 <= count <= MAX_ADDRESSES or port == 0:
        raise BeaconError("malformed", f"{count} addresses, port {port}")
    addresses = []
    offset = _FIXED.size
    for _ in range(count):
        family = body[offset] if offset < len(body) else 0
        size = _ADDRESS_SIZE.get(family)
        if size is None or offset + 1 + size > len(body):
            raise BeaconError("malformed", "bad address")
        packed = body[offset + 1 : offset + 1 + size]
        addresses.append(str(ipaddress.ip_address(packed)))
        offset += 1 + size
    if offset != len(body):
        raise BeaconError("malformed", "trailing bytes")
    return Beacon(int.from_bytes(raw_id, "big"), incarnation, sequence, port, tuple(addresses))


# ---------------------------------------------------------------------------------
# Seeds


@dataclass(frozen=True, slots=True)
class Seed:
    """A ``--seed HOST:PORT``: a peer to dial where multicast does not reach."""

    host: str
    port: int


def parse_seed(text: str) -> Seed:
    """``HOST:PORT`` or ``[IPV6]:PORT``, as given to ``--seed``."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--seed {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--seed expects HOST:PORT, got {text!r}")
    return Seed(host, int(port_text))


# ---------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class SendBeacon:
    """Send ``payload`` to the discovery groups on ``interface``."""

    interface: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """A peer is new, restarted, moved, or heard on another interface.

    Not repeated for every beacon: only when the overlay may want to act. Dial
    ``address`` first and ``fallbacks`` after it; IPv6 link-local addresses carry
    the ``%interface`` they are reachable through.
    """

    node_id: int
    address: str
    port: int
    interface: str
    first_time: bool
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerForgotten:
    """Nothing heard from this peer for ``peer_timeout``, or the table was full."""

    node_id: int


@dataclass(frozen=True, slots=True)
class SeedCandidate:
    """A configured seed, surfaced once at start for the overlay to dial."""

    host: str
    port: int


DiscoveryEvent = SendBeacon | PeerSeen | PeerForgotten | SeedCandidate


# ---------------------------------------------------------------------------------
# The core


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Timing and limits. The defaults suit a LAN; simulations may shrink them."""

    fast_schedule: tuple[float, ...] = (0.0, 0.15, 0.4, 0.8)
    """Offsets from the start of each interface: newcomers are found in under a second."""
    slow_interval: float = 5.0
    jitter: float = 0.2
    """Slow intervals are drawn from ``slow_interval * (1 ± jitter)``."""
    prompt_interval: float = 0.5
    """Least spacing of the extra beacons that answer a newcomer, per interface."""
    peer_timeout: float = 20.0
    max_peers: int = 1024
    seeds: tuple[Seed, ...] = ()

    def __post_init__(self) -> None:
        schedule = self.fast_schedule
        if not schedule or schedule[0] < 0 or list(schedule) != sorted(schedule):
            raise ValueError("fast_schedule must be a non-empty ascending list of offsets >= 0")
        if self.slow_interval <= 0 or not 0 <= self.jitter < 1 or self.prompt_interval < 0:
            raise ValueError("need slow_interval > 0, 0 <= jitter < 1, prompt_interval >= 0")
        if self.peer_timeout <= self.slow_interval * (1 + self.jitter):
            raise ValueError("peer_timeout must exceed the longest slow interval")
        if self.max_peers < 1:
            raise ValueError("max_peers must be at least 1")


@dataclass(slots=True)
class DiscoveryStats:
    """Counters; the only trace a pure core leaves of what it ignored."""

    sent: int = 0
    accepted: int = 0
    ignored_oversize: int = 0
    ignored_malformed: int = 0
    ignored_unauthenticated: int = 0
    """Other networks and forgeries: indistinguishable, by design."""
    ignored_own: int = 0
    ignored_stale: int = 0
    """Replays, and the second copy of a beacon heard over both IPv6 and IPv4."""
    peers_evicted: int = 0


_REPLAY_WINDOW = 64
_WINDOW_MASK = (1 << _REPLAY_WINDOW) - 1


@dataclass(slots=True)
class _Announcer:
    """The beacon schedule of one interface."""

    addresses: tuple[str, ...]
    started: float
    step: int  # index in fast_schedule of the next beacon; len(fast_schedule) once slow
    due: float
    prompt_due: float | None = None
    last_prompt: float | None = None


@dataclass(slots=True)
class _Peer:
    incarnation: int
    highest: int
    window: int  # bit i set: sequence ``highest - i`` seen
    last_heard: float
    port: int
    links: dict[str, tuple[str, ...]] = field(default_factory=dict)  # interface -> addresses


class Discovery:
    """Announces this node on each interface and reports the peers it hears.

    Call :meth:`start` once, then :meth:`add_interface` for each interface; feed
    every datagram to :meth:`datagram_received` and call :meth:`on_timer` at (or
    after) :meth:`next_deadline`.
    """

    def __init__(
        self,
        beacon_key: bytes,
        node_id: int,
        link_port: int,
        rng: random.Random,
        entropy: Callable[[int], bytes],
        config: DiscoveryConfig | None = None,
    ) -> None:
        if not 0 <= node_id < 1 << 128:
            raise ValueError("node_id must be a 128-bit unsigned integer")
        if not 0 < link_port < 65536:
            raise ValueError(f"link_port must be 1..65535, not {link_port}")
        self.node_id = node_id
        self.link_port = link_port
        self.config = config or DiscoveryConfig()
        self.stats = DiscoveryStats()
        self._key = beacon_cipher_key(beacon_key)
        self._rng = rng
        self._entropy = entropy
        self._incarnation: int | None = None
        self._sequence = 0
        self._interfaces: dict[str, _Announcer] = {}
        self._peers: OrderedDict[int, _Peer] = OrderedDict()  # least recently heard first

    # -- inputs ---------------------------------------------------------------------

    def start(self, now: float) -> list[DiscoveryEvent]:
        """Begin; the incarnation is ``now`` in ms, so a restart outranks the old run."""
        if self._incarnation is not None:
            raise RuntimeError("Discovery already started")
        self._incarnation = min(max(0, int(now * 1000)), _U64)
        return [SeedCandidate(seed.host, seed.port) for seed in self.config.seeds]

    def add_interface(self, name: str, addresses: Sequence[str], now: float) -> None:
        """Announce on ``name`` the ``addresses`` (preferred first) it can be reached at.

        Adding an interface again with other addresses starts its fast schedule over,
        so that peers learn the change quickly; the same addresses change nothing.
        """
        if self._incarnation is None:
            raise RuntimeError("call start() before add_interface()")
        advertised = tuple(_check_address(a) for a in addresses)
        if not 1 <= len(advertised) <= MAX_ADDRESSES:
            raise ValueError(f"{name}: advertise 1 to {MAX_ADDRESSES} addresses")
        current = self._interfaces.get(name)
        if current is not None and current.addresses == advertised:
            return
        self._interfaces[name] = _Announcer(advertised, started=now, step=0, due=now)

    def remove_interface(self, name: str) -> None:
        """Stop announcing on ``name`` and drop what was heard through it."""
        self._interfaces.pop(name, None)
        for peer in self._peers.values():
            peer.links.pop(name, None)

    def datagram_received(self, data: bytes, interface: str, now: float) -> list[DiscoveryEvent]:
        """Handle one datagram heard on ``interface`` (one we announce on)."""
        announcer = self._interfaces.get(interface)
        if announcer is None:
            return []
        try:
            beacon = open_beacon(self._key, data)
        except BeaconError as error:
            counter = f"ignored_{error.reason}"
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            return []
        if beacon.node_id == self.node_id:
            self.stats.ignored_own += 1
            return []
        peer = self._peers.get(beacon.node_id)
        events: list[DiscoveryEvent] = []
        if peer is None:
            if len(self._peers) >= self.config.max_peers:
                evicted, _ = self._peers.popitem(last=False)
                self.stats.peers_evicted += 1
                events.append(PeerForgotten(evicted))
            peer = _Peer(beacon.incarnation, beacon.sequence, 1, now, beacon.port)
            self._peers[beacon.node_id] = peer
            first_time = restarted = True
        else:
            fresh, restarted = _advance_window(peer, beacon.incarnation, beacon.sequence)
            if not fresh:
                self.stats.ignored_stale += 1
                return []
            first_time = False
            self._peers.move_to_end(beacon.node_id)
        self.stats.accepted += 1
        peer.last_heard = now
        new_link = interface not in peer.links
        moved = peer.links.get(interface) != beacon.addresses or peer.port != beacon.port
        if first_time or restarted or new_link:
            # Answer before reporting, whatever the caller does on hearing the news.
            events.extend(self._prompt(interface, announcer, now))
        if first_time or restarted or moved:
            peer.links[interface] = beacon.addresses
            peer.port = beacon.port
            events.append(_peer_seen(beacon, interface, first_time))
        return events

    def on_timer(self, now: float) -> list[DiscoveryEvent]:
        """Send the beacons that are due and forget the peers that fell silent."""
        events: list[DiscoveryEvent] = []
        for name, announcer in self._interfaces.items():
            scheduled = announcer.due <= now
            prompted = announcer.prompt_due is not None and announcer.prompt_due <= now
            if scheduled:
                self._advance_schedule(announcer, now)
            if prompted:
                announcer.last_prompt = now
            if scheduled or prompted:
                announcer.prompt_due = None  # any beacon answers a pending newcomer
                events.append(self._beacon(name, announcer))
        timeout = self.config.peer_timeout
        while self._peers:
            node_id, peer = next(iter(self._peers.items()))
            if peer.last_heard + timeout > now:
                break
            del self._peers[node_id]
            events.append(PeerForgotten(node_id))
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` has something to do, or ``None`` if never."""
        deadlines = [a.due for a in self._interfaces.values()]
        deadlines += [a.prompt_due for a in self._interfaces.values() if a.prompt_due is not None]
        if self._peers:
            deadlines.append(next(iter(self._peers.values())).last_heard + self.config.peer_timeout)
        return min(deadlines, default=None)

    # -- state ----------------------------------------------------------------------

    @property
    def interfaces(self) -> tuple[str, ...]:
        return tuple(self._interfaces)

    @property
    def peers(self) -> tuple[int, ...]:
        """Node ids currently in the table, least recently heard first."""
        return tuple(self._peers)

    # -- internals ------------------------------------------------------------------

    def _prompt(self, name: str, announcer: _Announcer, now: float) -> list[DiscoveryEvent]:
        """Answer a newcomer at once, or as soon as the rate limit allows."""
        last = announcer.last_prompt
        if last is None or now - last >= self.config.prompt_interval:
            announcer.last_prompt = now
            announcer.prompt_due = None
            return [self._beacon(name, announcer)]
        if announcer.prompt_due is None:
            announcer.prompt_due = last + self.config.prompt_interval
        return []

    def _advance_schedule(self, announcer: _Announcer, now: float) -> None:
        schedule = self.config.fast_schedule
        step = announcer.step + 1
        # After a stall, skip the fast slots already past rather than bursting.
        while step < len(schedule) and announcer.started + schedule[step] <= now:
            step += 1
        announcer.step = min(step, len(schedule))
        if step < len(schedule):
            announcer.due = announcer.started + schedule[step]
        else:
            spread = self.config.jitter
            announcer.due = now + self.config.slow_interval * self._rng.uniform(
                1 - spread, 1 + spread
            )

    def _beacon(self, name: str, announcer: _Announcer) -> SendBeacon:
        assert self._incarnation is not None
        self._sequence += 1
        beacon = Beacon(
            self.node_id, self._incarnation, self._sequence, self.link_port, announcer.addresses
        )
        self.stats.sent += 1
        return SendBeacon(name, seal_beacon(self._key, beacon, self._entropy(NONCE_SIZE)))


def _advance_window(peer: _Peer, incarnation: int, sequence: int) -> tuple[bool, bool]:
    """Record ``(incarnation, sequence)``; return (fresh, restarted).

    A later incarnation is a restart. Within one, a sliding window accepts each
    sequence number once, even out of order (two interfaces, two address families).
    """
    if incarnation < peer.incarnation:
        return False, False
    if incarnation > peer.incarnation:
        peer.incarnation, peer.highest, peer.window = incarnation, sequence, 1
        return True, True
    if sequence > peer.highest:
        peer.window = ((peer.window << (sequence - peer.highest)) | 1) & _WINDOW_MASK
        peer.highest = sequence
        return True, False
    offset = peer.highest - sequence
    if offset >= _REPLAY_WINDOW or peer.window >> offset & 1:
        return False, False
    peer.window |= 1 << offset
    return True, False


def _peer_seen(beacon: Beacon, interface: str, first_time: bool) -> PeerSeen:
    addresses = [f"{a}%{interface}" if _is_ipv6_link_local(a) else a for a in beacon.addresses]
    return PeerSeen(
        beacon.node_id, addresses[0], beacon.port, interface, first_time, tuple(addresses[1:])
    )


def _is_ipv6_link_local(text: str) -> bool:
    address = ipaddress.ip_address(text)
    return address.version == 6 and address.is_link_local


def _check_address(text: str) -> str:
    """Normalise one address to advertise; a scope id means nothing to the receiver."""
    address = ipaddress.ip_address(ipaddress.ip_address(text).packed)
    if address.is_multicast or address.is_unspecified:
        raise ValueError(f"cannot advertise {text}")
    return str(address)
