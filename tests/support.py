"""Helpers for tests that run real nodes on loopback: a raw protocol client and waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from relay import codec

reactor: Any = _reactor
T = TypeVar("T")


async def wait_for(condition: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        value = condition()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.005)


class RawClient(Protocol):
    """Speaks the relay protocol as raw packets: what the tests send is exactly what goes out."""

    def __init__(self) -> None:
        self.decoder = codec.client_decoder()
        self.packets: list[Any] = []
        self.raw = bytearray()
        self.closed = False
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self.packets += self.decoder.feed(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.lost.callback(None)

    def send(self, *packets: Any) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(p.encode() for p in packets))

    def send_raw(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def next(self, timeout: float = 5.0) -> Any:
        await wait_for(lambda: self.packets or self.closed, timeout, "a packet")
        if not self.packets:
            raise AssertionError("connection closed while waiting for a packet")
        return self.packets.pop(0)

    async def take(self, count: int, timeout: float = 5.0) -> list[Any]:
        await wait_for(lambda: len(self.packets) >= count, timeout, f"{count} packets")
        out, self.packets = self.packets[:count], self.packets[count:]
        return out

    def abort(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


async def raw_connect(port: int, cluster: str | None = "") -> RawClient:
    """Connect to a node; with a cluster (or "" for a plain client) do the handshake too."""
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await connectProtocol(endpoint, client)
    if cluster is not None:
        client.send(codec.Init(cluster))
        assert await client.next() == codec.Accepted()
    return client
