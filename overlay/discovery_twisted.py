"""The Twisted shell of discovery: multicast sockets, one timer, interface rescans.

:class:`MulticastDiscovery` feeds a :class:`~overlay.discovery.Discovery` core and
carries out its effects. It keeps one channel (a socket) per interface and address
family: IPv6 on the link-local group when the interface has a usable link-local
address, IPv4 on the administratively scoped group when it has an IPv4 address.
Both carry the same beacon, so a peer heard over both is still one peer.

Sockets come from a :class:`SocketFactory`; :class:`MulticastSockets` makes real
ones. Each joins its group on one interface only, sends out of that interface only
(``IP_MULTICAST_IF`` / ``IPV6_MULTICAST_IF``), with a TTL/hop limit of 1 -- and a TTL
of 0 on loopback, so beacons sent there never leave the host. A socket that cannot
be set up is reported and retried at the next rescan; the other interfaces go on.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet import defer
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IReactorSocket, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from overlay.discovery import MAX_ADDRESSES, MAX_BEACON_SIZE, Discovery, DiscoveryEvent, SendBeacon
from overlay.interfaces import Interface
from overlay.timer import DeadlineTimer

__all__ = [
    "DEFAULT_PORT",
    "GROUP_V4",
    "GROUP_V6",
    "ChannelError",
    "MulticastDiscovery",
    "MulticastSockets",
    "SocketFactory",
    "advertised_addresses",
]

DEFAULT_PORT = 47853
GROUP_V4 = "239.255.105.114"
"""In 239.255.0.0/16, the IPv4 Local Scope (RFC 2365): it stays on the site."""
GROUP_V6 = "ff02::6972:6973"
"""Link-local scope: routers never forward it. The last 32 bits spell "iris"."""

_RECEIVE_BUFFER = 4 * MAX_BEACON_SIZE  # anything longer is oversize anyway
_IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux; absent from Python 3.11


class ChannelError(Exception):
    """A discovery socket could not be set up; the message says where and why."""


class SocketFactory(Protocol):
    """Makes the socket of one channel (real ones, or fakes in tests)."""

    def open(
        self, interface: Interface, family: socket.AddressFamily, protocol: DatagramProtocol
    ) -> tuple[str, int]:
        """Connect ``protocol`` to a socket that hears the discovery group of ``family``
        on ``interface`` only and sends out of it; return where to send beacons.

        Raises :class:`ChannelError`.
        """
        ...


class MulticastSockets:
    """Real multicast sockets, adopted by ``reactor``.

    ``port`` 0 takes an ephemeral port for the first socket and then the same one
    for all the others (tests use this: no fixed ports); :attr:`port` tells which.
    """

    def __init__(
        self,
        reactor: IReactorSocket,
        port: int = DEFAULT_PORT,
        *,
        group_v4: str = GROUP_V4,
        group_v6: str = GROUP_V6,
    ) -> None:
        self.port = port
        self._reactor = reactor
        self._groups = {socket.AF_INET: group_v4, socket.AF_INET6: group_v6}

    def open(
        self, interface: Interface, family: socket.AddressFamily, protocol: DatagramProtocol
    ) -> tuple[str, int]:
        group = self._groups[family]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        step = "socket setup"
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET:
                local = interface.ipv4[0]
                mreqn = struct.pack(
                    "4s4si", socket.inet_aton(group), socket.inet_aton(local), interface.index
                )
                step = "IP_MULTICAST_ALL"  # hear only what arrives where we joined
                sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
                step = "bind"
                sock.bind((group, self.port))
                step = "IP_ADD_MEMBERSHIP"
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                step = "IP_MULTICAST_IF"
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                step = "IP_MULTICAST_TTL"
                ttl = 0 if interface.loopback else 1
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
                step = "IP_MULTICAST_LOOP"  # other nodes on this host must hear us
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            else:
                step = "bind"  # a scoped link-local group binds the socket to the interface
                sock.bind((group, self.port, 0, interface.index))
                step = "IPV6_JOIN_GROUP"
                mreq = socket.inet_pton(family, group) + struct.pack("@I", interface.index)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                step = "IPV6_MULTICAST_IF"
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, interface.index)
                step = "IPV6_MULTICAST_HOPS"
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
                step = "IPV6_MULTICAST_LOOP"
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            port = sock.getsockname()[1]
            step = "adopt"
            self._reactor.adoptDatagramPort(sock.fileno(), family, protocol, _RECEIVE_BUFFER)
        except OSError as error:
            raise ChannelError(f"{step} failed: {error.strerror or error}") from error
        finally:
            sock.close()  # the reactor holds its own duplicate
        if self.port == 0:
            self.port = port
        return group, port


def advertised_addresses(interface: Interface) -> tuple[str, ...]:
    """What a beacon on ``interface`` advertises: IPv6 link-local first, then IPv4."""
    return (interface.ipv6_link_local + interface.ipv4)[:MAX_ADDRESSES]


def _families(interface: Interface) -> tuple[socket.AddressFamily, ...]:
    if not interface.up:
        return ()
    families = []
    if interface.ipv6_link_local:
        families.append(socket.AF_INET6)
    if interface.ipv4:
        families.append(socket.AF_INET)
    return tuple(families)


_FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


class _Channel(DatagramProtocol):
    """One socket: beacons of one address family on one interface."""

    noisy = False  # the adapter logs what matters, with the interface named

    def __init__(
        self, owner: MulticastDiscovery, interface: Interface, family: socket.AddressFamily
    ) -> None:
        self.owner = owner
        self.interface = interface
        self.family = family
        self.destination: tuple[str, int] | None = None
        self.send_error: str | None = None

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.owner._received(self, datagram, addr)

    def send(self, payload: bytes) -> str | None:
        """Send one beacon; return what went wrong, if anything."""
        if self.transport is None or self.destination is None:
            return "not open"
        try:
            self.transport.write(payload, self.destination)
        except (OSError, MessageLengthError) as error:
            return str(error)
        return None

    def close(self) -> defer.Deferred[None]:
        transport, self.transport = self.transport, None
        closing = None if transport is None else transport.stopListening()
        return defer.succeed(None) if closing is None else closing


@dataclass(frozen=True, slots=True)
class _Active:
    interface: Interface
    channels: dict[socket.AddressFamily, _Channel]


class MulticastDiscovery:
    """Runs a :class:`Discovery` core over multicast sockets.

    ``scan`` returns the interfaces to use now (typically
    ``select_interfaces(list_interfaces(), names, network=...)``); it is called at
    start and every ``rescan_interval`` seconds, so interfaces that come up, change
    address or go away are followed. For ``settling_time`` after start and after
    any change it is called every ``settling_interval`` instead: a fresh interface's
    IPv6 link-local address becomes usable only when duplicate address detection
    ends, a second or two later, and peers should not wait for the slow rescan.
    Events other than :class:`SendBeacon` go to ``on_event``.
    """

    log = Logger()

    def __init__(
        self,
        core: Discovery,
        clock: IReactorTime,
        sockets: SocketFactory,
        scan: Callable[[], Sequence[Interface]],
        on_event: Callable[[DiscoveryEvent], None],
        *,
        rescan_interval: float = 2.0,
        settling_interval: float = 0.25,
        settling_time: float = 5.0,
    ) -> None:
        self.core = core
        self._clock = clock
        self._sockets = sockets
        self._scan = scan
        self._on_event = on_event
        self._rescan_interval = rescan_interval
        self._settling_interval = settling_interval
        self._settling_time = settling_time
        self._next_rescan = 0.0
        self._settle_until = 0.0
        self._last_scan: dict[str, Interface] | None = None
        self._scan_error: str | None = None
        self._active: dict[str, _Active] = {}
        self._open_errors: dict[tuple[str, socket.AddressFamily], str] = {}
        self._timer = DeadlineTimer(clock, self._on_timer)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the core, open the channels and send the first beacons."""
        now = self._clock.seconds()
        self._emit(self.core.start(now))
        self._timer.wake(self._on_timer(now))

    def stop(self) -> defer.Deferred[None]:
        """Close every channel; fires when the sockets are closed."""
        self._timer.stop()
        closing = [self._close(name) for name in list(self._active)]
        return defer.gatherResults([d for ds in closing for d in ds]).addCallback(lambda _: None)

    @property
    def interfaces(self) -> dict[str, tuple[str, ...]]:
        """The interfaces in use, each with the address families of its open channels."""
        return {
            name: tuple(_FAMILY_NAMES[f] for f in active.channels)
            for name, active in self._active.items()
        }

    # -- inputs ---------------------------------------------------------------------

    def _received(self, channel: _Channel, datagram: bytes, source: tuple[str, int]) -> None:
        if channel.transport is None:  # closed while the datagram was queued
            return
        now = self._clock.seconds()
        ignored = self.core.stats.ignored_unauthenticated
        self._emit(self.core.datagram_received(datagram, channel.interface.name, now))
        if self.core.stats.ignored_unauthenticated != ignored:
            self.log.debug(
                "Ignored a beacon from {source} on {interface}: other network or forged",
                source=source[0],
                interface=channel.interface.name,
            )
        self._timer.wake(self._deadline())

    def _on_timer(self, now: float) -> float:
        if now >= self._next_rescan:
            self._rescan(now)
        self._emit(self.core.on_timer(now))
        return self._deadline()

    # -- internals ------------------------------------------------------------------

    def _deadline(self) -> float:
        core = self.core.next_deadline()
        return self._next_rescan if core is None else min(core, self._next_rescan)

    def _emit(self, events: Sequence[DiscoveryEvent]) -> None:
        for event in events:
            if isinstance(event, SendBeacon):
                self._send(event)
            else:
                self._on_event(event)

    def _send(self, event: SendBeacon) -> None:
        active = self._active.get(event.interface)
        if active is None:
            return
        for family, channel in active.channels.items():
            error = channel.send(event.payload)
            if error is not None and error != channel.send_error:
                self.log.warn(
                    "Cannot send a beacon on {interface} over {family}: {error}",
                    interface=event.interface,
                    family=_FAMILY_NAMES[family],
                    error=error,
                )
            channel.send_error = error

    def _rescan(self, now: float) -> None:
        try:
            wanted = {interface.name: interface for interface in self._scan()}
            self._scan_error = None
        except (OSError, ValueError) as error:  # keep what we have
            if str(error) != self._scan_error:
                self.log.error("Cannot list network interfaces: {error}", error=str(error))
            self._scan_error = str(error)
            wanted = self._last_scan or {}
        if wanted != self._last_scan:
            self._settle_until = now + self._settling_time
        self._last_scan = wanted
        settling = now < self._settle_until
        self._next_rescan = now + (self._settling_interval if settling else self._rescan_interval)
        for name in [name for name in self._active if name not in wanted]:
            self._close(name)
            self.core.remove_interface(name)
        for interface in wanted.values():
            self._sync(interface, now)

    def _sync(self, interface: Interface, now: float) -> None:
        """Bring one interface's channels and advertised addresses up to date."""
        name = interface.name
        active = self._active.get(name)
        if active is not None and active.interface.index != interface.index:
            self._close(name)  # the name now belongs to a new interface
            active = None
        old = {} if active is None else active.channels
        families = _families(interface)
        for family in [f for f in old if f not in families]:
            old.pop(family).close()
        channels = {}  # in order of preference: IPv6 first
        for family in families:
            channel = old.get(family) or self._open(interface, family)
            if channel is not None:
                channels[family] = channel
        for channel in channels.values():
            channel.interface = interface
        if not channels:
            self._active.pop(name, None)
            self.core.remove_interface(name)
            return
        self._active[name] = _Active(interface, channels)
        self.core.add_interface(name, advertised_addresses(interface), now)

    def _open(self, interface: Interface, family: socket.AddressFamily) -> _Channel | None:
        channel = _Channel(self, interface, family)
        key = (interface.name, family)
        try:
            channel.destination = self._sockets.open(interface, family, channel)
        except ChannelError as error:
            if self._open_errors.get(key) != str(error):
                self.log.warn(
                    "Discovery cannot use {interface} over {family}: {error}",
                    interface=interface.name,
                    family=_FAMILY_NAMES[family],
                    error=str(error),
                )
            self._open_errors[key] = str(error)
            return None
        self._open_errors.pop(key, None)
        self.log.info(
            "Discovery on {interface} over {family}, group {group} port {port}",
            interface=interface.name,
            family=_FAMILY_NAMES[family],
            group=channel.destination[0],
            port=channel.destination[1],
        )
        return channel

    def _close(self, name: str) -> list[defer.Deferred[None]]:
        active = self._active.pop(name, None)
        if active is None:
            return []
        return [channel.close() for channel in active.channels.values()]
