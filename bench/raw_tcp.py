"""Raw TCP as fast as it goes: the yardstick the link benchmarks compare links with."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from zope.interface import implementer


@implementer(IPushProducer)
class _Pusher(Protocol):
    """Writes while the transport takes more (it is the transport's producer)."""

    paused = False
    writable: Deferred[None] | None = None

    def __init__(self) -> None:
        self.up: Deferred[None] = Deferred()
        self.answer: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        IConsumer(self.transport).registerProducer(self, True)
        self.up.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self.writable = self.writable, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def wait_writable(self) -> Deferred[None]:
        if not self.paused:
            return succeed(None)
        self.writable = Deferred()
        return self.writable


async def push(
    reactor: Any, host: str, port: int, chunk: bytes, seconds: float
) -> tuple[int, bytes, float, float]:
    """Write ``chunk`` over and over for ``seconds``, half-close, and wait for the receiver's
    one answer. Returns (bytes sent, the answer, elapsed seconds, this process's CPU seconds)."""
    pusher = _Pusher()
    factory = ClientFactory()
    factory.protocol = lambda: pusher
    reactor.connectTCP(host, port, factory)
    await pusher.up
    transport: Any = pusher.transport
    sent = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        while not pusher.paused:
            transport.write(chunk)
            sent += len(chunk)
        await pusher.wait_writable()
    transport.loseWriteConnection()
    answer = await pusher.answer
    elapsed = time.perf_counter() - start
    transport.loseConnection()
    return sent, answer, elapsed, time.process_time() - cpu
