"""The CLI's reactor: end-of-turn calls run once per turn, after that turn's I/O."""

from __future__ import annotations

import socket
from typing import cast

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


def test_an_error_in_one_connection_spares_the_rest_of_the_poll() -> None:
    """A protocol's connectionLost that raises is logged; the turn goes on for the others."""
    from twisted.internet.abstract import FileDescriptor
    from twisted.logger import ILogObserver, globalLogPublisher

    reactor = TurnReactor()
    handled: list[str] = []
    errors: list[dict[str, object]] = []
    observer = cast(ILogObserver, errors.append)
    pairs = [socket.socketpair() for _ in range(3)]

    class Broken(FileDescriptor):
        def __init__(self, sock: socket.socket, name: str) -> None:
            super().__init__(reactor)
            self.sock, self.name = sock, name

        def fileno(self) -> int:
            return self.sock.fileno()

        def doRead(self) -> None:
            handled.append(self.name)
            if self.name == "bad":
                reactor.call_after_io(lambda: handled.append("after io"))
                raise RuntimeError("read failed")

        def connectionLost(self, reason: object) -> None:
            if self.name == "bad":
                raise RuntimeError("and so did connectionLost")
            super().connectionLost(reason)

    readers = [Broken(left, name) for (left, _), name in zip(pairs, ["a", "bad", "c"], strict=True)]
    for reader in readers:
        reactor.addReader(reader)
    globalLogPublisher.addObserver(observer)
    try:
        for _, right in pairs:
            right.send(b"x")
        reactor.doPoll(1.0)
    finally:
        globalLogPublisher.removeObserver(observer)
        for left, right in pairs:
            left.close()
            right.close()
    assert sorted(handled) == ["a", "after io", "bad", "c"]
    assert handled[-1] == "after io"  # the end-of-turn calls still ran
    failures = [e for e in errors if e.get("log_namespace") == "irisnode.reactor"]
    assert len(failures) == 1 and failures[0]["selectable"] is readers[1]
