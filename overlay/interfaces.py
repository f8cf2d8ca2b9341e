"""Which network interfaces exist, and which of them discovery should use.

Enumeration uses the standard library only (Linux): ``socket.if_nameindex()`` for
names and indices, ``SIOCGIFFLAGS`` for flags, ``SIOCGIFCONF`` for every IPv4
address, and ``/proc/net/if_inet6`` for IPv6 link-local addresses. Selection is a
pure function so that the safety rule -- developer mode never leaves loopback --
lives in one place and is tested without touching the host.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Interface",
    "InterfaceSelectionError",
    "list_interfaces",
    "parse_if_inet6",
    "select_interfaces",
]

_SIOCGIFCONF = 0x8912
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000
_IFNAMSIZ = 16
# struct ifreq: a 16-byte name and a union whose largest member (struct ifmap) is
# 24 bytes on 64-bit platforms and 16 on 32-bit ones.
_IFREQ_SIZE = _IFNAMSIZ + (24 if struct.calcsize("P") == 8 else 16)
_MAX_IPV4_ADDRESSES = 1024

# /proc/net/if_inet6 columns: address, ifindex, prefix length, scope, flags, name.
_SCOPE_LINK = 0x20
# An address still doing (or having failed) duplicate address detection cannot be
# used as a source or reached yet; it shows up again, usable, on a later scan.
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40


@dataclass(frozen=True, slots=True)
class Interface:
    """One network interface as discovery sees it."""

    name: str
    index: int
    up: bool
    multicast: bool
    loopback: bool
    ipv4: tuple[str, ...] = ()
    ipv6_link_local: tuple[str, ...] = ()
    """Usable fe80::/10 addresses, without a ``%scope`` suffix."""


class InterfaceSelectionError(ValueError):
    """The requested interfaces cannot be used; the message says which and why."""


def list_interfaces() -> list[Interface]:
    """Every interface of this host (or network namespace), in index order."""
    ipv6 = _read_if_inet6()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ipv4 = _ipv4_addresses(sock)
        found = []
        for index, name in sorted(socket.if_nameindex()):
            try:
                flags = _flags(sock, name)
            except OSError:  # vanished between the listing and the query
                continue
            found.append(
                Interface(
                    name=name,
                    index=index,
                    up=bool(flags & _IFF_UP),
                    multicast=bool(flags & _IFF_MULTICAST),
                    loopback=bool(flags & _IFF_LOOPBACK),
                    ipv4=tuple(ipv4.get(name, ())),
                    ipv6_link_local=tuple(ipv6.get(name, ())),
                )
            )
    return found


def select_interfaces(
    available: Iterable[Interface], names: Sequence[str] = (), *, network: bool
) -> tuple[Interface, ...]:
    """The interfaces to run discovery on.

    In developer mode (``network=False``) only loopback interfaces qualify, so a
    node without ``--net`` can never announce itself on a real network. In network
    mode the default is every interface that is up, multicast-capable and not
    loopback; explicit ``names`` (``--interface``) are taken as given, in the given
    order, and unknown ones are an error that names them.

    The loopback interface does not need the MULTICAST flag: Linux delivers
    multicast sent out of ``lo`` to local listeners either way.
    """
    interfaces = list(available)
    by_name = {interface.name: interface for interface in interfaces}
    wanted = list(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise InterfaceSelectionError(
            f"unknown interface(s): {', '.join(unknown)}"
            f" (available: {', '.join(by_name) or 'none'})"
        )
    if not network:
        refused = [name for name in wanted if not by_name[name].loopback]
        if refused:
            raise InterfaceSelectionError(
                f"developer mode (no --net) discovers on loopback only;"
                f" refusing {', '.join(refused)}: add --net to use them"
            )
        chosen = [by_name[name] for name in wanted] or [i for i in interfaces if i.loopback]
        return tuple(interface for interface in chosen if interface.up)
    if wanted:
        return tuple(by_name[name] for name in wanted)
    return tuple(i for i in interfaces if i.up and i.multicast and not i.loopback)


def parse_if_inet6(text: str) -> dict[str, list[str]]:
    """Usable IPv6 link-local addresses per interface name, from ``/proc/net/if_inet6``."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6:
            continue
        hex_address, _index, _prefix, scope, flags, name = fields
        try:
            address = ipaddress.IPv6Address(bytes.fromhex(hex_address))
            scope_value, flag_value = int(scope, 16), int(flags, 16)
        except ValueError:
            continue
        if scope_value != _SCOPE_LINK or flag_value & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED):
            continue
        found.setdefault(name, []).append(str(address))
    return found


def _read_if_inet6() -> dict[str, list[str]]:
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            return parse_if_inet6(f.read())
    except OSError:  # IPv6 disabled in this kernel or namespace
        return {}


def _flags(sock: socket.socket, name: str) -> int:
    request = struct.pack(f"{_IFNAMSIZ}sH", name.encode(), 0)
    reply = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request)
    (flags,) = struct.unpack_from("H", reply, _IFNAMSIZ)
    return int(flags)


def _ipv4_addresses(sock: socket.socket) -> dict[str, list[str]]:
    """Every IPv4 address per interface (SIOCGIFCONF also lists secondary ones)."""
    buffer = array.array("B", bytes(_MAX_IPV4_ADDRESSES * _IFREQ_SIZE))
    pointer, _ = buffer.buffer_info()
    request = struct.pack("iP", len(buffer), pointer)
    reply = fcntl.ioctl(sock.fileno(), _SIOCGIFCONF, request)
    length = struct.unpack_from("i", reply)[0]
    data = buffer.tobytes()[:length]
    found: dict[str, list[str]] = {}
    for offset in range(0, length - _IFREQ_SIZE + 1, _IFREQ_SIZE):
        label = data[offset : offset + _IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
        # struct sockaddr_in: family (2 bytes), port (2 bytes), address (4 bytes).
        address = socket.inet_ntoa(data[offset + _IFNAMSIZ + 4 : offset + _IFNAMSIZ + 8])
        # Aliases carry a label such as "eth0:1"; the interface is the part before ":".
        found.setdefault(label.split(":", 1)[0], []).append(address)
    return found
