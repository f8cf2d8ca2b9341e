"""The pure link core back to back: handshake, frames, and every failure reason."""

from __future__ import annotations

import itertools
import os
import random
import struct
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.identity import Credentials, NetworkKey, NodeIdentity
from overlay.link import (
    FRAME_OVERHEAD,
    Effect,
    Established,
    Failed,
    LinkCore,
    LinkStateError,
    Reason,
    Received,
    Role,
    Transmit,
)
from overlay.link_frames import DEFAULT_MAX_FRAME, LinkLimits
from overlay.link_policy import Backoff, HandshakeLimiter, keep_new_link

NET = NetworkKey("home", bytes(range(32)))
OTHER_NET = NetworkKey("home", bytes(range(1, 33)))
ALICE = NodeIdentity.from_seed(bytes([1]) * 32)
BOB = NodeIdentity.from_seed(bytes([2]) * 32)
ALICE_CREDS = Credentials.for_network(NET, ALICE)
BOB_CREDS = Credentials.for_network(NET, BOB)


def cores(
    initiator: Credentials = ALICE_CREDS,
    responder: Credentials = BOB_CREDS,
    **kwargs: object,
) -> tuple[LinkCore, LinkCore]:
    expected = kwargs.pop("expected_peer", None)
    i = LinkCore(Role.INITIATOR, initiator, os.urandom, 0.0, expected_peer=expected, **kwargs)  # type: ignore[arg-type]
    r = LinkCore(Role.RESPONDER, responder, os.urandom, 0.0, **kwargs)  # type: ignore[arg-type]
    return i, r


def wire(effects: list[Effect]) -> bytes:
    return b"".join(e.data for e in effects if isinstance(e, Transmit))


def messages(i: LinkCore, r: LinkCore) -> tuple[bytes, bytes]:
    """msg1 and msg2 records, as the cores produced them."""
    msg1 = wire(i.start())
    msg2 = wire(r.receive(msg1, 0.0))
    return msg1, msg2


def connect(i: LinkCore, r: LinkCore) -> None:
    _msg1, msg2 = messages(i, r)
    out_i = i.receive(msg2, 0.0)
    assert isinstance(out_i[-1], Established)
    out_r = r.receive(wire(out_i), 0.0)
    assert isinstance(out_r[-1], Established)


def failure(effects: list[Effect]) -> Reason:
    assert effects, "expected a failure, got nothing"
    last = effects[-1]
    assert isinstance(last, Failed), effects
    return last.reason


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# -- success


def test_handshake_establishes_both_ends_with_the_right_peers() -> None:
    i, r = cores()
    msg1, msg2 = messages(i, r)
    assert len(msg1) == 4 + 41 and len(msg2) == 4 + 276
    assert not r.established
    out_i = i.receive(msg2, 0.0)
    assert [type(e) for e in out_i] == [Transmit, Established]
    up_i = out_i[1]
    assert isinstance(up_i, Established)
    assert up_i.peer_node_id == BOB.node_id and up_i.peer_public_key == BOB.public
    assert up_i.certificate == BOB_CREDS.certificate
    (up_r,) = r.receive(wire(out_i), 0.0)
    assert isinstance(up_r, Established) and up_r.peer_node_id == ALICE.node_id
    assert (i.established, r.established) == (True, True)
    assert i.next_deadline() is None and r.next_deadline() is None


def test_frames_flow_both_ways_in_order() -> None:
    i, r = cores()
    connect(i, r)
    data = [b"one", b"", b"three" * 1000]
    assert r.receive(b"".join(i.send(d) for d in data), 0.0) == [Received(d) for d in data]
    assert i.receive(r.send(b"back"), 0.0) == [Received(b"back")]


