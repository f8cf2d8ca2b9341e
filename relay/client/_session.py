"""What the Twisted and the asyncio bindings share: a core plus the application's waiters.

A :class:`Session` feeds a :class:`~relay.client.core.ClientCore`, turns its
events into settled waiters (a Deferred or a Future behind the small
:class:`Waiter` protocol) and handler calls, and applies the handler limits. The
event loop specific parts (clock, socket, the one timer, running a handler that
may return a Deferred or an awaitable, logging) are the abstract methods that
each adapter fills in, so both APIs behave identically by construction.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from relay.client import core, errors
from relay.client.pool import HandlerQueue, Limits, ServiceLimits

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

Done = Callable[[object, BaseException | None], None]
"""Told the outcome of a handler call: ``(result, None)`` or ``(None, error)``."""


class Waiter(Protocol[T_contra]):
    """One pending result the application waits for (a Deferred or a Future, wrapped)."""

    def pending(self) -> bool:
        """False once settled or cancelled: nobody wants a result any more."""
        ...

    def resolve(self, value: T_contra) -> None: ...

    def reject(self, error: BaseException) -> None: ...


class Handler(Protocol):
    """The service callbacks, as the session sees them (each adapter types them precisely)."""

    def init(self, connection: Any) -> object: ...

    def handle_request(self, request: bytes) -> object: ...

    def handle_broadcast(self, message: bytes) -> object: ...

    def handle_tunnel(self, tunnel: Any) -> object: ...

    def handle_drop(self, reason: str) -> object: ...


@dataclass(frozen=True, slots=True)
class HandlerStats:
    """Inbound work that was never handled because a limit was reached."""

    requests_dropped: int
    """Requests refused because the queue's memory limit was full (the requester times out)."""
    requests_expired: int
    """Requests whose timeout passed while they waited for a free handler."""
    broadcasts_dropped: int
    events_dropped: int


def fault_text(error: BaseException) -> str:
    """The fault a failed handler sends: its text, or its type when the text is empty.

    The node would turn an empty fault into a timeout (spec B4), so never send one.
    """
    return str(error) or type(error).__name__


class _Inbox(Generic[T]):
    """A :class:`HandlerQueue` plus the code that runs its items as slots free up."""

    def __init__(
        self,
        limits: Limits,
        run: Callable[[T, Callable[[], None]], None],
        clock: Callable[[], float],
        *,
        paused: bool = False,
    ) -> None:
        self.queue: HandlerQueue[T] = HandlerQueue(limits, paused=paused)
        self._run = run
        self._clock = clock
        self._busy = False

    def offer(self, item: T, size: int, expires: float | None = None) -> bool:
        accepted = self.queue.offer(item, size, expires)
        self.drain()
        return accepted

    def resume(self) -> None:
        self.queue.paused = False
        self.drain()

    def drain(self) -> None:
        if self._busy:
            return  # a synchronous handler finished inside our own loop; it goes on
        self._busy = True
        try:
            while (item := self.queue.next(self._clock())) is not None:
                self._run(item, self._finished)
        finally:
            self._busy = False

    def _finished(self) -> None:
        self.queue.finished()
        self.drain()


