"""Interface enumeration on this machine (read only) and the selection rules."""

from __future__ import annotations

import socket

import pytest

from overlay.interfaces import (
    Interface,
    InterfaceSelectionError,
    list_interfaces,
    parse_if_inet6,
    select_interfaces,
)


def test_loopback_is_found_with_its_address_and_flags() -> None:
    interfaces = {i.name: i for i in list_interfaces()}
    lo = interfaces["lo"]
    assert lo.index == socket.if_nametoindex("lo")
    assert lo.loopback and lo.up
    assert "127.0.0.1" in lo.ipv4
    assert lo.ipv6_link_local == ()  # ::1 has host scope, not link scope


def test_every_interface_of_the_host_is_listed_once_in_index_order() -> None:
    listed = [(i.index, i.name) for i in list_interfaces()]
    assert listed == sorted(socket.if_nameindex())
    assert sum(i.loopback for i in list_interfaces()) >= 1


IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
fe800000000000000000000000000002 05 40 20 c0     eth1
fe800000000000000000000000000003 05 40 20 88     eth1
fe800000000000000000000000000004 05 40 20 80     eth1
garbage line
"""


def test_if_inet6_yields_usable_link_local_addresses_only() -> None:
    """Global (scope 0) and host (0x10) addresses are skipped, and so are
    tentative (0x40) and duplicate (0x08) ones: they cannot be used yet."""
    assert parse_if_inet6(IF_INET6) == {"eth0": ["fe80::fc:ff:fe00:1"], "eth1": ["fe80::4"]}


LO = Interface("lo", 1, up=True, multicast=False, loopback=True, ipv4=("127.0.0.1",))
ETH0 = Interface("eth0", 2, up=True, multicast=True, loopback=False, ipv4=("192.0.2.2",))
ETH1 = Interface("eth1", 3, up=True, multicast=True, loopback=False, ipv6_link_local=("fe80::1",))
DOWN = Interface("eth2", 4, up=False, multicast=True, loopback=False, ipv4=("192.0.2.3",))
NOMC = Interface("tun0", 5, up=True, multicast=False, loopback=False, ipv4=("10.8.0.1",))
ALL = (LO, ETH0, ETH1, DOWN, NOMC)


def test_network_mode_defaults_to_up_multicast_non_loopback() -> None:
    assert select_interfaces(ALL, network=True) == (ETH0, ETH1)


def test_explicit_interfaces_are_taken_as_given_in_order() -> None:
    assert select_interfaces(ALL, ["eth1", "eth0", "eth1"], network=True) == (ETH1, ETH0)
    assert select_interfaces(ALL, ["lo"], network=True) == (LO,)


def test_unknown_interfaces_are_named_in_the_error() -> None:
    with pytest.raises(InterfaceSelectionError, match=r"unknown interface\(s\): wlan9, eth7"):
        select_interfaces(ALL, ["eth0", "wlan9", "eth7"], network=True)


def test_developer_mode_stays_on_loopback() -> None:
    """Even though loopback here lacks the MULTICAST flag: Linux loops it anyway."""
    assert select_interfaces(ALL, network=False) == (LO,)
    assert select_interfaces(ALL, ["lo"], network=False) == (LO,)


def test_developer_mode_refuses_real_interfaces() -> None:
    with pytest.raises(InterfaceSelectionError, match=r"eth0.*--net"):
        select_interfaces(ALL, ["lo", "eth0"], network=False)


def test_developer_mode_without_loopback_up_selects_nothing() -> None:
    lo_down = Interface("lo", 1, up=False, multicast=False, loopback=True)
    assert select_interfaces((lo_down, ETH0), network=False) == ()
