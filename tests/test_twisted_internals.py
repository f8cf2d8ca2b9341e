"""The one place the relay reads Twisted internals, checked against the Twisted installed.

``relay/tcp.py`` lets the relay write straight to a TCP transport's socket when Twisted's write
buffer is empty, which it learns from ``FileDescriptor`` internals (``dataBuffer``,
``offset``, ``_tempDataLen``). That shortcut is written for a range of Twisted
releases, pinned in ``pyproject.toml``; on any other release these tests fail,
loudly, before a user finds out (the relay itself then falls back to
``transport.write``, so it stays correct, only slower).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted import __version__ as twisted_version
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from relay import tcp
from tests.support import reactor, wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_dependency_range_is_the_range_the_shortcut_was_written_for() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (twisted,) = [d for d in project["project"]["dependencies"] if d.startswith("twisted")]
    match = re.fullmatch(r"twisted>=(\d+)\.(\d+),<(\d+)", twisted.replace(" ", ""))
    assert match, f"pin Twisted to a range in pyproject.toml, not {twisted!r}"
    low, high = tcp.TWISTED_SHORTCUT_VERSIONS
    assert (int(match[1]), int(match[2])) == low and (int(match[3]), 0) == high


def test_the_installed_twisted_is_one_the_shortcut_was_written_for() -> None:
    assert tcp.SOCKET_SHORTCUT, (
        f"Twisted {twisted_version} is outside {tcp.TWISTED_SHORTCUT_VERSIONS} or its "
        "FileDescriptor no longer has dataBuffer/offset/_tempDataLen: check what "
        "relay/tcp.py idle_socket reads against this release, then move the range"
    )


class _Sink(Protocol):
    """Takes a connection and never reads from it."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]


class _Source(Protocol):
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_the_internals_say_what_the_shortcut_believes() -> None:
    sources: list[_Source] = []

    def build() -> _Source:
        source = _Source()
        sources.append(source)
        return source

    port: Any = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(build)
    )
    sink = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _Sink()
    )
    try:
        await wait_for(lambda: sources, what="the accepted connection")
        source = sources[0]
        transport: Any = source.transport
        transport.registerProducer(source, True)
        assert tcp.idle_socket(transport) is transport.socket  # nothing buffered yet
        chunk = bytes(1 << 20)
        for _ in range(32):  # more than any socket buffer takes from a reader that never reads
            transport.write(chunk)
        assert source.paused  # the public contract: the transport said it is full...
        assert tcp.idle_socket(transport) is None  # ...and the internals agree
        held = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        assert held > 8 << 20
    finally:
        assert sink.transport is not None
        sink.transport.abortConnection()
        await port.stopListening()


def test_a_client_gone_is_seen_in_the_tcp_state_without_reading() -> None:
    import socket
    import struct

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def getHandle(self) -> socket.socket:
            return self.sock

    with socket.create_server(("127.0.0.1", 0)) as server:
        closing = socket.create_connection(server.getsockname())
        resetting = socket.create_connection(server.getsockname())
        staying = socket.create_connection(server.getsockname())
        accepted = [Transport(server.accept()[0]) for _ in range(3)]
        try:
            closing.sendall(b"unread data")  # still waiting in the node's socket
            closing.close()
            resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            resetting.close()
            deadline = reactor.seconds() + 5
            while not all(tcp.client_gone(t) for t in accepted[:2]):
                assert reactor.seconds() < deadline, "the TCP state never changed"
            assert not tcp.client_gone(accepted[2])
        finally:
            staying.close()
            for transport in accepted:
                transport.sock.close()