class TunnelEnd:
    """Our end of one open tunnel: messages not yet read, readers not yet served."""

    def __init__(self, session: Session, tunnel_id: int, chunk_limit: int) -> None:
        self.session = session
        self.tunnel_id = tunnel_id
        self.chunk_limit = chunk_limit
        self.reason: str | None = None
        """None while open; then why it ended ("" for a normal close)."""
        self._closing = False
        self._messages: deque[bytes] = deque()
        self._readers: deque[Waiter[bytes]] = deque()
        self._closers: list[Waiter[None]] = []

    @property
    def closed(self) -> bool:
        return self._closing or self.reason is not None

    def send(self, message: bytes, timeout: float | None, waiter: Waiter[None]) -> None:
        if self.closed:
            raise self._closed_error()
        session = self.session
        send_id = session.core.tunnel_send(self.tunnel_id, message, session.now(), timeout)
        session.sends[send_id] = waiter
        session.pump()

    def recv(self, waiter: Waiter[bytes]) -> None:
        """Serve from the buffer, else queue the reader; buffered messages outlive a remote close."""
        if self._messages and not self._closing:
            self._consume(waiter, self._messages.popleft())
        elif self.closed:
            waiter.reject(self._closed_error())
        else:
            self._readers = deque(r for r in self._readers if r.pending())
            self._readers.append(waiter)

    def close(self, waiter: Waiter[None]) -> None:
        if self.reason is not None:
            self._settle_close(waiter)
            return
        self._closers.append(waiter)
        if not self._closing:
            self._closing = True
            self._messages.clear()
            self._fail_readers()
            session = self.session
            session.core.close_tunnel(self.tunnel_id, session.now())
            session.pump()

    def deliver(self, message: bytes) -> None:
        while self._readers:
            reader = self._readers.popleft()
            if reader.pending():
                self._consume(reader, message)
                return
        self._messages.append(message)

    def ended(self, reason: str) -> None:
        self.reason = reason
        self._fail_readers()
        closers, self._closers = self._closers, []
        for waiter in closers:
            self._settle_close(waiter)

    def _consume(self, waiter: Waiter[bytes], message: bytes) -> None:
        self.session.core.tunnel_consumed(self.tunnel_id, len(message))
        waiter.resolve(message)
        self.session.pump()

    def _fail_readers(self) -> None:
        readers, self._readers = self._readers, deque()
        for reader in readers:
            reader.reject(self._closed_error())

    def _settle_close(self, waiter: Waiter[None]) -> None:
        if self.reason:
            waiter.reject(errors.ConnectionClosed(f"tunnel failed: {self.reason}", self.reason))
        else:
            waiter.resolve(None)

    def _closed_error(self) -> errors.ConnectionClosed:
        if self.reason:
            return errors.ConnectionClosed(f"tunnel closed: {self.reason}", self.reason)
        return errors.ConnectionClosed("tunnel closed")


