"""The discovery core: beacon format, schedule, authentication, replay, peer table.

No sockets and no clock: cores are fed bytes and ``now`` and their events checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.discovery import (
    MAX_BEACON_SIZE,
    Beacon,
    BeaconError,
    Discovery,
    DiscoveryConfig,
    DiscoveryEvent,
    PeerForgotten,
    PeerSeen,
    Seed,
    SeedCandidate,
    SendBeacon,
    beacon_cipher_key,
    open_beacon,
    parse_seed,
    seal_beacon,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
T0 = 1_750_000_000.0
LINK_LOCAL = "fe80::1"
DOC = Path(__file__).resolve().parent.parent / "docs" / "discovery.md"


def make_core(
    node_id: int,
    *,
    key: bytes = KEY,
    port: int = 4000,
    seed: int | None = None,
    config: DiscoveryConfig | None = None,
    start: float = T0,
    addresses: tuple[str, ...] = (LINK_LOCAL, "192.0.2.1"),
    interface: str = "eth1",
) -> Discovery:
    rng = random.Random(node_id if seed is None else seed)
    core = Discovery(key, node_id, port, rng, rng.randbytes, config)
    core.start(start)
    core.add_interface(interface, addresses, start)
    return core


def beacons(events: list[DiscoveryEvent]) -> list[SendBeacon]:
    return [e for e in events if isinstance(e, SendBeacon)]


def seen(events: list[DiscoveryEvent]) -> list[PeerSeen]:
    return [e for e in events if isinstance(e, PeerSeen)]


def first_beacon(core: Discovery, now: float = T0) -> bytes:
    (beacon,) = beacons(core.on_timer(now))
    return beacon.payload


# -- beacon format ------------------------------------------------------------------


def test_seal_then_open_round_trips() -> None:
    key = beacon_cipher_key(KEY)
    beacon = Beacon(2**128 - 1, 5, 7, 65535, ("fe80::1", "10.0.0.1", "2001:db8::9"))
    data = seal_beacon(key, beacon, bytes(24))
    assert open_beacon(key, data) == beacon
    assert len(data) <= MAX_BEACON_SIZE


def test_nothing_in_clear_but_the_header_and_nonce() -> None:
    """The network, the node id, the port and the addresses are all sealed."""
    node_id = 0x0123456789ABCDEF0123456789ABCDEF
    beacon = Beacon(node_id, 1, 1, 4321, ("192.0.2.77",))
    data = seal_beacon(beacon_cipher_key(KEY), beacon, bytes(24))
    assert data[:4] == b"IRB\x01"
    assert node_id.to_bytes(16, "big") not in data
    assert bytes([192, 0, 2, 77]) not in data
    assert (4321).to_bytes(2, "big") not in data[28:]


def test_a_beacon_of_the_maximum_size_fits_the_limit() -> None:
    beacon = Beacon(1, 2**64 - 1, 2**64 - 1, 1, tuple(f"fe80::{i}" for i in range(1, 9)))
    assert len(seal_beacon(beacon_cipher_key(KEY), beacon, bytes(24))) <= MAX_BEACON_SIZE


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"IRB\x01" + bytes(100), "unauthenticated"),
        (b"XYZ\x01" + bytes(100), "malformed"),
        (b"IRB\x02" + bytes(100), "malformed"),
        (b"IRB\x01" + bytes(MAX_BEACON_SIZE), "oversize"),
    ],
)
def test_garbage_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BeaconError) as caught:
        open_beacon(beacon_cipher_key(KEY), data)
    assert caught.value.reason == reason


def test_a_sealed_body_that_breaks_the_layout_is_malformed() -> None:
    """A member running a buggy or future encoder: authentic, yet refused."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

    key = beacon_cipher_key(KEY)
    good = bytes(16) + bytes(8) + bytes(8) + b"\x0f\xa0" + b"\x01" + b"\x04" + bytes(4)
    for body in (good + b"x", good[:-1], good.replace(b"\x01\x04", b"\x01\x05"), bytes(40)):
        data = b"IRB\x01" + bytes(24)
        data += crypto_aead_xchacha20poly1305_ietf_encrypt(body, b"IRB\x01", bytes(24), key)
        with pytest.raises(BeaconError) as caught:
            open_beacon(key, data)
        assert caught.value.reason == "malformed"