def test_initiator_may_pipeline_frames_behind_msg3() -> None:
    i, r = cores()
    _, msg2 = messages(i, r)
    msg3 = wire(i.receive(msg2, 0.0))
    out = r.receive(msg3 + i.send(b"early") + i.send(b"bird"), 0.0)
    assert [type(e) for e in out] == [Established, Received, Received]
    assert [e.data for e in out if isinstance(e, Received)] == [b"early", b"bird"]


def test_ciphertext_does_not_contain_the_plaintext() -> None:
    i, r = cores()
    connect(i, r)
    secret = b"attack at dawn, bring snacks"
    assert secret not in i.send(secret)
    assert len(i.send(secret)) == 1 + len(secret) + FRAME_OVERHEAD  # kind byte: whole, control


def test_keys_differ_per_direction_and_per_link() -> None:
    i1, r1 = cores()
    connect(i1, r1)
    i2, r2 = cores()
    connect(i2, r2)
    same = b"same plaintext"
    assert len({i1.send(same), r1.send(same), i2.send(same), r2.send(same)}) == 4


# -- handshake failures


def test_wrong_network_seen_by_the_initiator() -> None:
    stranger = Credentials.for_network(OTHER_NET, BOB)
    i, r = cores(responder=stranger)
    _, msg2 = messages(i, r)
    assert failure(i.receive(msg2, 0.0)) is Reason.WRONG_NETWORK


def test_wrong_network_seen_by_the_responder() -> None:
    # The initiator expects our network but its certificate is from another one.
    intruder = Credentials(ALICE, OTHER_NET.issue(ALICE.public), NET.public)
    i, r = cores(initiator=intruder)
    _, msg2 = messages(i, r)
    out = i.receive(msg2, 0.0)
    assert isinstance(out[-1], Established)
    assert failure(r.receive(wire(out), 0.0)) is Reason.WRONG_NETWORK


def test_bad_certificate_signature() -> None:
    forged = replace(BOB_CREDS.certificate, signature=bytes(64))
    i, r = cores(responder=Credentials(BOB, forged, NET.public))
    _, msg2 = messages(i, r)
    assert failure(i.receive(msg2, 0.0)) is Reason.BAD_CERTIFICATE


def test_expired_certificate() -> None:
    expired = Credentials(BOB, NET.issue(BOB.public, not_after=1), NET.public)
    i, r = cores(responder=expired)
    msg1 = wire(i.start())
    msg2 = wire(r.receive(msg1, 0.0))
    assert failure(i.receive(msg2, 5.0)) is Reason.EXPIRED_CERTIFICATE


def test_bad_transcript_signature() -> None:
    # Bob presents a valid certificate for Bob but signs with another key.
    impostor = Credentials(BOB, BOB_CREDS.certificate, NET.public)
    object.__setattr__(impostor, "identity", NodeIdentity.from_seed(bytes([9]) * 32))
    i, r = cores(responder=impostor)
    _, msg2 = messages(i, r)
    assert failure(i.receive(msg2, 0.0)) is Reason.BAD_SIGNATURE


def test_stolen_certificate_without_the_key_is_a_bad_signature_at_the_responder() -> None:
    thief = Credentials(ALICE, ALICE_CREDS.certificate, NET.public)
    object.__setattr__(thief, "identity", NodeIdentity.from_seed(bytes([8]) * 32))
    i, r = cores(initiator=thief)
    _, msg2 = messages(i, r)
    out = i.receive(msg2, 0.0)
    assert failure(r.receive(wire(out), 0.0)) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("index", [4, 4 + 31, 4 + 40, 4 + 275])
def test_tampered_msg2(index: int) -> None:
    i, r = cores()
    _, msg2 = messages(i, r)
    assert failure(i.receive(flip(msg2, index), 0.0)) is Reason.TAMPERED_HANDSHAKE


@pytest.mark.parametrize("index", [4, 100, 4 + 243])
def test_tampered_msg3(index: int) -> None:
    i, r = cores()
    _, msg2 = messages(i, r)
    msg3 = wire(i.receive(msg2, 0.0))
    assert failure(r.receive(flip(msg3, index), 0.0)) is Reason.TAMPERED_HANDSHAKE


