"""The reactor the ``irisnode`` command runs on: epoll, plus an end-of-turn hook.

A relay node's work comes in bursts of readable sockets; what one burst writes to
a connection should leave in one ``send``. Twisted has no "after this poll's
events" hook, and ``callLater(0)`` costs a timer and an extra empty poll per turn.
:class:`TurnReactor` adds :meth:`~TurnReactor.call_after_io`: callables queued
during a turn run once, right after the turn's events are handled (and before
the reactor next blocks).

It also dispatches events without Twisted's per-event legacy log context, which
only prefixes old-style log lines with the connection's name. Errors stay isolated
per connection as in Twisted: an exception that escapes one connection's event
handling (a protocol's ``connectionLost``, say) is logged with that connection's
name, and the rest of the poll's events and the end-of-turn calls still run.

Only the CLI installs it; everything else works on any reactor and falls back to
``callLater(0)`` (see :func:`relay.server.RelayFactory.flush_later`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger(namespace="irisnode.reactor")


class TurnReactor(EPollReactor):
    """The epoll reactor with :meth:`call_after_io`."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._after_io: list[Callable[[], object]] = []

    def call_after_io(self, function: Callable[[], object]) -> None:
        """Run ``function`` once the events of the current turn have been handled."""
        self._after_io.append(function)

    def _run_after_io(self) -> None:
        while self._after_io:
            pending, self._after_io = self._after_io, []
            for function in pending:
                try:
                    function()
                except Exception:
                    log.failure("end-of-turn call {function!r} failed", function=function)

    def doPoll(self, timeout: float | None) -> None:
        # Work queued by timers (runUntilCurrent) goes out before we block.
        self._run_after_io()
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)  # type: ignore[no-untyped-call]
                except Exception:
                    log.failure("error handling events of {selectable}", selectable=selectable)
        self._run_after_io()

    doIteration = doPoll


def install_reactor() -> Any:
    """Install :class:`TurnReactor` as the global reactor (the CLI's job) and return it.

    Where epoll is missing, Twisted's default reactor is installed instead.
    """
    from twisted.internet.main import installReactor

    try:
        reactor = TurnReactor()
    except (ImportError, OSError):
        from twisted.internet import reactor as default

        return default
    installReactor(reactor)  # type: ignore[no-untyped-call]
    return reactor
