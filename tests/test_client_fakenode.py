"""A scripted fake node for the binding tests: raw spec packets on 127.0.0.1, port 0.

The test drives it packet by packet (``await peer.next(codec.Request)``,
``peer.send(codec.Replied(...))``), so every byte the bindings put on the wire is
checked and every answer is exactly the one the test wants, including wrong ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import TypeVar, cast

import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from relay import codec
from tests.support import reactor, wait_for

P = TypeVar("P")


class FakePeer(Protocol):
    """The node's end of one binding connection."""

    def __init__(self) -> None:
        self.decoder = codec.node_decoder()
        self.packets: deque[codec.ClientPacket] = deque()
        self.raw = bytearray()
        self.closed = False
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self.packets += self.decoder.feed(data)
        assert self.decoder.error is None, self.decoder.error

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.lost.callback(None)

    def send(self, *packets: codec.NodePacket) -> None:
        self.send_raw(b"".join(p.encode() for p in packets))

    def send_raw(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def drop(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    async def next(self, kind: type[P], timeout: float = 5.0) -> P:
        """The next packet the binding sent, which must be a ``kind``."""
        packet = await self.next_any(timeout)
        assert isinstance(packet, kind), f"expected a {kind.__name__}, got {packet!r}"
        return packet

    async def next_any(self, timeout: float = 5.0) -> codec.ClientPacket:
        await wait_for(lambda: self.packets or self.closed, timeout, "a packet")
        assert self.packets, "connection closed while waiting for a packet"
        return self.packets.popleft()

    async def handshake(self) -> codec.Init:
        init = await self.next(codec.Init)
        self.send(codec.Accepted())
        return init

    async def closed_by_binding(self) -> None:
        """The binding asks for a graceful close; acknowledge it like a node."""
        await self.next(codec.Close)
        self.send(codec.Closed(""))
        await self.wait_lost()

    async def wait_lost(self, timeout: float = 5.0) -> None:
        await wait_for(lambda: self.closed, timeout, "the connection to close")


class FakeNode(Factory):
    """Listens on 127.0.0.1 port 0 and hands each accepted connection to the test."""

    noisy = False

    def __init__(self) -> None:
        self.peers: list[FakePeer] = []
        self._accepted = 0
        self.listening: IListeningPort = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def port(self) -> int:
        return cast(IPv4Address, self.listening.getHost()).port

    def buildProtocol(self, addr: IAddress | None) -> FakePeer:
        peer = FakePeer()
        peer.factory = self
        self.peers.append(peer)
        return peer

    async def accept(self, timeout: float = 5.0) -> FakePeer:
        """The next connection a binding made (in order of arrival)."""
        await wait_for(lambda: len(self.peers) > self._accepted, timeout, "a connection")
        self._accepted += 1
        return self.peers[self._accepted - 1]

    async def stop(self) -> None:
        stopping = self.listening.stopListening()
        if stopping is not None:
            await stopping
        for peer in self.peers:
            if not peer.closed:
                peer.drop()
                await peer.wait_lost()


@pytest_twisted.async_yield_fixture
async def fake_node() -> AsyncIterator[FakeNode]:
    node = FakeNode()
    yield node
    await node.stop()


async def free_port() -> int:
    """A loopback port nobody listens on (bound to 0, then released)."""
    node = FakeNode()
    port = node.port
    await node.stop()
    return port


@pytest_twisted.ensureDeferred
async def test_the_fake_node_parses_what_a_raw_client_sends(fake_node: FakeNode) -> None:
    from tests.support import raw_connect

    client = await raw_connect(fake_node.port, None)
    peer = await fake_node.accept()
    client.send(codec.Init("echo"), codec.Publish("news", b"x"))
    assert await peer.handshake() == codec.Init("echo")
    assert await peer.next(codec.Publish) == codec.Publish("news", b"x")
    await wait_for(lambda: client.packets, what="the acceptance")
    assert client.packets == [codec.Accepted()]