def test_tampered_msg1_breaks_the_keys() -> None:
    i, r = cores()
    msg1 = flip(wire(i.start()), 4 + 20)
    msg2 = wire(r.receive(msg1, 0.0))
    assert failure(i.receive(msg2, 0.0)) is Reason.TAMPERED_HANDSHAKE


@pytest.mark.parametrize(
    ("msg1", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", Reason.OVERSIZE_HANDSHAKE),
        (struct.pack(">I", 41) + b"notalink" + bytes(33), Reason.BAD_MAGIC),
        (struct.pack(">I", 41) + b"irislink\x01" + bytes(32), Reason.UNSUPPORTED_VERSION),
        (struct.pack(">I", 41) + b"irislink\x03" + bytes(32), Reason.UNSUPPORTED_VERSION),
        (struct.pack(">I", 40) + b"irislink\x02" + bytes(31), Reason.MALFORMED_HANDSHAKE),
        (struct.pack(">I", 0), Reason.BAD_MAGIC),
        (struct.pack(">I", 41) + b"irislink\x02" + bytes(32), Reason.BAD_EPHEMERAL_KEY),
    ],
)
def test_bad_msg1(msg1: bytes, reason: Reason) -> None:
    _, r = cores()
    out = r.receive(msg1, 0.0)
    assert failure(out) is reason
    assert not any(isinstance(e, Transmit) for e in out), "never explain a failure to the peer"


def test_oversize_handshake_record_is_refused_from_its_prefix() -> None:
    _, r = cores()
    assert failure(r.receive(struct.pack(">I", 1025), 0.0)) is Reason.OVERSIZE_HANDSHAKE
    _, r = cores()
    assert r.receive(struct.pack(">I", 1024), 0.0) == []


def test_low_order_responder_key() -> None:
    i, _ = cores()
    i.start()
    assert failure(i.receive(struct.pack(">I", 48) + bytes(48), 0.0)) is Reason.BAD_EPHEMERAL_KEY


@pytest.mark.parametrize("size", [0, 47])
def test_short_msg2(size: int) -> None:
    i, _ = cores()
    i.start()
    assert failure(i.receive(struct.pack(">I", size) + bytes(size), 0.0)) in {
        Reason.MALFORMED_HANDSHAKE
    }


def test_short_msg3() -> None:
    i, r = cores()
    messages(i, r)
    assert failure(r.receive(struct.pack(">I", 15) + bytes(15), 0.0)) is Reason.MALFORMED_HANDSHAKE


def test_self_link() -> None:
    i, r = cores(initiator=ALICE_CREDS, responder=ALICE_CREDS)
    _, msg2 = messages(i, r)
    assert failure(i.receive(msg2, 0.0)) is Reason.SELF_LINK


def test_unexpected_peer() -> None:
    i, r = cores(expected_peer=ALICE.node_id)
    _, msg2 = messages(i, r)
    assert failure(i.receive(msg2, 0.0)) is Reason.UNEXPECTED_PEER
    i, r = cores(expected_peer=BOB.node_id)
    connect(i, r)


def test_handshake_deadline() -> None:
    i = LinkCore(Role.INITIATOR, ALICE_CREDS, os.urandom, 100.0, handshake_timeout=5.0)
    assert i.next_deadline() == 105.0
    assert i.on_timer(104.9) == []
    assert failure(i.on_timer(105.0)) is Reason.HANDSHAKE_TIMEOUT
    assert i.next_deadline() is None
    assert i.receive(b"anything", 106.0) == []


def test_established_links_have_no_deadline() -> None:
    i, r = cores()
    connect(i, r)
    assert i.on_timer(1e9) == [] and r.on_timer(1e9) == []


def test_sending_before_the_handshake_is_our_bug() -> None:
    i, _ = cores()
    with pytest.raises(LinkStateError):
        i.send(b"too early")