class Session(abc.ABC):
    """One connection's application side; subclasses bind it to an event loop.

    ``ready`` settles once the connection is usable: after the handshake, and
    for a service after ``handler.init`` returned (or with the reason it is not).
    """

    facade: object
    """The public connection object handed to ``handler.init``."""

    def __init__(
        self,
        core_: core.ClientCore,
        ready: Waiter[None],
        handler: Handler | None = None,
        limits: ServiceLimits | None = None,
    ) -> None:
        limits = limits or ServiceLimits()
        self.core = core_
        self.handler = handler
        self.sends: dict[int, Waiter[None]] = {}
        self._ready = ready
        self._requests: dict[int, Waiter[bytes]] = {}
        self._opening: dict[int, Waiter[TunnelEnd]] = {}
        self._tunnels: dict[int, TunnelEnd] = {}
        self._topics: dict[str, _Inbox[bytes]] = {}
        self._closers: list[Waiter[None]] = []
        self._held_tunnels: list[TunnelEnd] = []
        self._registered = False
        self._denied: str | None = None
        self._pumping = False
        self._events_dropped = 0
        self._request_inbox: _Inbox[tuple[int, bytes]] = _Inbox(
            limits.requests, self._run_request, self.now, paused=True
        )
        self._broadcast_inbox: _Inbox[bytes] = _Inbox(
            limits.broadcasts, self._run_broadcast, self.now, paused=True
        )

    # ---- what an adapter provides ------------------------------------------------------

    @abc.abstractmethod
    def now(self) -> float: ...

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def disconnect(self, abort: bool) -> None:
        """Close the socket (``abort``: at once, without flushing)."""

    @abc.abstractmethod
    def set_timer(self, deadline: float | None) -> None:
        """(Re)arm the one timer to call :meth:`on_timer` at ``deadline``; None disarms it."""

    @abc.abstractmethod
    def spawn(self, call: Callable[[], object], done: Done) -> None:
        """Run ``call``; when its result (plain, Deferred or awaitable) is known, tell ``done``."""

    @abc.abstractmethod
    def warn(self, text: str, error: BaseException | None = None, **fields: object) -> None:
        """Log a problem: ``text`` is a format string over ``fields``."""

    @abc.abstractmethod
    def wrap_tunnel(self, end: TunnelEnd) -> object:
        """The public tunnel object for ``handler.handle_tunnel``."""

    # ---- driven by the adapter --------------------------------------------------------

    def connection_made(self) -> None:
        self.core.connection_made(self.now())
        self.pump()  # the INIT packet

    def data_received(self, data: bytes) -> None:
        self.core.receive_data(data, self.now())
        self.pump()

    def connection_lost(self, reason: str) -> None:
        self.core.connection_lost(reason)
        self.pump()

    def on_timer(self) -> None:
        self.core.on_timer(self.now())
        self.pump()

    def pump(self) -> None:
        """Write what the core produced and act on its events until it is quiet.

        Re-entrant calls (a callback issuing a command) return at once; the
        outermost call picks up their output.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                data = self.core.data_to_send()
                if data:
                    self.write(data)
                events = self.core.take_events()
                if not events:
                    break
                for event in events:
                    self._dispatch(event)
        finally:
            self._pumping = False
        self.set_timer(self.core.next_deadline())

    # ---- commands --------------------------------------------------------------------------

    def request(self, cluster: str, data: bytes, timeout: float, waiter: Waiter[bytes]) -> None:
        request_id = self.core.request(cluster, data, timeout, self.now())
        self._requests[request_id] = waiter
        self.pump()

    def broadcast(self, cluster: str, message: bytes) -> None:
        self.core.broadcast(cluster, message)
        self.pump()

    def publish(self, topic: str, event: bytes) -> None:
        self.core.publish(topic, event)
        self.pump()

    def subscribe(
        self, topic: str, handler: Callable[[bytes], object], limits: Limits | None = None
    ) -> None:
        if not callable(handler):
            raise TypeError("the subscription handler must be callable")
        self.core.subscribe(topic)

        def run(event: bytes, finished: Callable[[], None]) -> None:
            def done(result: object, error: BaseException | None) -> None:
                finished()
                if error is not None:
                    self.warn("Event handler for topic {topic} failed", error, topic=topic)

            self.spawn(lambda: handler(event), done)

        self._topics[topic] = _Inbox(limits or Limits(), run, self.now)
        self.pump()

    def unsubscribe(self, topic: str) -> None:
        self.core.unsubscribe(topic)
        self._topics.pop(topic).queue.clear()  # events not yet started are dropped
        self.pump()

    def open_tunnel(self, cluster: str, timeout: float, waiter: Waiter[TunnelEnd]) -> None:
        tunnel_id = self.core.open_tunnel(cluster, timeout, self.now())
        self._opening[tunnel_id] = waiter
        self.pump()

    def close(self, waiter: Waiter[None]) -> None:
        if self.core.state is core.State.CLOSED:
            waiter.resolve(None)
            return
        self._closers.append(waiter)
        self.core.close(self.now())
        self.pump()

    @property
    def stats(self) -> HandlerStats:
        requests = self._request_inbox.queue
        return HandlerStats(
            requests_dropped=requests.dropped,
            requests_expired=requests.expired,
            broadcasts_dropped=self._broadcast_inbox.queue.dropped,
            events_dropped=self._events_dropped,
        )

    # ---- events -----------------------------------------------------------------------------

    def _dispatch(self, event: core.Event) -> None:
        match event:
            case core.ReplyReceived(request_id=request_id, reply=reply):
                self._requests.pop(request_id).resolve(reply)
            case core.FaultReceived(request_id=request_id, fault=fault):
                self._requests.pop(request_id).reject(errors.RemoteFault(fault))
            case core.RequestTimedOut(request_id=request_id):
                self._requests.pop(request_id).reject(errors.Timeout("request timed out"))
            case core.RequestAborted(request_id=request_id, reason=reason):
                self._requests.pop(request_id).reject(_closed(reason))
            case core.TunnelData(tunnel_id=tunnel_id, message=message):
                self._tunnels[tunnel_id].deliver(message)
            case core.TunnelSent(send_id=send_id):
                self.sends.pop(send_id).resolve(None)
            case core.TunnelSendFailed(send_id=send_id, timed_out=timed_out):
                error: errors.IrisError = (
                    errors.Timeout("no credit to send in time")
                    if timed_out
                    else errors.ConnectionClosed("tunnel closed")
                )
                self.sends.pop(send_id).reject(error)
            case core.TunnelOpened(tunnel_id=tunnel_id, chunk_limit=chunk_limit):
                end = self._tunnels[tunnel_id] = TunnelEnd(self, tunnel_id, chunk_limit)
                waiter = self._opening.pop(tunnel_id)
                if waiter.pending():
                    waiter.resolve(end)
                else:
                    end.close(_Ignored())  # the caller gave up waiting: release it
            case core.TunnelOpenFailed(tunnel_id=tunnel_id, timed_out=timed_out, reason=reason):
                self._opening.pop(tunnel_id).reject(
                    errors.Timeout(reason) if timed_out else _closed(reason)
                )
            case core.TunnelClosed(tunnel_id=tunnel_id, reason=reason):
                self._tunnels.pop(tunnel_id).ended(reason)
            case core.TunnelOffered(tunnel_id=tunnel_id, chunk_limit=chunk_limit):
                end = self._tunnels[tunnel_id] = TunnelEnd(self, tunnel_id, chunk_limit)
                if self._registered:
                    self._hand_over(end)
                else:
                    self._held_tunnels.append(end)  # not before init has returned (Go's B9)
            case core.RequestReceived(request_id=request_id, request=data, timeout_ms=ms):
                expires = self.now() + ms / 1000
                if not self._request_inbox.offer((request_id, data), len(data), expires):
                    self.warn("Request dropped: handler queue full", size=len(data))
            case core.BroadcastReceived(message=message):
                if not self._broadcast_inbox.offer(message, len(message)):
                    self.warn("Broadcast dropped: handler queue full", size=len(message))
            case core.EventReceived(topic=topic, event=data):
                inbox = self._topics[topic]
                if not inbox.offer(data, len(data)):
                    self._events_dropped += 1
                    self.warn("Event dropped: handler queue full", topic=topic, size=len(data))
            case core.Connected():
                self._on_connected()
            case core.Denied(reason=reason):
                self._denied = reason
            case core.ConnectionClosed():
                self._on_closed(event)

    def _on_connected(self) -> None:
        handler = self.handler
        if handler is None:
            self._ready.resolve(None)
            return

        def done(result: object, error: BaseException | None) -> None:
            if self.core.state is core.State.CLOSED:
                return  # the connection ended during init; ready has been rejected
            if error is not None:
                self._ready.reject(error)
                self.core.close(self.now())
                self.pump()
                return
            self._registered = True
            self._request_inbox.resume()
            self._broadcast_inbox.resume()
            held, self._held_tunnels = self._held_tunnels, []
            for end in held:
                if end.reason is None:
                    self._hand_over(end)
            self._ready.resolve(None)

        self.spawn(lambda: handler.init(self.facade), done)

    def _on_closed(self, event: core.ConnectionClosed) -> None:
        self.disconnect(abort=event.violation)
        self._request_inbox.queue.clear()
        self._broadcast_inbox.queue.clear()
        for inbox in self._topics.values():
            inbox.queue.clear()
        self._held_tunnels.clear()
        if self._ready.pending():
            self._ready.reject(self._failure(event))
        elif self._registered and not event.graceful and self.handler is not None:
            handler = self.handler
            self.spawn(lambda: handler.handle_drop(event.reason), self._log_failure("drop"))
        closers, self._closers = self._closers, []
        for waiter in closers:
            waiter.resolve(None)

    def _failure(self, event: core.ConnectionClosed) -> errors.IrisError:
        if self._denied is not None:
            return errors.ConnectionDenied(self._denied)
        if event.violation:
            return errors.ProtocolViolation(event.reason)
        return errors.ConnectionClosed(f"connection closed: {event.reason}", event.reason)

    def _hand_over(self, end: TunnelEnd) -> None:
        assert self.handler is not None
        handler = self.handler
        tunnel = self.wrap_tunnel(end)
        self.spawn(lambda: handler.handle_tunnel(tunnel), self._log_failure("tunnel"))

    def _run_request(self, item: tuple[int, bytes], finished: Callable[[], None]) -> None:
        request_id, data = item
        assert self.handler is not None
        handler = self.handler

        def done(result: object, error: BaseException | None) -> None:
            finished()
            if error is None:
                if result is None:
                    result = b""  # like Go's nil/nil: an empty successful reply
                try:
                    self.core.reply(request_id, result)  # type: ignore[arg-type]
                except (TypeError, ValueError) as refused:
                    error = refused
                    self.warn("Request handler returned an unusable reply", error)
            if error is not None:
                self.core.fault(request_id, fault_text(error))
            self.pump()

        self.spawn(lambda: handler.handle_request(data), done)

    def _run_broadcast(self, message: bytes, finished: Callable[[], None]) -> None:
        assert self.handler is not None
        handler = self.handler
        log = self._log_failure("broadcast")

        def done(result: object, error: BaseException | None) -> None:
            finished()
            log(result, error)

        self.spawn(lambda: handler.handle_broadcast(message), done)

    def _log_failure(self, what: str) -> Done:
        def done(result: object, error: BaseException | None) -> None:
            if error is not None:
                self.warn("Service {what} handler failed", error, what=what)

        return done


def _closed(reason: str) -> errors.ConnectionClosed:
    return errors.ConnectionClosed(reason or "connection closed", reason)


class _Ignored:
    """A waiter nobody waits on."""

    def pending(self) -> bool:
        return False

    def resolve(self, value: object) -> None:
        pass

    def reject(self, error: BaseException) -> None:
        pass