@given(st.binary(max_size=400))
def test_open_beacon_raises_only_beacon_error(data: bytes) -> None:
    with contextlib.suppress(BeaconError):
        open_beacon(beacon_cipher_key(KEY), data)


@given(
    node_id=st.integers(0, 2**128 - 1),
    incarnation=st.integers(0, 2**64 - 1),
    sequence=st.integers(0, 2**64 - 1),
    port=st.integers(1, 65535),
    addresses=st.lists(
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), min_size=1, max_size=8
    ),
    nonce=st.binary(min_size=24, max_size=24),
)
def test_any_beacon_round_trips(
    node_id: int,
    incarnation: int,
    sequence: int,
    port: int,
    addresses: list[object],
    nonce: bytes,
) -> None:
    key = beacon_cipher_key(KEY)
    beacon = Beacon(node_id, incarnation, sequence, port, tuple(str(a) for a in addresses))
    assert open_beacon(key, seal_beacon(key, beacon, nonce)) == beacon


def doc_block(title: str) -> bytes:
    match = re.search(
        rf"^{re.escape(title)}:\s*\n\s*```\s*\n(.*?)```", DOC.read_text(), re.S | re.M
    )
    assert match is not None, f"block {title!r} is missing from docs/discovery.md"
    return bytes.fromhex("".join(match.group(1).split()))