# -- frame failures


def established() -> tuple[LinkCore, LinkCore]:
    i, r = cores()
    connect(i, r)
    return i, r


def test_tampered_frame() -> None:
    i, r = established()
    frame = i.send(b"payload")
    for index in (4 + 8, len(frame) - 1):  # ciphertext, tag
        i2, r2 = established()
        f = i2.send(b"payload")
        assert failure(r2.receive(flip(f, index), 0.0)) is Reason.TAMPERED_FRAME
    assert r.receive(frame, 0.0) == [Received(b"payload")]


def test_replayed_frame() -> None:
    i, r = established()
    frame = i.send(b"pay me once")
    assert r.receive(frame, 0.0) == [Received(b"pay me once")]
    assert failure(r.receive(frame, 0.0)) is Reason.REPLAYED_FRAME


def test_reordered_frames() -> None:
    i, r = established()
    first, second = i.send(b"first"), i.send(b"second")
    assert failure(r.receive(second + first, 0.0)) is Reason.REORDERED_FRAME


def test_rewritten_sequence_number_fails_authentication() -> None:
    i, r = established()
    i.send(b"zero")
    frame = bytearray(i.send(b"one"))
    frame[4:12] = (0).to_bytes(8, "big")  # claim to be the expected frame
    assert failure(r.receive(bytes(frame), 0.0)) is Reason.TAMPERED_FRAME


def test_frame_from_the_other_direction_fails() -> None:
    i, _r = established()
    reflected = i.send(b"mirror")
    assert failure(i.receive(reflected, 0.0)) is Reason.TAMPERED_FRAME


def test_oversize_frame_is_refused_from_its_prefix() -> None:
    small = LinkLimits(max_frame_size=1000, fragment_size=995, max_message_size=5000)
    i, r = cores(limits=small)
    connect(i, r)
    out = r.receive(struct.pack(">I", 8 + 1000 + 16 + 1), 0.0)
    assert failure(out) is Reason.OVERSIZE_FRAME
    i, r = cores(limits=small)
    connect(i, r)
    whole = i.send(bytes(995))
    assert len(whole) == 4 + 8 + 1 + 995 + 16, "one frame: kind byte and the message"
    assert r.receive(whole, 0.0) == [Received(bytes(995))]
    two = i.send(bytes(996))
    assert len(two) == (4 + 8 + 5 + 995 + 16) + (4 + 8 + 1 + 1 + 16), "a full first fragment"
    assert r.receive(two, 0.0) == [Received(bytes(996))]


def test_default_limits() -> None:
    i, r = established()
    assert i.limits.max_frame_size == DEFAULT_MAX_FRAME == 1 << 20
    assert i.limits.max_message_size == 16 * 1024 * 1024 + 4096
    big = os.urandom(i.limits.max_message_size)
    assert r.receive(i.send(big, bulk=True), 0.0) == [Received(big)]
    with pytest.raises(LinkStateError):
        i.queue(bytes(i.limits.max_message_size + 1))


def test_short_frame_record() -> None:
    _, r = established()
    assert failure(r.receive(struct.pack(">I", 23) + bytes(23), 0.0)) is Reason.MALFORMED_FRAME


def test_frames_before_the_failure_are_delivered_and_nothing_after() -> None:
    i, r = established()
    good = i.send(b"good")
    bad = flip(i.send(b"bad"), 20)
    later = i.send(b"later")
    out = r.receive(good + bad + later, 0.0)
    assert out[0] == Received(b"good")
    assert failure(out) is Reason.TAMPERED_FRAME and len(out) == 2
    assert r.receive(later, 0.0) == []
    assert r.failed and r.failure is not None and r.failure.reason is Reason.TAMPERED_FRAME


