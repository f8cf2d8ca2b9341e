"""The CLI's reactor: end-of-turn calls run once per turn, after that turn's I/O."""

from __future__ import annotations

import socket

from irisnode.reactor import TurnReactor


def test_after_io_calls_run_after_the_turns_reads_and_before_blocking() -> None:
    reactor = TurnReactor()
    order: list[str] = []
    left, right = socket.socketpair()
    try:
        from twisted.internet.abstract import FileDescriptor

        class Reader(FileDescriptor):
            def fileno(self) -> int:
                return left.fileno()

            def doRead(self) -> None:
                order.append(f"read {left.recv(100)!r}")
                reactor.call_after_io(lambda: order.append("after io"))
                reactor.call_after_io(lambda: order.append("after io 2"))

        reader = Reader(reactor)
        reactor.addReader(reader)
        right.send(b"x")
        reactor.doPoll(1.0)
        assert order == ["read b'x'", "after io", "after io 2"]

        # Queued outside a turn (by a timer, say): runs before the reactor blocks.
        reactor.call_after_io(lambda: order.append("from a timer"))
        reactor.doPoll(0)
        assert order[-1] == "from a timer"
        reactor.removeReader(reader)
    finally:
        left.close()
        right.close()


def test_a_failing_call_does_not_stop_the_others() -> None:
    reactor = TurnReactor()
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    reactor.call_after_io(boom)
    reactor.call_after_io(lambda: ran.append(1))
    reactor.doPoll(0)
    assert ran == [1]
