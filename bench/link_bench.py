"""Link benchmark: handshake CPU cost and 64 KiB-frame throughput next to raw TCP.

    python -m bench.link_bench [--handshakes N] [--seconds S] [--frame-size BYTES]

Loopback only (127.0.0.1, port 0), bounded in time. Figures:

* handshake CPU per link: ``time.process_time()`` over N handshakes divided by N,
  both ends in this process, (a) pure cores back to back and (b) real links
  over loopback TCP with the Twisted adapter (connect, establish, close);
* throughput: payload MB/s (10^6 bytes) of 64 KiB frames over one link, and of
  raw TCP writes of the same chunks on the same path (same reactor, same
  process, same flow control), measured one after the other in one run; plus
  the pure encrypt+decrypt rate of the core without sockets for reference.

Both ends share one reactor thread, so the socket figures are what one Python
process can push through itself, not a NIC limit.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.task import react
from zope.interface import implementer

from overlay.identity import Credentials, NetworkKey, NodeIdentity
from overlay.link import Established, LinkCore, Role, Transmit
from overlay.link_twisted import Link, LinkService


def _credentials(network: NetworkKey) -> Credentials:
    return Credentials.for_network(network, NodeIdentity.generate(os.urandom))


def handshake_cpu_pure(count: int) -> float:
    """CPU ms per link (both ends) for the handshake alone, cores back to back."""
    network = NetworkKey.ephemeral(os.urandom)
    a, b = _credentials(network), _credentials(network)
    start = time.process_time()
    for _ in range(count):
        i = LinkCore(Role.INITIATOR, a, os.urandom, 0.0)
        r = LinkCore(Role.RESPONDER, b, os.urandom, 0.0)
        (msg1,) = i.start()
        assert isinstance(msg1, Transmit)
        (msg2,) = r.receive(msg1.data, 0.0)
        assert isinstance(msg2, Transmit)
        msg3, _ = i.receive(msg2.data, 0.0)
        assert isinstance(msg3, Transmit)
        (up,) = r.receive(msg3.data, 0.0)
        assert isinstance(up, Established)
    return (time.process_time() - start) * 1000 / count


def crypto_throughput(frame_size: int, seconds: float) -> float:
    """MB/s of payload through send() then receive() of the cores (no sockets)."""
    network = NetworkKey.ephemeral(os.urandom)
    i = LinkCore(Role.INITIATOR, _credentials(network), os.urandom, 0.0)
    r = LinkCore(Role.RESPONDER, _credentials(network), os.urandom, 0.0)
    (msg1,) = i.start()
    assert isinstance(msg1, Transmit)
    (msg2,) = r.receive(msg1.data, 0.0)
    assert isinstance(msg2, Transmit)
    msg3, _ = i.receive(msg2.data, 0.0)
    assert isinstance(msg3, Transmit)
    r.receive(msg3.data, 0.0)
    payload = os.urandom(frame_size)
    total = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            r.receive(i.send(payload), 0.0)
        total += 16 * frame_size
    return total / (time.perf_counter() - start) / 1e6


class _Counter:
    """LinkHandler for the benchmark: counts frames and fires when asked."""

    def __init__(self) -> None:
        self.bytes = 0
        self.frames = 0
        self.target = -1
        self.reached: Deferred[None] | None = None
        self.up: Deferred[Link] = Deferred()
        self.down = 0

    def link_established(self, link: Link) -> None:
        if not self.up.called:
            self.up.callback(link)

    def frame_received(self, link: Link, data: bytes) -> None:
        self.bytes += len(data)
        self.frames += 1
        if self.frames == self.target and self.reached is not None:
            self.reached.callback(None)

    def link_lost(self, link: Link, reason: str) -> None:
        self.down += 1


def _pair(reactor: Any) -> tuple[LinkService, _Counter, LinkService, _Counter, int]:
    network = NetworkKey.ephemeral(os.urandom)
    ha, hb = _Counter(), _Counter()
    common: dict[str, Any] = {"entropy": os.urandom, "rng": random.Random(1)}
    a = LinkService(reactor, reactor, _credentials(network), ha, **common)
    b = LinkService(reactor, reactor, _credentials(network), hb, **common)
    host = b.listen(0, "127.0.0.1").getHost()
    assert isinstance(host, IPv4Address)
    return a, ha, b, hb, host.port


async def handshake_cpu_loopback(reactor: Any, count: int) -> float:
    """CPU ms per link (both ends, TCP set-up and teardown included) over loopback."""
    network = NetworkKey.ephemeral(os.urandom)
    server = LinkService(
        reactor, reactor, _credentials(network), _Counter(), entropy=os.urandom, rng=random.Random()
    )
    host = server.listen(0, "127.0.0.1").getHost()
    assert isinstance(host, IPv4Address)
    clients = [_credentials(network) for _ in range(count)]
    start = time.process_time()
    for credentials in clients:
        handler = _Counter()
        client = LinkService(
            reactor, reactor, credentials, handler, entropy=os.urandom, rng=random.Random()
        )
        client.connect("127.0.0.1", host.port)
        await handler.up
        await client.stop()
    elapsed = time.process_time() - start
    await server.stop()
    return elapsed * 1000 / count


async def link_throughput(reactor: Any, frame_size: int, seconds: float) -> float:
    a, _, b, hb, port = _pair(reactor)
    a.connect("127.0.0.1", port)
    await hb.up
    link = a.links[b.node_id]
    payload = os.urandom(frame_size)
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        while not link.writing_paused:
            link.send(payload)
            sent += 1
        await link.wait_writable()
    reached: Deferred[None] = Deferred()
    hb.target, hb.reached = sent, reached
    if hb.frames < sent:
        await reached
    elapsed = time.perf_counter() - start
    assert hb.bytes == sent * frame_size
    await a.stop()
    await b.stop()
    return hb.bytes / elapsed / 1e6


@implementer(IPushProducer)
class _RawSender(Protocol):
    def __init__(self) -> None:
        self.on_data: Callable[[bytes], object] = lambda data: None
        self.paused = False
        self.waiter: Deferred[None] | None = None
        self.connected_: Deferred[_RawSender] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        IConsumer(self.transport).registerProducer(self, True)
        self.connected_.callback(self)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.on_data(data)

    def wait_writable(self) -> Deferred[None]:
        if not self.paused:
            return succeed(None)
        self.waiter = Deferred()
        return self.waiter


class _RawReceiver(Protocol):
    def __init__(self, counter: _Counter) -> None:
        self.counter = counter

    def dataReceived(self, data: bytes) -> None:
        counter = self.counter
        counter.bytes += len(data)
        if counter.bytes >= counter.target and counter.reached is not None:
            reached, counter.reached = counter.reached, None
            reached.callback(None)


async def raw_tcp_throughput(reactor: Any, frame_size: int, seconds: float) -> float:
    counter = _Counter()
    server_factory = ServerFactory()
    server_factory.protocol = lambda: _RawReceiver(counter)
    listening = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
    sender = _RawSender()
    client_factory = ClientFactory()
    client_factory.protocol = lambda: sender
    reactor.connectTCP("127.0.0.1", listening.getHost().port, client_factory)
    await sender.connected_
    assert sender.transport is not None
    payload = os.urandom(frame_size)
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        while not sender.paused:
            sender.transport.write(payload)
            sent += frame_size
        await sender.wait_writable()
    reached: Deferred[None] = Deferred()
    counter.target, counter.reached = sent, reached
    if counter.bytes < sent:
        await reached
    elapsed = time.perf_counter() - start
    sender.transport.loseConnection()
    await listening.stopListening()
    return counter.bytes / elapsed / 1e6


def _fire(deferred: Deferred[None]) -> None:
    if not deferred.called:
        deferred.callback(None)


# --------------------------------------------------------------------------------
# Two processes: the receiver in a child, so each end has its own core (as on a LAN)

_END = b"END"


class _Child:
    """A receiver process (``--serve link|raw``) on loopback; stopped by its own pid."""

    def __init__(self, mode: str, seed: bytes = b"") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.link_bench", "--serve", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(seed.hex() + "\n")
        self.process.stdin.flush()
        self.port = int(self.process.stdout.readline())

    def finish(self) -> None:
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def link_throughput_split(reactor: Any, frame_size: int, seconds: float) -> float:
    network = NetworkKey.ephemeral(os.urandom)
    child = _Child("link", network.seed)
    handler = _Counter()
    reached: Deferred[None] = Deferred()
    handler.target, handler.reached = 1, reached
    a = LinkService(
        reactor, reactor, _credentials(network), handler, entropy=os.urandom, rng=random.Random()
    )
    a.connect("127.0.0.1", child.port)
    link = await handler.up
    payload = os.urandom(frame_size)
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        while not link.writing_paused:
            link.send(payload)
            sent += frame_size
        await link.wait_writable()
    link.send(_END)
    await reached  # the child's reply: how many bytes it got
    elapsed = time.perf_counter() - start
    await a.stop()
    child.finish()
    assert handler.bytes == len(str(sent)), "the child must have received every byte"
    return sent / elapsed / 1e6


async def raw_tcp_throughput_split(reactor: Any, frame_size: int, seconds: float) -> float:
    child = _Child("raw")
    sender = _RawSender()
    client_factory = ClientFactory()
    client_factory.protocol = lambda: sender
    reactor.connectTCP("127.0.0.1", child.port, client_factory)
    await sender.connected_
    assert sender.transport is not None
    acknowledged: Deferred[None] = Deferred()
    sender.on_data = lambda data: _fire(acknowledged)
    payload = os.urandom(frame_size)
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        while not sender.paused:
            sender.transport.write(payload)
            sent += frame_size
        await sender.wait_writable()
    sender.transport.write(_END)
    await acknowledged
    elapsed = time.perf_counter() - start
    sender.transport.loseConnection()
    child.finish()
    return sent / elapsed / 1e6


async def serve(reactor: Any, mode: str) -> None:
    """Child side: receive until END, answer with the byte count, exit when the peer leaves."""
    seed = bytes.fromhex(sys.stdin.readline().strip())
    done: Deferred[None] = Deferred()
    safety = reactor.callLater(300, _fire, done)
    if mode == "link":

        class Echo(_Counter):
            def frame_received(self, link: Link, data: bytes) -> None:
                if data == _END:
                    link.send(str(self.bytes).encode())
                else:
                    self.bytes += len(data)

            def link_lost(self, link: Link, reason: str) -> None:
                _fire(done)

        network = NetworkKey("bench", seed)
        service = LinkService(
            reactor, reactor, _credentials(network), Echo(), entropy=os.urandom, rng=random.Random()
        )
        host = service.listen(0, "127.0.0.1").getHost()
    else:
        factory = ServerFactory()
        factory.protocol = lambda: _RawSink(done)
        host = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost()
    assert isinstance(host, IPv4Address)
    print(host.port, flush=True)
    await done
    if safety.active():
        safety.cancel()


class _RawSink(Protocol):
    def __init__(self, done: Deferred[None]) -> None:
        self.done = done
        self.bytes = 0
        self.tail = b""

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        self.tail = (self.tail + data[-len(_END) :])[-len(_END) :]
        if self.tail == _END:
            assert self.transport is not None
            self.transport.write(b"A")

    def connectionLost(self, reason: object = None) -> None:
        _fire(self.done)


async def run(reactor: Any, options: argparse.Namespace) -> None:
    frame = options.frame_size
    print(f"link benchmark (loopback, one process, frame {frame} bytes, {options.seconds}s each)")
    pure = handshake_cpu_pure(options.handshakes)
    print(f"handshake CPU, pure cores:   {pure:7.3f} ms per link (both ends)")
    loop = await handshake_cpu_loopback(reactor, max(1, options.handshakes // 4))
    print(f"handshake CPU, over TCP:     {loop:7.3f} ms per link (both ends, with TCP set-up)")
    crypto = crypto_throughput(frame, options.seconds)
    print(f"AEAD frames, no sockets:     {crypto:7.0f} MB/s (encrypt + decrypt)")
    link = await link_throughput(reactor, frame, options.seconds)
    raw = await raw_tcp_throughput(reactor, frame, options.seconds)
    print("one process (sender and receiver share a thread):")
    print(f"  link throughput:           {link:7.0f} MB/s")
    print(f"  raw TCP, same path:        {raw:7.0f} MB/s   (link / raw = {link / raw:.2f})")
    link2 = await link_throughput_split(reactor, frame, options.seconds)
    raw2 = await raw_tcp_throughput_split(reactor, frame, options.seconds)
    print("two processes (receiver in a child process, as between two nodes):")
    print(f"  link throughput:           {link2:7.0f} MB/s")
    print(f"  raw TCP, same path:        {raw2:7.0f} MB/s   (link / raw = {link2 / raw2:.2f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--handshakes", type=int, default=400, help="handshakes to time")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput figure")
    parser.add_argument("--frame-size", type=int, default=64 * 1024, help="bytes per frame")
    parser.add_argument("--serve", choices=["link", "raw"], help=argparse.SUPPRESS)
    options = parser.parse_args(argv)

    async def body(reactor: Any) -> None:
        if options.serve:
            await serve(reactor, options.serve)
        else:
            await run(reactor, options)

    react(lambda reactor: Deferred.fromCoroutine(body(reactor)))


if __name__ == "__main__":
    main(sys.argv[1:])