def test_vector_in_the_doc_matches_the_doc_and_the_library() -> None:
    """docs/discovery.md, a construction from primitives here, and the library agree."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

    beacon_key, nonce = bytes(range(32)), bytes(range(24))
    key = hashlib.blake2b(b"irisnode beacon v1", key=beacon_key, digest_size=32).digest()
    body = struct.pack(
        "!16sQQHB", bytes.fromhex("00112233445566778899aabbccddeeff"), 1_750_000_000_000, 1, 4000, 2
    )
    body += b"\x06" + bytes.fromhex("fe80" + "00" * 13 + "01") + b"\x04" + bytes([192, 0, 2, 1])
    header = b"IRB\x01"
    sealed = header + nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(body, header, nonce, key)
    assert doc_block("key") == key == beacon_cipher_key(beacon_key)
    assert doc_block("body (57 bytes)") == body
    beacon = Beacon(
        0x00112233445566778899AABBCCDDEEFF, 1_750_000_000_000, 1, 4000, ("fe80::1", "192.0.2.1")
    )
    assert doc_block("beacon (hex)") == sealed == seal_beacon(key, beacon, nonce)
    assert open_beacon(key, sealed) == beacon


# -- schedule -----------------------------------------------------------------------


def test_fast_announcements_then_slow_ones_with_bounded_jitter() -> None:
    core = make_core(1)
    sent_at = []
    now = T0
    while now < T0 + 120:
        deadline = core.next_deadline()
        assert deadline is not None
        now = deadline
        if beacons(core.on_timer(now)):
            sent_at.append(now - T0)
    assert sent_at[:4] == pytest.approx([0.0, 0.15, 0.4, 0.8])
    gaps = [b - a for a, b in itertools.pairwise(sent_at[4:])]
    assert 4.0 <= sent_at[4] - 0.8 <= 6.0
    assert gaps and all(4.0 <= gap <= 6.0 for gap in gaps)
    assert len({round(gap, 6) for gap in gaps}) > 1, "slow intervals must be jittered"


def test_without_jitter_the_slow_interval_is_exact() -> None:
    core = make_core(1, config=DiscoveryConfig(fast_schedule=(0.0,), jitter=0.0))
    core.on_timer(T0)
    assert core.next_deadline() == T0 + 5.0


def test_a_stalled_timer_skips_missed_fast_slots_instead_of_bursting() -> None:
    core = make_core(1)
    core.on_timer(T0)
    assert len(beacons(core.on_timer(T0 + 0.5))) == 1  # 0.15 and 0.4 are past: one beacon
    assert core.next_deadline() == pytest.approx(T0 + 0.8)


def test_each_interface_has_its_own_schedule() -> None:
    core = make_core(1)
    for offset in (0.0, 0.15, 0.4, 0.8):  # eth1's fast phase: its next beacon is after T0+4
        core.on_timer(T0 + offset)
    core.add_interface("eth2", ["192.0.2.9"], T0 + 3)
    events = beacons(core.on_timer(T0 + 3))
    assert [e.interface for e in events] == ["eth2"]
    assert core.next_deadline() == pytest.approx(T0 + 3.15)


def test_readding_an_interface_with_new_addresses_restarts_its_fast_schedule() -> None:
    core = make_core(1)
    for offset in (0.0, 0.15, 0.4, 0.8):
        core.on_timer(T0 + offset)
    core.add_interface("eth1", [LINK_LOCAL, "192.0.2.1"], T0 + 2)  # unchanged: no effect
    deadline = core.next_deadline()
    assert deadline is not None and deadline > T0 + 3
    core.add_interface("eth1", ["192.0.2.2"], T0 + 2)
    assert core.next_deadline() == T0 + 2


def test_a_removed_interface_gets_no_beacons_and_hears_nothing() -> None:
    a, b = make_core(1), make_core(2)
    payload = first_beacon(a)
    b.remove_interface("eth1")
    assert b.on_timer(T0) == []
    assert b.datagram_received(payload, "eth1", T0) == []
    assert b.next_deadline() is None


# -- hearing peers ------------------------------------------------------------------


def test_a_peer_is_seen_with_its_addresses_link_local_scoped_to_our_interface() -> None:
    a, b = make_core(1, port=4001), make_core(2, interface="wlan0")
    events = b.datagram_received(first_beacon(a), "wlan0", T0 + 0.01)
    assert seen(events) == [PeerSeen(1, "fe80::1%wlan0", 4001, "wlan0", True, ("192.0.2.1",))]
    assert b.peers == (1,)
    assert b.stats.accepted == 1


def test_a_peer_heard_again_is_not_reported_again() -> None:
    a, b = make_core(1), make_core(2)
    b.datagram_received(first_beacon(a), "eth1", T0)
    (again,) = beacons(a.on_timer(T0 + 0.15))
    assert seen(b.datagram_received(again.payload, "eth1", T0 + 0.15)) == []
    assert b.stats.accepted == 2


def test_a_peer_that_changes_address_is_reported_again() -> None:
    a, b = make_core(1), make_core(2)
    b.datagram_received(first_beacon(a), "eth1", T0)
    a.add_interface("eth1", ["192.0.2.50"], T0 + 1)
    events = b.datagram_received(first_beacon(a, T0 + 1), "eth1", T0 + 1)
    assert seen(events) == [PeerSeen(1, "192.0.2.50", 4000, "eth1", False)]


def test_a_peer_heard_on_a_second_interface_is_reported_for_it() -> None:
    a, b = make_core(1), make_core(2)
    b.add_interface("eth2", ["192.0.2.8"], T0)
    b.datagram_received(first_beacon(a), "eth1", T0)
    (again,) = beacons(a.on_timer(T0 + 0.15))
    events = seen(b.datagram_received(again.payload, "eth2", T0 + 0.15))
    assert [(e.node_id, e.interface, e.first_time) for e in events] == [(1, "eth2", False)]


def test_a_beacon_from_another_network_is_ignored() -> None:
    a, b = make_core(1, key=OTHER_KEY), make_core(2)
    assert b.datagram_received(first_beacon(a), "eth1", T0) == []
    assert b.stats.ignored_unauthenticated == 1
    assert b.peers == ()


@pytest.mark.parametrize("position", [0, 3, 4, 20, 40, -1])
def test_a_tampered_beacon_is_ignored(position: int) -> None:
    payload = bytearray(first_beacon(make_core(1)))
    payload[position] ^= 0x01
    b = make_core(2)
    assert b.datagram_received(bytes(payload), "eth1", T0) == []
    assert b.stats.ignored_unauthenticated + b.stats.ignored_malformed == 1
    assert b.peers == ()


def test_oversize_and_malformed_datagrams_are_counted_apart() -> None:
    b = make_core(2)
    b.datagram_received(bytes(1000), "eth1", T0)
    b.datagram_received(b"hello", "eth1", T0)
    assert (b.stats.ignored_oversize, b.stats.ignored_malformed) == (1, 1)


def test_own_beacons_are_ignored() -> None:
    a = make_core(1)
    assert a.datagram_received(first_beacon(a), "eth1", T0) == []
    assert a.stats.ignored_own == 1
    assert a.peers == ()


def test_a_replayed_beacon_is_ignored() -> None:
    """Also how the IPv4 copy of a beacon already heard over IPv6 is dropped."""
    a, b = make_core(1), make_core(2)
    payload = first_beacon(a)
    b.datagram_received(payload, "eth1", T0)
    assert b.datagram_received(payload, "eth1", T0 + 1) == []
    assert b.stats.ignored_stale == 1


def test_beacons_out_of_order_within_the_window_count_once_each() -> None:
    a, b = make_core(1, config=DiscoveryConfig(fast_schedule=(0.0,))), make_core(2)
    payloads = [first_beacon(a, T0 + 6 * i) for i in range(1, 6)]
    for payload in (payloads[4], payloads[1], payloads[3], payloads[1], payloads[0]):
        b.datagram_received(payload, "eth1", T0 + 40)
    assert (b.stats.accepted, b.stats.ignored_stale) == (4, 1)


def test_a_beacon_older_than_the_replay_window_is_ignored() -> None:
    a, b = make_core(1, config=DiscoveryConfig(fast_schedule=(0.0,))), make_core(2)
    old = first_beacon(a, T0)
    for _ in range(1, 70):
        (beacon,) = beacons(a.on_timer(a.next_deadline() or 0.0))
        newest = beacon.payload
    b.datagram_received(newest, "eth1", T0 + 500)
    assert b.datagram_received(old, "eth1", T0 + 500) == []
    assert b.stats.ignored_stale == 1


def test_a_restarted_peer_is_reported_and_its_old_beacons_are_stale() -> None:
    before, b = make_core(1, port=4000), make_core(2)
    old = first_beacon(before)
    b.datagram_received(old, "eth1", T0)
    after = make_core(1, port=4100, seed=99, start=T0 + 30)
    events = b.datagram_received(first_beacon(after, T0 + 30), "eth1", T0 + 30)
    assert seen(events) == [PeerSeen(1, "fe80::1%eth1", 4100, "eth1", False, ("192.0.2.1",))]
    assert beacons(events), "a restarted peer has lost its table: answer it promptly"
    (later,) = beacons(before.on_timer(T0 + 0.15))
    assert b.datagram_received(later.payload, "eth1", T0 + 31) == []
    assert b.stats.ignored_stale == 1


# -- prompt announcements -----------------------------------------------------------


def test_a_newcomer_gets_an_immediate_answer_then_answers_are_rate_limited() -> None:
    b = make_core(2)
    for offset in (0.0, 0.15, 0.4, 0.8):
        b.on_timer(T0 + offset)
    slow_due = b.next_deadline()
    assert slow_due is not None and slow_due > T0 + 4
    # First newcomer, at T0+1: answered at once, on the interface it was heard on.
    c = make_core(3)
    events = b.datagram_received(first_beacon(c), "eth1", T0 + 1)
    assert [type(e) for e in events] == [SendBeacon, PeerSeen], "the answer goes out first"
    assert [e.interface for e in beacons(events)] == ["eth1"]
    # Second newcomer 0.1 s later: the answer waits until the limit allows it.
    events = b.datagram_received(first_beacon(make_core(4)), "eth1", T0 + 1.1)
    assert beacons(events) == []
    assert b.next_deadline() == pytest.approx(T0 + 1.5)
    assert len(beacons(b.on_timer(T0 + 1.5))) == 1
    assert b.next_deadline() == slow_due
    # A known peer heard again triggers nothing.
    (again,) = beacons(c.on_timer(T0 + 0.15))
    assert seen(b.datagram_received(again.payload, "eth1", T0 + 2)) == []
    assert b.stats.accepted == 3
    assert b.stats.sent == 4 + 2


def test_a_scheduled_beacon_answers_a_pending_newcomer() -> None:
    b = make_core(2)
    b.datagram_received(first_beacon(make_core(3)), "eth1", T0)  # answered at once
    b.datagram_received(first_beacon(make_core(4)), "eth1", T0 + 0.1)  # pending until T0+0.5
    assert len(beacons(b.on_timer(T0 + 0.1))) == 1  # the fast beacon due at T0 (late)
    assert b.next_deadline() == pytest.approx(T0 + 0.15)
    assert len(beacons(b.on_timer(T0 + 0.15))) == 1
    assert b.next_deadline() == pytest.approx(T0 + 0.4), "the prompt was already answered"


# -- the table ----------------------------------------------------------------------


def test_a_silent_peer_is_forgotten_after_the_timeout() -> None:
    b = make_core(2, config=DiscoveryConfig(fast_schedule=(0.0,), peer_timeout=20.0))
    b.datagram_received(first_beacon(make_core(1)), "eth1", T0)
    now = T0
    forgotten: list[DiscoveryEvent] = []
    while not forgotten:
        now = b.next_deadline() or 0.0
        forgotten = [e for e in b.on_timer(now) if isinstance(e, PeerForgotten)]
    assert forgotten == [PeerForgotten(1)]
    assert now == pytest.approx(T0 + 20.0)
    assert b.peers == ()


def test_the_table_is_bounded_and_drops_the_least_recently_heard() -> None:
    b = make_core(9, config=DiscoveryConfig(max_peers=3))
    peers = {n: make_core(n) for n in (1, 2, 3, 4)}
    for n in (1, 2, 3):
        b.datagram_received(first_beacon(peers[n]), "eth1", T0 + n)
    (again,) = beacons(peers[1].on_timer(T0 + 0.15))
    b.datagram_received(again.payload, "eth1", T0 + 5)  # 1 is now the most recent
    events = b.datagram_received(first_beacon(peers[4]), "eth1", T0 + 6)
    assert PeerForgotten(2) in events
    assert b.peers == (3, 1, 4)
    assert b.stats.peers_evicted == 1


# -- seeds, configuration, misuse ---------------------------------------------------


def test_seeds_are_surfaced_at_start() -> None:
    config = DiscoveryConfig(seeds=(Seed("10.0.0.1", 4000), Seed("::1", 4001)))
    core = Discovery(KEY, 1, 4000, random.Random(1), random.Random(1).randbytes, config)
    assert core.start(T0) == [SeedCandidate("10.0.0.1", 4000), SeedCandidate("::1", 4001)]


@pytest.mark.parametrize(
    ("text", "seed"),
    [
        ("node1.lan:4000", Seed("node1.lan", 4000)),
        ("192.0.2.1:1", Seed("192.0.2.1", 1)),
        ("[fe80::1%eth0]:65535", Seed("fe80::1%eth0", 65535)),
    ],
)
def test_parse_seed(text: str, seed: Seed) -> None:
    assert parse_seed(text) == seed


@pytest.mark.parametrize("text", ["", "host", "host:", ":4000", "host:0", "h:65536", "::1:4000"])
def test_parse_seed_refuses_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match="--seed"):
        parse_seed(text)


@pytest.mark.parametrize(
    "config",
    [
        {"fast_schedule": ()},
        {"fast_schedule": (0.5, 0.1)},
        {"jitter": 1.0},
        {"slow_interval": 0.0},
        {"peer_timeout": 6.0},
        {"max_peers": 0},
    ],
)
def test_bad_configuration_is_refused(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DiscoveryConfig(**config)  # type: ignore[arg-type]


def test_misuse_is_refused() -> None:
    rng = random.Random(1)
    with pytest.raises(ValueError, match="32 bytes"):
        Discovery(b"short", 1, 4000, rng, rng.randbytes)
    with pytest.raises(ValueError):
        Discovery(KEY, 2**128, 4000, rng, rng.randbytes)
    with pytest.raises(ValueError):
        Discovery(KEY, 1, 0, rng, rng.randbytes)
    core = Discovery(KEY, 1, 4000, rng, rng.randbytes)
    with pytest.raises(RuntimeError):
        core.add_interface("eth0", ["192.0.2.1"], T0)
    core.start(T0)
    with pytest.raises(RuntimeError):
        core.start(T0)
    for addresses in ([], ["239.255.0.1"], ["::"], ["not-an-address"], ["10.0.0.1"] * 9):
        with pytest.raises(ValueError):
            core.add_interface("eth0", addresses, T0)


def test_a_scope_id_given_with_an_address_is_not_advertised() -> None:
    a, b = make_core(1, addresses=("fe80::1%eth7",)), make_core(2)
    (event,) = seen(b.datagram_received(first_beacon(a), "eth1", T0))
    assert event.address == "fe80::1%eth1"
