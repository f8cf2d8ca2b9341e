"""The sans-I/O client core: bytes in, events and bytes out (spec sections 4-10, 13)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import codec
from relay.client import core, errors
from relay.errors import LocalProtocolError


def hx(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


def sent(c: core.ClientCore) -> list[codec.ClientPacket]:
    """What the core wrote, parsed the way the node would."""
    decoder = codec.node_decoder()
    packets = decoder.feed(c.data_to_send())
    assert decoder.error is None and decoder.buffered == 0
    return packets


def opened(cluster: str = "", **options: float) -> core.ClientCore:
    c = core.ClientCore(cluster, **options)  # type: ignore[arg-type]
    c.data_to_send()
    c.receive_data(codec.Accepted().encode(), 0.0)
    assert c.take_events() == [core.Connected(codec.PROTOCOL_VERSION)]
    return c


def feed(c: core.ClientCore, *packets: codec.NodePacket, now: float = 0.0) -> list[core.Event]:
    c.receive_data(b"".join(p.encode() for p in packets), now)
    return c.take_events()


def open_tunnel(c: core.ClientCore, chunk_limit: int = 65536, credit: int = 0) -> int:
    tunnel_id = c.open_tunnel("echo", 1.0, 0.0)
    feed(c, codec.TunnelConfirmed(tunnel_id, chunk_limit))
    if credit:
        feed(c, codec.TunnelAllow(tunnel_id, credit))
    c.data_to_send()
    return tunnel_id


# ---- handshake (13.1) ---------------------------------------------------------------


def test_client_handshake_bytes_match_the_spec() -> None:
    c = core.ClientCore()
    assert c.data_to_send() == hx(
        "00 | 11 69 72 69 73 2d 63 6c 69 65 6e 74 2d 6d 61 67 69 63"
        " | 0b 76 31 2e 30 2d 64 72 61 66 74 32 | 00"
    )
    before = c.state
    assert before is core.State.AWAITING_ACCEPT
    c.receive_data(
        hx(
            "00 | 10 69 72 69 73 2d 72 65 6c 61 79 2d 6d 61 67 69 63"
            " | 0b 76 31 2e 30 2d 64 72 61 66 74 32"
        ),
        0.0,
    )
    assert c.take_events() == [core.Connected("v1.0-draft2")]
    assert c.state is core.State.OPEN


def test_service_handshake_names_its_cluster() -> None:
    c = core.ClientCore("echo")
    assert c.data_to_send().endswith(hx("0b 76 31 2e 30 2d 64 72 61 66 74 32 | 04 65 63 68 6f"))
    assert c.is_service


def test_accept_split_into_single_bytes_is_still_one_accept() -> None:
    c = core.ClientCore()
    for byte in codec.Accepted().encode():
        assert c.take_events() == []
        c.receive_data(bytes([byte]), 0.0)
    assert c.take_events() == [core.Connected("v1.0-draft2")]


def test_denial_from_the_spec_closes_with_its_reason() -> None:
    c = core.ClientCore()
    reason = "Unsupported protocol. Client: v1.0-draft1. Iris: v1.0-draft2."
    c.receive_data(hx("01 10") + b"iris-relay-magic" + hx("3d") + reason.encode(), 0.0)
    assert c.take_events() == [
        core.Denied(reason),
        core.ConnectionClosed(f"connection denied: {reason}", graceful=False),
    ]
    assert c.state is core.State.CLOSED


@pytest.mark.parametrize(
    "packet",
    [
        codec.Accepted(magic="iris-other-magic"),
        codec.Denied("no", magic="nope"),
        codec.Closed(""),
        codec.TimedOut(0),
    ],
)
def test_a_bad_handshake_answer_is_a_protocol_violation(packet: codec.NodePacket) -> None:
    c = core.ClientCore()
    [event] = feed(c, packet)
    assert isinstance(event, core.ConnectionClosed)
    assert event.violation and not event.graceful
    assert event.reason.startswith("protocol violation: ")


def test_operations_wait_for_the_handshake() -> None:
    c = core.ClientCore()
    with pytest.raises(LocalProtocolError):
        c.request("echo", b"x", 1.0, 0.0)


# ---- requests (13.2-13.5, section 8) -----------------------------------------------------


def test_request_bytes_match_the_spec() -> None:
    c = opened()
    assert c.request("echo", b"hi", 1.0, 0.0) == 0
    assert c.data_to_send() == hx("04 | 00 | 04 65 63 68 6f | 02 68 69 | e8 07")
    assert c.request("echo", b"hi", 1.0, 0.0) == 1  # ids count up from 0


@pytest.mark.parametrize(
    ("wire", "event"),
    [
        ("05 | 00 | 00 | 01 | 02 68 69", core.ReplyReceived(0, b"hi")),
        ("05 | 00 | 01", core.RequestTimedOut(0)),
        ("05 | 00 | 00 | 00 | 04 62 6f 6f 6d", core.FaultReceived(0, "boom")),
        ("05 | 00 | 00 | 01 | 00", core.ReplyReceived(0, b"")),  # empty reply is a success
    ],
)
def test_each_reply_kind_from_the_spec(wire: str, event: core.Event) -> None:
    c = opened()
    c.request("echo", b"hi", 1.0, 0.0)
    c.receive_data(hx(wire), 0.1)
    assert c.take_events() == [event]
    assert c.next_deadline() is None  # the safety timer is gone with the request


def test_exactly_one_outcome_and_late_replies_are_ignored() -> None:
    c = opened(reply_grace=0.5)
    c.request("echo", b"hi", 1.0, 10.0)
    assert c.next_deadline() == pytest.approx(11.5)
    c.on_timer(11.4)
    assert c.take_events() == []
    c.on_timer(11.5)
    assert c.take_events() == [core.RequestTimedOut(0)]
    # The node answers after all, and then again for an id it never had: both ignored (B7).
    assert feed(c, codec.Replied(0, b"late"), codec.Faulted(7, "x"), codec.TimedOut(0)) == []
    assert c.state is core.State.OPEN


@pytest.mark.parametrize(
    ("timeout", "ms"), [(0.001, 1), (0.0019, 1), (0.57, 570), (1.1, 1100), (2, 2000)]
)
def test_timeouts_are_whole_milliseconds_truncated(timeout: float, ms: int) -> None:
    c = opened()
    c.request("echo", b"x", timeout, 0.0)
    [packet] = sent(c)
    assert isinstance(packet, codec.Request)
    assert packet.timeout_ms == ms


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", b"x", 1.0), "empty cluster"),
        (("echo", b"", 1.0), "empty request"),
        (("echo", b"x", 0.0009), "at least 1 ms"),
        (("echo", b"x", -1.0), "at least 1 ms"),
        (("echo", b"x", float("nan")), "finite"),
    ],
)
def test_bad_request_arguments_are_refused_before_sending(
    args: tuple[str, bytes, float], message: str
) -> None:
    c = opened()
    with pytest.raises(ValueError, match=message):
        c.request(*args, 0.0)
    assert c.data_to_send() == b""


def test_wrongly_typed_payloads_are_refused() -> None:
    c = opened()
    with pytest.raises(TypeError):
        c.request("echo", "text", 1.0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c.broadcast(b"echo", b"x")  # type: ignore[arg-type]


# ---- serving requests -------------------------------------------------------------------


def test_a_service_receives_and_answers_requests_as_in_the_spec() -> None:
    c = opened("echo")
    c.receive_data(hx("04 | 05 | 02 68 69 | e8 07"), 0.0)
    assert c.take_events() == [core.RequestReceived(5, b"hi", 1000)]
    c.reply(5, b"hi")
    assert c.data_to_send() == hx("05 | 05 | 01 | 02 68 69")
    c.fault(5, "boom")
    assert c.data_to_send() == hx("05 | 05 | 00 | 04 62 6f 6f 6d")
    c.reply(6, b"")
    assert c.data_to_send() == hx("05 06 01 00")


def test_an_empty_fault_is_refused_because_the_node_would_turn_it_into_a_timeout() -> None:
    c = opened("echo")
    with pytest.raises(ValueError, match="empty fault"):
        c.fault(1, "")


@pytest.mark.parametrize(
    "packet",
    [
        codec.RequestDelivered(0, b"x", 10),
        codec.BroadcastDelivered(b"x"),
        codec.TunnelOffered(0),
    ],
)
def test_deliveries_to_a_plain_client_are_violations(packet: codec.NodePacket) -> None:
    c = opened()
    [event] = feed(c, packet)
    assert isinstance(event, core.ConnectionClosed) and event.violation


# ---- broadcast, topics (13.6, 13.7, B3) -----------------------------------------------------


def test_broadcast_bytes_and_delivery() -> None:
    c = opened("echo")
    c.broadcast("echo", b"hey")
    assert c.data_to_send() == hx("03 | 04 65 63 68 6f | 03 68 65 79")
    c.receive_data(hx("03 | 03 68 65 79"), 0.0)
    assert c.take_events() == [core.BroadcastReceived(b"hey")]
    with pytest.raises(ValueError, match="empty message"):
        c.broadcast("echo", b"")


def test_subscribe_publish_unsubscribe_bytes() -> None:
    c = opened()
    c.subscribe("news")
    assert c.data_to_send() == hx("06 04 6e 65 77 73")
    c.publish("news", b"hello")
    assert c.data_to_send() == hx("08 | 04 6e 65 77 73 | 05 68 65 6c 6c 6f")
    c.receive_data(hx("08 | 04 6e 65 77 73 | 05 68 65 6c 6c 6f"), 0.0)
    assert c.take_events() == [core.EventReceived("news", b"hello")]
    c.unsubscribe("news")
    assert c.data_to_send() == hx("07 04 6e 65 77 73")
    # An event that crossed our UNSUBSCRIBE is dropped quietly.
    assert feed(c, codec.Publish("news", b"late")) == []


def test_double_subscribe_and_unknown_unsubscribe_never_reach_the_wire() -> None:
    c = opened()
    c.subscribe("news")
    c.data_to_send()
    with pytest.raises(ValueError, match="already subscribed"):
        c.subscribe("news")
    with pytest.raises(ValueError, match="not subscribed"):
        c.unsubscribe("sport")  # the Go binding sent this and got dropped (B3)
    with pytest.raises(ValueError, match="empty topic"):
        c.publish("", b"x")
    assert c.data_to_send() == b""


# ---- outbound tunnels (13.8, 9.1) ------------------------------------------------------------


def test_outbound_tunnel_set_up_as_in_the_spec() -> None:
    c = opened()
    for _ in range(3):
        c.open_tunnel("other", 5.0, 0.0)
    c.data_to_send()
    assert c.open_tunnel("echo", 1.0, 0.0) == 3
    assert c.data_to_send() == hx("09 | 03 | 04 65 63 68 6f | e8 07")
    c.receive_data(hx("0a | 03 | 00 | 80 80 04"), 0.0)
    assert c.take_events() == [core.TunnelOpened(3, 65536)]
    assert c.data_to_send() == hx("0b | 03 | 80 80 80 20")  # our 64 MiB grant
    c.receive_data(hx("0b | 03 | 80 80 80 02"), 0.0)  # the node's 4 MiB
    assert c.take_events() == []


def test_failed_tunnel_set_up() -> None:
    c = opened()
    c.open_tunnel("echo", 1.0, 0.0)
    c.receive_data(hx("0a | 00 | 01"), 0.0)
    [event] = c.take_events()
    assert isinstance(event, core.TunnelOpenFailed) and event.timed_out
    assert c.next_deadline() is None


def test_tunnel_set_up_safety_timer_and_late_confirmation_is_released() -> None:
    c = opened(reply_grace=1.0)
    tunnel_id = c.open_tunnel("echo", 1.0, 0.0)
    c.data_to_send()
    c.on_timer(2.0)
    [event] = c.take_events()
    assert isinstance(event, core.TunnelOpenFailed)
    assert (event.tunnel_id, event.timed_out) == (tunnel_id, True)
    assert feed(c, codec.TunnelConfirmed(tunnel_id)) == []
    assert sent(c) == [codec.TunnelClose(tunnel_id)]  # do not leak the node's side
    assert feed(c, codec.TunnelClosed(tunnel_id, "")) == []  # its answer is ignored


def test_confirmations_for_ids_we_never_used_are_ignored() -> None:
    c = opened()
    assert feed(c, codec.TunnelConfirmed(9), codec.TunnelFailed(9)) == []
    assert c.data_to_send() == b""


# ---- inbound tunnels (13.8, 9.2) ---------------------------------------------------------------


def test_inbound_offer_is_confirmed_and_granted_at_once() -> None:
    c = opened("echo")
    for _ in range(2):
        c.open_tunnel("other", 5.0, 0.0)
    c.data_to_send()
    c.receive_data(hx("09 | 07 | 80 80 04"), 0.0)
    assert c.take_events() == [core.TunnelOffered(2, 65536)]
    assert c.data_to_send() == hx("0a | 07 | 02") + hx("0b | 02 | 80 80 80 20")
    c.receive_data(hx("0b | 02 | 80 80 80 02"), 0.0)
    c.receive_data(hx("0c | 02 | 03 | 03 61 62 63"), 0.0)
    assert c.take_events() == [core.TunnelData(2, b"abc")]
    c.tunnel_consumed(2, 3)
    assert c.data_to_send() == hx("0b 02 03")
    c.close_tunnel(2, 0.0)
    assert c.data_to_send() == hx("0d | 02")
    c.receive_data(hx("0d | 02 | 00"), 0.0)
    assert c.take_events() == [core.TunnelClosed(2, "")]


def test_an_offer_with_a_zero_chunk_limit_is_a_violation() -> None:
    c = opened("echo")
    [event] = feed(c, codec.TunnelOffered(0, 0))
    assert isinstance(event, core.ConnectionClosed) and event.violation


# ---- chunking and credit (9.3, 9.4) ---------------------------------------------------------------


def test_a_100000_byte_message_goes_out_in_two_chunks_as_in_the_spec() -> None:
    c = opened()
    for _ in range(3):
        c.open_tunnel("other", 5.0, 0.0)
    tunnel_id = open_tunnel(c, credit=4 * 1024 * 1024)
    assert tunnel_id == 3
    message = bytes(range(256)) * 390 + bytes(160)
    assert len(message) == 100000
    send_id = c.tunnel_send(tunnel_id, message, 0.0)
    assert c.data_to_send() == (
        hx("0c | 03 | a0 8d 06 | 80 80 04")
        + message[:65536]
        + hx("0c | 03 | 00 | a0 8d 02")
        + message[65536:]
    )
    assert c.take_events() == [core.TunnelSent(3, send_id)]


def test_each_chunk_waits_until_its_whole_size_is_covered() -> None:
    c = opened()
    tunnel_id = open_tunnel(c, chunk_limit=4, credit=3)
    send_id = c.tunnel_send(tunnel_id, b"abcdef", 0.0)
    assert c.data_to_send() == b""  # 3 < 4
    feed(c, codec.TunnelAllow(tunnel_id, 1))
    assert sent(c) == [codec.TunnelTransfer(tunnel_id, 6, b"abcd")]
    assert c.take_events() == []
    assert feed(c, codec.TunnelAllow(tunnel_id, 1)) == []
    assert c.data_to_send() == b""  # 1 < 2
    assert feed(c, codec.TunnelAllow(tunnel_id, 1)) == [core.TunnelSent(tunnel_id, send_id)]
    assert sent(c) == [codec.TunnelTransfer(tunnel_id, 0, b"ef")]


def test_messages_leave_whole_and_in_order() -> None:
    c = opened()
    tunnel_id = open_tunnel(c, chunk_limit=2)
    first = c.tunnel_send(tunnel_id, b"aaaa", 0.0)
    second = c.tunnel_send(tunnel_id, b"bb", 0.0)
    events = feed(c, codec.TunnelAllow(tunnel_id, 100))
    assert events == [core.TunnelSent(tunnel_id, first), core.TunnelSent(tunnel_id, second)]
    assert sent(c) == [
        codec.TunnelTransfer(tunnel_id, 4, b"aa"),
        codec.TunnelTransfer(tunnel_id, 0, b"aa"),
        codec.TunnelTransfer(tunnel_id, 2, b"bb"),
    ]


def test_a_send_that_times_out_half_sent_lets_the_next_message_start_fresh() -> None:
    c = opened()
    tunnel_id = open_tunnel(c, chunk_limit=4, credit=4)
    stuck = c.tunnel_send(tunnel_id, b"abcdefgh", 0.0, timeout=1.0)
    assert sent(c) == [codec.TunnelTransfer(tunnel_id, 8, b"abcd")]
    later = c.tunnel_send(tunnel_id, b"xy", 0.5)
    assert c.next_deadline() == 1.0
    c.on_timer(1.0)
    assert c.take_events() == [core.TunnelSendFailed(tunnel_id, stuck, True)]
    feed(c, codec.TunnelAllow(tunnel_id, 2))
    assert sent(c) == [codec.TunnelTransfer(tunnel_id, 2, b"xy")]
    assert c.take_events() == []
    assert c.next_deadline() is None
    del later


def test_send_arguments() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    with pytest.raises(ValueError, match="empty message"):
        c.tunnel_send(tunnel_id, b"", 0.0)
    with pytest.raises(ValueError, match="positive"):
        c.tunnel_send(tunnel_id, b"x", 0.0, timeout=0)
    with pytest.raises(errors.ConnectionClosed):
        c.tunnel_send(99, b"x", 0.0)


# ---- reassembly (9.3) ----------------------------------------------------------------------------------


def test_reassembly_across_chunks() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    assert feed(c, codec.TunnelTransfer(tunnel_id, 5, b"ab")) == []
    assert feed(c, codec.TunnelTransfer(tunnel_id, 0, b"cd")) == []
    assert feed(c, codec.TunnelTransfer(tunnel_id, 0, b"e")) == [
        core.TunnelData(tunnel_id, b"abcde")
    ]
    assert c.data_to_send() == b""  # the grant waits for the application


def test_a_new_first_chunk_discards_the_partial_message_and_grants_it_back() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    feed(c, codec.TunnelTransfer(tunnel_id, 10, b"abcd"))
    assert feed(c, codec.TunnelTransfer(tunnel_id, 3, b"xyz")) == [
        core.TunnelData(tunnel_id, b"xyz")
    ]
    assert sent(c) == [codec.TunnelAllow(tunnel_id, 4)]


def test_an_orphan_continuation_is_dropped_and_granted_back() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    assert feed(c, codec.TunnelTransfer(tunnel_id, 0, b"zz")) == []
    assert sent(c) == [codec.TunnelAllow(tunnel_id, 2)]


def test_a_chunk_overrunning_its_message_is_a_violation() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    closed, ended = feed(c, codec.TunnelTransfer(tunnel_id, 2, b"abc"))
    assert isinstance(closed, core.TunnelClosed)
    assert closed.reason.startswith("connection dropped: protocol violation")
    assert isinstance(ended, core.ConnectionClosed) and ended.violation


def test_traffic_for_unknown_tunnels_is_ignored() -> None:
    c = opened()
    events = feed(
        c,
        codec.TunnelTransfer(5, 1, b"a"),
        codec.TunnelAllow(5, 10),
        codec.TunnelClosed(5, "gone"),
    )
    assert events == []
    assert c.data_to_send() == b""
    assert c.state is core.State.OPEN


@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=8),
    limit=st.integers(1, 64),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_what_one_core_sends_another_reassembles(
    sizes: list[int], limit: int, cuts: list[int]
) -> None:
    sender = opened()
    sender_tunnel = open_tunnel(sender, chunk_limit=limit, credit=10_000)
    receiver = opened("echo")
    feed(receiver, codec.TunnelOffered(0, limit))
    receiver.data_to_send()
    messages = [bytes([i % 256]) * size for i, size in enumerate(sizes)]
    for message in messages:
        sender.tunnel_send(sender_tunnel, message, 0.0)
    # The node does not re-chunk: forward every TUN_TRANSFER as is, cut at random places.
    wire = b"".join(
        codec.TunnelTransfer(0, p.size_or_cont, p.chunk).encode()
        for p in sent(sender)
        if isinstance(p, codec.TunnelTransfer)
    )
    received: list[core.Event] = []
    start = 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        receiver.receive_data(wire[start:cut], 0.0)
        received += receiver.take_events()
        start = cut
    assert received == [core.TunnelData(0, m) for m in messages]


# ---- tunnel close (9.5) ---------------------------------------------------------------------------------


def test_closing_a_tunnel_fails_its_queued_sends_and_waits_for_the_ack() -> None:
    c = opened(close_grace=3.0)
    tunnel_id = open_tunnel(c)
    send_id = c.tunnel_send(tunnel_id, b"no credit", 0.0)
    c.close_tunnel(tunnel_id, 1.0)
    assert c.take_events() == [core.TunnelSendFailed(tunnel_id, send_id, False)]
    assert sent(c) == [codec.TunnelClose(tunnel_id)]
    assert feed(c, codec.TunnelTransfer(tunnel_id, 1, b"x")) == []  # no longer read
    c.close_tunnel(tunnel_id, 1.0)  # twice is harmless
    assert c.data_to_send() == b""
    assert c.next_deadline() == 4.0
    c.on_timer(4.0)  # the node never answered (B8): give up on the acknowledgement
    assert c.take_events() == [core.TunnelClosed(tunnel_id, "")]


def test_a_remote_failure_closes_the_tunnel_with_its_reason() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    assert feed(c, codec.TunnelClosed(tunnel_id, "decryption failed")) == [
        core.TunnelClosed(tunnel_id, "decryption failed")
    ]
    with pytest.raises(errors.ConnectionClosed):
        c.tunnel_send(tunnel_id, b"x", 0.0)


# ---- connection close (10, 13.9) ----------------------------------------------------------------------


def test_graceful_close_as_in_the_spec_closes_tunnels_without_a_failure() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    c.request("echo", b"x", 1.0, 0.0)
    c.data_to_send()
    c.close(0.0)
    assert c.data_to_send() == hx("02")
    assert c.state is core.State.CLOSING
    with pytest.raises(errors.ConnectionClosed):
        c.request("echo", b"x", 1.0, 0.0)
    c.receive_data(hx("02 | 00"), 0.0)
    assert c.take_events() == [
        core.RequestAborted(0, ""),
        core.TunnelClosed(tunnel_id, ""),  # not "connection dropped" (B11)
        core.ConnectionClosed("", graceful=True),
    ]
    assert c.closed
    assert c.next_deadline() is None
    c.receive_data(b"\xff garbage after close is not read", 0.0)
    assert c.take_events() == []


def test_replies_still_go_out_while_closing() -> None:
    c = opened("echo")
    feed(c, codec.RequestDelivered(3, b"q", 100))
    c.close(0.0)
    c.data_to_send()
    c.reply(3, b"a")
    assert sent(c) == [codec.Reply(3, b"a")]


def test_an_unacknowledged_close_gives_up_after_the_grace_period() -> None:
    c = opened(close_grace=2.0)
    c.close(5.0)
    assert c.next_deadline() == 7.0
    c.on_timer(7.0)
    [event] = c.take_events()
    assert isinstance(event, core.ConnectionClosed) and not event.graceful


def test_an_offer_arriving_while_closing_is_confirmed_and_closed_at_once() -> None:
    c = opened("echo")
    c.close(0.0)
    c.data_to_send()
    assert feed(c, codec.TunnelOffered(4)) == []
    assert sent(c) == [codec.TunnelConfirm(4, 0), codec.TunnelClose(0)]


def test_a_dropped_connection_settles_everything_with_the_reason() -> None:
    c = opened()
    tunnel_id = open_tunnel(c)
    opening = c.open_tunnel("echo", 1.0, 0.0)
    c.request("echo", b"x", 1.0, 0.0)
    c.connection_lost("connection reset")
    lost = "connection dropped: connection reset"
    assert c.take_events() == [
        core.RequestAborted(0, lost),
        core.TunnelClosed(tunnel_id, lost),
        core.TunnelOpenFailed(opening, False, lost),
        core.ConnectionClosed("connection reset", graceful=False),
    ]
    c.connection_lost("again")
    assert c.take_events() == []


def test_node_close_with_a_reason_is_a_drop() -> None:
    c = opened()
    assert feed(c, codec.Closed("node shutting down")) == [
        core.ConnectionClosed("node shutting down", graceful=False)
    ]


def test_good_packets_before_garbage_are_handled_then_the_connection_dropped() -> None:
    c = opened()
    c.request("echo", b"x", 1.0, 0.0)
    c.receive_data(codec.Replied(0, b"ok").encode() + b"\x0e", 0.0)
    events = c.take_events()
    assert events[0] == core.ReplyReceived(0, b"ok")
    assert isinstance(events[1], core.ConnectionClosed)
    assert events[1].violation and "unknown opcode 0x0e" in events[1].reason


def test_close_before_the_handshake_ends_at_once() -> None:
    c = core.ClientCore()
    c.close(0.0)
    assert c.take_events() == [
        core.ConnectionClosed("closed before the handshake completed", graceful=True)
    ]


def test_many_timers_fire_in_deadline_order() -> None:
    c = opened(reply_grace=0.0)
    for timeout in (3.0, 1.0, 2.0):
        c.request("echo", b"x", timeout, 0.0)
    feed(c, codec.TimedOut(2))  # its timer must not fire any more
    c.on_timer(10.0)
    assert c.take_events() == [core.RequestTimedOut(1), core.RequestTimedOut(0)]


def test_a_silent_node_fails_the_handshake_after_the_timeout() -> None:
    c = core.ClientCore(handshake_timeout=3.0)
    c.connection_made(10.0)
    assert c.next_deadline() == 13.0
    c.on_timer(13.0)
    [event] = c.take_events()
    assert event == core.ConnectionClosed("the node did not answer the handshake in time", False)


def test_the_handshake_timer_stops_at_the_acceptance() -> None:
    c = core.ClientCore()
    c.connection_made(0.0)
    c.receive_data(codec.Accepted().encode(), 1.0)
    assert c.next_deadline() is None


def test_what_the_node_would_drop_the_connection_for_is_refused_locally() -> None:
    c = opened("echo", max_payload=10)
    with pytest.raises(ValueError, match="exceeds"):
        c.request("x" * (codec.DEFAULT_MAX_NAME + 1), b"x", 1.0, 0.0)
    with pytest.raises(ValueError, match="exceeds the limit of 10"):
        c.publish("news", bytes(11))
    with pytest.raises(ValueError, match="reply of 11 bytes"):
        c.reply(0, bytes(11))
    tunnel_id = open_tunnel(c, credit=100)
    c.tunnel_send(tunnel_id, bytes(50), 0.0)  # tunnel messages are chunked: no such limit
    assert len(sent(c)) == 1