@given(
    frames=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
)
def test_any_split_of_the_stream_gives_the_same_frames(
    frames: list[bytes], cuts: list[int]
) -> None:
    i, r = established()
    stream = b"".join(i.send(f) for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    received: list[bytes] = []
    last = 0
    for point in [*points, len(stream)]:
        for effect in r.receive(stream[last:point], 0.0):
            assert isinstance(effect, Received)
            received.append(effect.data)
        last = point
    assert received == frames


@given(st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=30))
def test_handshake_survives_any_split(chunks: list[int]) -> None:
    i, r = cores()
    _msg1, msg2 = messages(i, r)
    out: list[Effect] = []
    pos = 0
    sizes = itertools.cycle(chunks)
    while pos < len(msg2):
        step = next(sizes)
        out += i.receive(msg2[pos : pos + step], 0.0)
        pos += step
    assert isinstance(out[-1], Established)


# -- policy


def test_duplicate_rule_both_ends_keep_the_link_initiated_by_the_lower_id() -> None:
    low, high = 5, 9
    # At the low node: existing link it dialed, new inbound link from high.
    assert not keep_new_link(
        low, high, existing_initiated_locally=True, new_initiated_locally=False
    )
    assert keep_new_link(low, high, existing_initiated_locally=False, new_initiated_locally=True)
    # At the high node the same link (initiated by low, so inbound for high) survives.
    assert keep_new_link(high, low, existing_initiated_locally=True, new_initiated_locally=False)
    assert not keep_new_link(
        high, low, existing_initiated_locally=False, new_initiated_locally=True
    )
    # Same direction: the newer one (a re-dial) wins.
    assert keep_new_link(low, high, existing_initiated_locally=True, new_initiated_locally=True)


@given(
    st.integers(min_value=0, max_value=2**128 - 1),
    st.integers(min_value=0, max_value=2**128 - 1),
    st.booleans(),
)
def test_duplicate_rule_is_symmetric(a: int, b: int, a_link_first: bool) -> None:
    """Whatever order each end sees the two links in, both keep the same one."""
    if a == b:
        return

    # Link X is initiated by a, link Y by b. Each end sees them in some order.
    def survivor(local: int, peer: int, first_is_x: bool) -> str:
        first, second = ("X", "Y") if first_is_x else ("Y", "X")
        initiated = {"X": local == a, "Y": local == b}
        keep = keep_new_link(
            local,
            peer,
            existing_initiated_locally=initiated[first],
            new_initiated_locally=initiated[second],
        )
        return second if keep else first

    assert survivor(a, b, a_link_first) == survivor(b, a, not a_link_first)
    assert survivor(a, b, a_link_first) == ("X" if a < b else "Y")


def test_backoff_grows_with_jitter_caps_and_resets() -> None:
    backoff = Backoff(random.Random(1), initial=0.5, cap=8.0)
    delays = [backoff.next_delay() for _ in range(10)]
    bases = [0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8]
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.5 <= delay <= base
    assert len(set(delays)) == len(delays), "jitter makes every delay different"
    backoff.reset()
    assert 0.25 <= backoff.next_delay() <= 0.5
    again = Backoff(random.Random(1), initial=0.5, cap=8.0)
    assert [again.next_delay() for _ in range(10)] == delays, "reproducible from the seed"
    with pytest.raises(ValueError):
        Backoff(random.Random(), initial=2, cap=1)


def test_handshake_limiter_refills_per_source_and_bounds_its_memory() -> None:
    limiter = HandshakeLimiter(rate=2.0, burst=3, max_sources=4)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0), "sources do not share a bucket"
    assert not limiter.allow("a", 0.4) and limiter.allow("a", 0.5), "two tokens a second"
    assert [limiter.allow("a", 100.0) for _ in range(4)] == [True, True, True, False], "capped"
    for n in range(50):
        limiter.allow(f"s{n}", 200.0 + n)
    assert len(limiter._buckets) <= 4
    with pytest.raises(ValueError):
        HandshakeLimiter(rate=0, burst=1)
