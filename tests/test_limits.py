"""What the node holds for applications stays bounded: the limits at the pure layer.

The broker and a relay session with a list for a wire, time passed by hand, as in
``tests/test_session.py``; the same attacks against a node process, with its RSS
read from /proc, are in ``tests/test_memory.py``.
"""

from __future__ import annotations

import pytest

from irisnode.api import is_reserved
from irisnode.limits import REQUEST_OVERHEAD, MessagingLimits
from irisnode.system import MAX_FAULT, fault_text
from relay import codec
from relay.codec import (
    Closed,
    Denied,
    Faulted,
    Init,
    Publish,
    Replied,
    Reply,
    Request,
    Subscribe,
    TimedOut,
    TunnelClose,
    TunnelClosed,
    TunnelConfirm,
    TunnelFailed,
    TunnelInit,
    TunnelOffered,
)
from relay.ports import ByteBudget
from relay.session import SharedEncoding, State
from tests.test_session import Harness

# -- the budget ------------------------------------------------------------------------


def test_budget_wakes_waiters_as_soon_as_what_each_needs_fits() -> None:
    budget = ByteBudget(100)
    budget.take(200, "hog")  # the overdraft too
    woken: list[str] = []
    budget.wait(lambda: woken.append("big"), 80, "a")
    budget.wait(lambda: woken.append("small"), 30, "b")
    assert woken == [] and budget.waiting == 2
    budget.give(80, "hog")  # 120 used: 30 more fit b's share (100 / 2), 80 do not
    assert woken == ["small"]
    budget.give(120, "hog")
    assert woken == ["small", "big"]
    assert budget.waiting == 0


def test_a_holder_alone_may_go_beyond_the_budget() -> None:
    budget = ByteBudget(100)
    assert budget.fits(500, "a")  # one packet larger than the whole budget must still get through
    budget.take(10, "a")
    assert budget.fits(500, "a")  # ...as long as its holder is the only one
    assert not budget.fits(500, "b")
    budget.take(500, "a")
    assert not budget.fits(1, "a")  # and then it has had its turn


def test_one_holder_spending_the_budget_does_not_stop_the_others() -> None:
    budget = ByteBudget(100)
    budget.take(100, "hog")  # say, requests that will wait for minutes
    assert not budget.fits(1, "hog")  # the hog waits...
    assert budget.fits(50, "other")  # ...the others get their share (100 / 2)...
    assert not budget.fits(51, "other")
    budget.take(50, "other")
    assert budget.fits(0, "third") and not budget.fits(34, "third")  # (100 / 3)
    budget.take(33, "third")
    budget.take(17, "fourth")  # ...but never more than twice the budget in all
    assert budget.used == 200 and not budget.fits(1, "fifth")
    assert budget.held("other") == 50 and budget.holders == 4


def test_a_waiter_that_gives_up_is_never_called() -> None:
    budget = ByteBudget(10)
    budget.take(10, "hog")
    woken: list[int] = []

    def waiter() -> None:
        woken.append(1)

    budget.wait(waiter, 10, "a")
    budget.cancel(waiter)
    budget.give(10, "hog")
    assert woken == []


# -- requests ---------------------------------------------------------------------------


def test_a_departed_clients_requests_end_with_it() -> None:
    harness = Harness()
    budget = harness.broker.request_budget
    client, _ = harness.connect()
    echo, echo_wire = harness.connect("echo")
    harness.send(client, *[Request(i, "later", bytes(1000), (1 << 64) - 1) for i in range(3)])
    harness.send(client, Request(9, "echo", b"x", 60_000))
    (delivered,) = echo_wire.take()
    assert budget.used == 3 * (1000 + REQUEST_OVERHEAD) + 1 + REQUEST_OVERHEAD
    client.connection_lost()
    assert budget.used == 0
    assert harness.broker.next_deadline() is None
    _late, late_wire = harness.connect("later")  # parked requests were dropped with their client
    assert late_wire.take() == []
    harness.send(echo, Reply(delivered.request_id, b"nobody to tell"))  # discarded quietly
    assert echo.state is State.OPEN
    assert harness.broker.counters["withdrawn"] == 4


def test_requested_timeouts_are_capped_by_the_node() -> None:
    harness = Harness(MessagingLimits(max_timeout_ms=1500))
    client, cw = harness.connect()
    _service, sw = harness.connect("slow")
    harness.send(client, Request(1, "slow", b"x", (1 << 64) - 1))
    (delivered,) = sw.take()
    assert delivered.timeout_ms == 1500  # the member sees the deadline that really applies
    harness.advance(1.499)
    assert cw.take() == []
    harness.advance(0.001)
    assert cw.take() == [TimedOut(1)]


def test_a_request_counts_against_the_budget_until_its_outcome() -> None:
    harness = Harness()
    budget = harness.broker.request_budget
    client, cw = harness.connect()
    service, sw = harness.connect("echo")
    harness.send(client, Request(1, "echo", bytes(5000), 1000), Request(2, "echo", b"", 1000))
    first, _second = sw.take()
    assert budget.used == 5000 + 2 * REQUEST_OVERHEAD
    harness.send(service, Reply(first.request_id, b"ok"))
    assert budget.used == REQUEST_OVERHEAD
    harness.advance(1.0)
    assert cw.take() == [Replied(1, b"ok"), TimedOut(2)]
    assert budget.used == 0


def test_work_waits_in_the_node_while_every_member_is_congested() -> None:
    harness = Harness()
    client, _ = harness.connect()
    member, member_wire = harness.connect("svc")
    member_wire.congested = True
    harness.send(client, *[Request(i, "svc", f"r{i}".encode(), 5000) for i in range(3)])
    assert member_wire.take() == []  # it would only pile up in the member's buffer
    member_wire.congested = False
    member.resumed()  # the member caught up
    delivered = member_wire.take()
    assert [p.request for p in delivered] == [b"r0", b"r1", b"r2"]  # in order


def test_an_idle_member_takes_the_work_of_a_congested_one() -> None:
    harness = Harness()
    client, _ = harness.connect()
    _busy, busy_wire = harness.connect("svc")
    _idle, idle_wire = harness.connect("svc")
    busy_wire.congested = True
    harness.send(client, *[Request(i, "svc", b"x", 5000) for i in range(4)])
    assert busy_wire.take() == []
    assert len(idle_wire.take()) == 4


# -- subscriptions -----------------------------------------------------------------------


def test_subscriptions_past_the_limit_drop_the_connection_with_the_reason() -> None:
    harness = Harness(MessagingLimits(max_subscriptions=3))
    session, wire = harness.connect()
    harness.send(session, Subscribe("a"), Subscribe("b"), Subscribe("c"), Subscribe("a"))
    assert session.state is State.OPEN  # the same topic again is not one more
    harness.send(session, Subscribe("d"))
    reason = "more than 3 subscriptions on one connection"
    assert wire.take() == [Closed(reason)]
    assert wire.aborted == reason
    assert harness.broker.subscribers("a") == 0


# -- tunnels -------------------------------------------------------------------------------


def test_closing_a_tunnel_being_built_cancels_it() -> None:
    harness = Harness()
    client, cw = harness.connect()
    service, sw = harness.connect("svc")
    harness.send(client, TunnelInit(3, "svc", 1000))
    (offer,) = sw.take()
    harness.send(client, TunnelClose(3))
    assert cw.take() == [TunnelClosed(3, "")]
    harness.send(service, TunnelConfirm(offer.build_id, 9))  # the member accepts too late
    assert sw.take() == [TunnelClosed(9, "tunnel offer expired")]
    assert cw.take() == []  # no CONFIRM, no ALLOW after the close
    harness.advance(5)
    assert cw.take() == []
    harness.send(client, TunnelInit(3, "svc", 1000))  # the id is free again
    assert isinstance(sw.take()[0], TunnelOffered)
    assert client.state is State.OPEN


def test_closing_a_parked_tunnel_cancels_it() -> None:
    harness = Harness()
    client, cw = harness.connect()
    harness.send(client, TunnelInit(4, "nobody-yet", 2000), TunnelClose(4))
    assert cw.take() == [TunnelClosed(4, "")]
    _service, sw = harness.connect("nobody-yet")
    assert sw.take() == []
    harness.advance(3)
    assert cw.take() == []


# -- the node's namespace --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["$", "$foo", "$NODE.status", "$node.status", "\uff04node.status", "\ufe69x", " $x"]
)
def test_the_whole_dollar_namespace_is_the_nodes(name: str) -> None:
    assert is_reserved(name)
    harness = Harness()
    session, wire = harness.connect(None)
    harness.send(session, Init(name))
    (denied,) = wire.take()
    assert isinstance(denied, Denied) and "reserved" in denied.reason
    assert harness.broker.endpoints == 0


@pytest.mark.parametrize("name", ["", "a$", "node.status", "\u20acuro", "\U0001f4b2"])
def test_other_names_are_free(name: str) -> None:
    assert not is_reserved(name)


def test_a_request_for_a_node_service_that_does_not_exist_fails_at_once() -> None:
    harness = Harness()
    client, cw = harness.connect()
    harness.send(client, Request(1, "$" + "x" * 4000, b"", 60_000), TunnelInit(2, "$foo", 1000))
    faulted, failed = cw.take()
    assert isinstance(faulted, Faulted) and "no node service" in faulted.fault
    assert len(faulted.fault) < 100  # the name is not echoed in full
    assert failed == TunnelFailed(2)
    assert harness.broker.request_budget.used == 0


def test_a_fault_text_is_bounded() -> None:
    assert len(fault_text(ValueError("\xff" * (16 << 20)))) == MAX_FAULT
    assert fault_text(ValueError("short")) == "short"
    assert fault_text(KeyError()) == "KeyError"


# -- packet deadline ---------------------------------------------------------------------


def test_a_packet_must_arrive_within_its_deadline_after_the_handshake() -> None:
    harness = Harness()
    session, wire = harness.connect(packet_seconds=10.0)
    wire_bytes = Publish("t", bytes(100)).encode()
    session.data_received(wire_bytes[:50], harness.now)
    assert session.next_deadline() == harness.now + 10.0
    session.on_timer(harness.now + 9.9)
    assert session.state is State.OPEN
    session.data_received(wire_bytes[50:], harness.now + 9.9)
    assert session.next_deadline() is None  # complete: no deadline
    session.data_received(wire_bytes[:50], harness.now + 20)
    session.reading_resumed(harness.now + 25)  # the node did not read it for a while
    session.on_timer(harness.now + 30)
    assert session.state is State.OPEN  # its time restarted when reading did
    session.on_timer(harness.now + 35)
    reason = "a packet took more than 10 s to arrive"
    assert wire.take() == [Closed(reason)]
    assert wire.aborted == reason


def test_a_steady_stream_of_packets_never_meets_the_deadline() -> None:
    harness = Harness()
    session, _wire = harness.connect(packet_seconds=1.0)
    stream = Publish("t", b"x" * 10).encode() * 100
    now = harness.now
    for start in range(0, len(stream), 7):  # every read completes one packet and starts another
        now += 0.5
        session.data_received(stream[start : start + 7], now)
        session.on_timer(now)
        assert session.state is State.OPEN


# -- one encoding per fan-out ---------------------------------------------------------------


def test_a_fan_out_is_encoded_once_and_forgotten_after() -> None:
    harness = Harness()
    shared = SharedEncoding()
    subscribers = [harness.connect(shared=shared) for _ in range(3)]
    for session, _ in subscribers:
        harness.send(session, Subscribe("t"))
    event = bytes(1000)
    harness.broker.publish("t", event)
    assert shared.event_key is event  # encoded once, for all three
    assert codec.client_decoder().feed(shared.event_bytes) == [Publish("t", event)]
    for _, wire in subscribers:
        assert wire.take() == [Publish("t", event)]
    shared.forget()
    assert shared.event_key is None and shared.event_bytes == b""
