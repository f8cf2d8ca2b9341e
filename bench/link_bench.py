"""Link benchmark: handshake CPU, and links carrying traffic between two namespaces.

    python -m bench.link_bench [--seconds S] [--rounds R] [--handshakes N] [--bulk-mib M]
                               [--fragment-kib K] [--socket-buffer-kib K] [--json PATH]

Figures:

* **handshake CPU** per link, both ends, ``time.process_time()`` over N links:
  pure cores back to back, then real links over loopback TCP (connect,
  authenticate, close), both ends in this process;
* between **two network namespaces** (root; built and removed by
  :class:`tests.lan.Lan`, nothing touches the host's interfaces), a sender
  process in one and a receiver process in the other, on one link:

  - **throughput** of bulk messages (1 MiB each) for S seconds, and raw TCP
    writes of the same chunks on the same path, alternating for ``--rounds``
    rounds: MB/s (10^6 bytes), their ratio (median of the rounds), and the CPU
    seconds per GB of each end (user + system; what the rate would be if the
    busier end had a core to itself, less sensitive to a shared machine's load);
  - a **16 MiB message**: from ``send`` until the receiver's control answer
    comes back (3 times, the median);
  - **heartbeat delay under bulk**: a 64-byte control message every 10 ms,
    stamped with ``time.monotonic()`` (one clock for both namespaces: one
    machine), while M MiB (default 100) of bulk messages cross the same link;
    the receiver records each heartbeat's one-way delay. Also idle (no bulk),
    and, for comparison, with the heartbeats sent as bulk (FIFO behind the
    data, what a link without traffic classes would do).

Each sending or receiving end is this module run with ``--send``/``--serve``
inside a namespace; they report as JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LINK_PORT = 47110
RAW_PORT = 47111
CHUNK = 1 << 20
HEARTBEAT_EVERY = 0.010

_STAMP = struct.Struct(">cd")
Record = dict[str, Any]


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), file=sys.stderr, flush=True)


def _fire(deferred: Any, value: Any = None) -> None:
    if not deferred.called:
        deferred.callback(value)


FRAGMENT = 0
"""Fragment size for both ends (``--fragment-kib``); 0: the library's default."""
SOCKET_BUFFER = -1
"""Kernel buffers of each link (``--socket-buffer-kib``); -1: the library's default."""


def _service(reactor: Any, handler: Any, key_file: str | None = None) -> Any:
    from overlay.identity import Credentials, NetworkKey, NodeIdentity
    from overlay.link_frames import LinkLimits
    from overlay.link_twisted import LinkService

    network = NetworkKey.load(key_file) if key_file else NetworkKey("bench", bytes(32))
    credentials = Credentials.for_network(network, NodeIdentity.generate(os.urandom))
    return LinkService(
        reactor,
        reactor,
        credentials,
        handler,
        entropy=os.urandom,
        rng=random.Random(),
        limits=LinkLimits(fragment_size=FRAGMENT) if FRAGMENT else LinkLimits(),
        **({} if SOCKET_BUFFER < 0 else {"socket_buffer": SOCKET_BUFFER}),
        handshake_rate=1e6,  # the handshake figure sets up links from one source in a row
    )


class _Handler:
    """A LinkHandler that hands the first link and every message to whoever waits."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.up: Deferred[Any] = Deferred()
        self.answers: list[bytes] = []
        self.waiting: Deferred[bytes] | None = None

    def link_established(self, link: Any) -> None:
        _fire(self.up, link)

    def frame_received(self, link: Any, data: bytes) -> None:
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(data)
        else:
            self.answers.append(data)

    def link_lost(self, link: Any, reason: str) -> None:
        pass

    def link_writable(self, link: Any) -> None:
        pass

    def answer(self) -> Any:
        from twisted.internet.defer import Deferred, succeed

        if self.answers:
            return succeed(self.answers.pop(0))
        self.waiting = Deferred()
        return self.waiting


# -- handshake CPU (loopback, one process) ------------------------------------------------


def handshake_cpu_pure(count: int) -> float:
    """CPU ms per link (both ends) for the handshake alone, cores back to back."""
    from overlay.identity import Credentials, NetworkKey, NodeIdentity
    from overlay.link import Established, LinkCore, Role, Transmit

    network = NetworkKey.ephemeral(os.urandom)
    a, b = (Credentials.for_network(network, NodeIdentity.generate(os.urandom)) for _ in "ab")
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


async def handshake_cpu_loopback(reactor: Any, count: int) -> float:
    """CPU ms per link (both ends, TCP set-up and teardown included) over loopback."""
    server = _service(reactor, _Handler())
    port = server.listen(0, "127.0.0.1").getHost().port
    start = time.process_time()
    for _ in range(count):
        handler = _Handler()
        client = _service(reactor, handler)
        client.connect("127.0.0.1", port)
        await handler.up
        await client.stop()
    elapsed = time.process_time() - start
    await server.stop()
    return elapsed * 1000 / count


# -- the receiving end (in a namespace) ---------------------------------------------------


async def serve(reactor: Any, key_file: str) -> None:
    """Count bulk bytes, time heartbeats, answer acks and reports; exit when told."""
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Protocol, ServerFactory
    from zope.interface import implementer

    done: Deferred[None] = Deferred()
    safety = reactor.callLater(900, _fire, done)

    class Receiver(_Handler):
        def __init__(self) -> None:
            super().__init__()
            self.received = 0
            self.delays: list[float] = []
            self.cpu = time.process_time()

        def link_established(self, link: Any) -> None:
            self.received, self.delays, self.cpu = 0, [], time.process_time()

        def frame_received(self, link: Any, data: bytes) -> None:
            kind = data[:1]
            if kind == b"H":  # a heartbeat, control or bulk
                _, stamp = _STAMP.unpack_from(data)
                self.delays.append(time.monotonic() - stamp)
            elif kind == b"R":  # report and reset
                cpu = time.process_time()
                report = {"bytes": self.received, "delays": self.delays, "cpu_s": cpu - self.cpu}
                link.send(json.dumps(report).encode())
                self.received, self.delays, self.cpu = 0, [], cpu
            elif kind == b"Q":
                reactor.callLater(0.2, _fire, done)
            else:
                self.received += len(data)
                if kind == b"A":  # answer at once: the sender times the message
                    link.send(b"ack")

    _service(reactor, Receiver(), key_file).listen(LINK_PORT, "0.0.0.0")

    @implementer(IHalfCloseableProtocol)
    class Sink(Protocol):
        received = 0
        cpu = 0.0

        def connectionMade(self) -> None:
            self.cpu = time.process_time()

        def dataReceived(self, data: bytes) -> None:
            self.received += len(data)

        def readConnectionLost(self) -> None:
            assert self.transport is not None
            cpu = time.process_time() - self.cpu
            self.transport.write(f"{self.received} {cpu}".encode())
            self.transport.loseConnection()

        def writeConnectionLost(self) -> None:
            pass

    factory = ServerFactory()
    factory.protocol = Sink
    reactor.listenTCP(RAW_PORT, factory, interface="0.0.0.0")
    _emit(listening=True)
    await done
    if safety.active():
        safety.cancel()


# -- the sending end (in the other namespace) ---------------------------------------------


async def _push_bulk(link: Any, total: int, marker: bytes = b"B") -> int:
    """Send ``total`` bytes of bulk messages as fast as the link takes them."""
    chunk = marker + os.urandom(CHUNK - 1)
    sent = 0
    while sent < total:
        while not link.congested and sent < total:
            link.send(chunk, bulk=True)
            sent += len(chunk)
        await link.wait_writable()
    return sent


async def _report(link: Any, handler: _Handler) -> Record:
    link.send(b"R")
    report: Record = json.loads(await handler.answer())
    return report


def _delays(report: Record) -> Record:
    delays = sorted(report["delays"])
    if not delays:
        return {"count": 0}
    return {
        "count": len(delays),
        "median_ms": 1000 * statistics.median(delays),
        "p99_ms": 1000 * delays[min(len(delays) - 1, int(0.99 * len(delays)))],
        "max_ms": 1000 * delays[-1],
    }


async def _heartbeats_during(reactor: Any, link: Any, work: Any, *, bulk: bool) -> None:
    """Send a stamped heartbeat every 10 ms until ``work`` (a coroutine) is done."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall

    def beat() -> None:
        link.send(_STAMP.pack(b"H", time.monotonic()) + bytes(55), bulk=bulk)

    loop = LoopingCall(beat)
    loop.clock = reactor
    loop.start(HEARTBEAT_EVERY)
    try:
        await Deferred.fromCoroutine(work)
    finally:
        loop.stop()


async def _linked(reactor: Any, options: argparse.Namespace) -> tuple[Any, Any, _Handler]:
    handler = _Handler()
    service = _service(reactor, handler, options.key)
    service.connect(options.host, LINK_PORT)
    return service, await handler.up, handler


async def send_link_throughput(reactor: Any, options: argparse.Namespace) -> Record:
    """Bulk messages for S seconds, until the receiver counted them all."""
    service, link, handler = await _linked(reactor, options)
    chunk = b"B" + os.urandom(CHUNK - 1)
    sent = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < options.seconds:
        while not link.congested:
            link.send(chunk, bulk=True)
            sent += CHUNK
        await link.wait_writable()
    sent += await _push_bulk(link, CHUNK, marker=b"A")  # the last one is answered
    assert await handler.answer() == b"ack"
    report = await _report(link, handler)
    counted = report["bytes"]
    elapsed = time.perf_counter() - start
    await service.stop()
    if counted != sent:
        raise RuntimeError(f"the receiver got {counted} bytes of {sent}")
    return {
        "mb_per_s": sent / elapsed / 1e6,
        "bytes": sent,
        "seconds": elapsed,
        "cpu_s": time.process_time() - cpu,
        "receiver_cpu_s": report["cpu_s"],
    }


async def send_link(reactor: Any, options: argparse.Namespace) -> Record:
    """A 16 MiB message, then heartbeat delays; finally tells the receiver to quit."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    service, link, handler = await _linked(reactor, options)
    result: Record = {}

    # One 16 MiB message, until the receiver's answer is back.
    times = []
    message = b"A" + os.urandom((16 << 20) - 1)
    for _ in range(3):
        begin = time.perf_counter()
        link.send(message, bulk=True)
        assert await handler.answer() == b"ack"
        times.append(time.perf_counter() - begin)
    await _report(link, handler)
    result["message_16mib"] = {"seconds": times, "median_s": statistics.median(times)}

    # Heartbeat delays: idle, under bulk as control, under bulk as bulk (no priority).
    total = options.bulk_mib << 20

    async def idle() -> None:
        await deferLater(reactor, 1.0)

    async def bulk_data() -> None:
        await _push_bulk(link, total - CHUNK)
        await _push_bulk(link, CHUNK, marker=b"A")
        assert await handler.answer() == b"ack"

    for name, work, as_bulk in (
        ("idle", idle, False),
        ("under_bulk", bulk_data, False),
        ("under_bulk_sent_as_bulk", bulk_data, True),
    ):
        begin = time.perf_counter()
        await _heartbeats_during(reactor, link, work(), bulk=as_bulk)
        seconds = time.perf_counter() - begin
        report = await _report(link, handler)
        result[f"heartbeats_{name}"] = {**_delays(report), "seconds": seconds}
    result["given_up"] = dict(service.given_up)
    link.send(b"Q")
    await Deferred.fromCoroutine(_drain(reactor))
    await service.stop()
    return result


async def _drain(reactor: Any) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.1)


async def send_raw(reactor: Any, options: argparse.Namespace) -> Record:
    """Raw TCP writes of the same 1 MiB chunks on the same path, as fast as TCP takes them."""
    from bench.raw_tcp import push

    sent, answer, elapsed, cpu = await push(
        reactor, options.host, RAW_PORT, os.urandom(CHUNK), options.seconds
    )
    count, receiver_cpu = answer.split()
    if int(count) != sent:
        raise RuntimeError(f"the receiver got {int(count)} bytes of {sent}")
    return {
        "mb_per_s": sent / elapsed / 1e6,
        "bytes": sent,
        "seconds": elapsed,
        "cpu_s": cpu,
        "receiver_cpu_s": float(receiver_cpu),
    }


def cpu_bound_mb_per_s(result: Record) -> float:
    """MB/s if the busier end had a core to itself: bytes over its CPU seconds (user +
    system). Less sensitive to other load on a shared machine than wall-clock figures."""
    busier: float = max(result["cpu_s"], result["receiver_cpu_s"])
    return int(result["bytes"]) / busier / 1e6


# -- the orchestrator --------------------------------------------------------------------


def between_namespaces(options: argparse.Namespace) -> Record:
    from tests.lan import Lan

    python = [sys.executable, "-m", "bench.link_bench"]
    with Lan(2, tag="bench-lnk") as lan:
        key = str(lan.keygen())
        host = lan.address(1)
        receiver = lan.spawn(1, [*python, "--serve", "--key", key])
        receiver.wait_for_log(lambda r: bool(r.get("listening")), 30)
        common = ["--host", host, "--key", key, "--seconds", str(options.seconds)]
        common += ["--bulk-mib", str(options.bulk_mib), "--fragment-kib", str(options.fragment_kib)]
        common += ["--socket-buffer-kib", str(options.socket_buffer_kib)]
        timeout = 6 * options.seconds + options.bulk_mib / 10 + 120

        def run(mode: str) -> Record:
            sender = lan.spawn(0, [*python, "--send", mode, *common])
            result: Record = sender.wait_for_log(lambda r: "result" in r, timeout)["result"]
            return result

        rounds = [
            {"raw": run("raw"), "link": run("link-throughput")} for _ in range(options.rounds)
        ]
        link = run("link")
        receiver.popen.wait(timeout=10)
        return {"rounds": rounds, "link": link}


def report(document: Record) -> str:
    lines = [
        f"handshake CPU, pure cores:          {document['handshake_pure_ms']:8.3f} ms per link",
        f"handshake CPU, loopback TCP:        {document['handshake_tcp_ms']:8.3f} ms per link",
    ]
    ns = document.get("namespaces")
    if ns is None:
        lines.append(f"between namespaces: skipped ({document.get('skipped')})")
        return "\n".join(lines)
    link = ns["link"]
    lines.append("between two namespaces (veth + bridge), one link; raw TCP and link alternate:")
    for k, pair in enumerate(ns["rounds"]):
        mine, raw = pair["link"]["mb_per_s"], pair["raw"]["mb_per_s"]
        lines.append(
            f"  round {k + 1}: bulk 1 MiB messages {mine:6.0f} MB/s, raw TCP same path and "
            f"chunks {raw:6.0f} MB/s, link / raw = {mine / raw:.2f}"
        )
    ratio = statistics.median(p["link"]["mb_per_s"] / p["raw"]["mb_per_s"] for p in ns["rounds"])
    lines.append(f"  link / raw, median of rounds:     {ratio:8.2f}        (target >= 0.4)")
    for name in ("link", "raw"):
        runs = [p[name] for p in ns["rounds"]]
        sender = statistics.median(1e9 * r["cpu_s"] / r["bytes"] for r in runs)
        receiver = statistics.median(1e9 * r["receiver_cpu_s"] / r["bytes"] for r in runs)
        bound = statistics.median(cpu_bound_mb_per_s(r) for r in runs)
        lines.append(
            f"  {name + ' CPU per GB:':<33} sender {sender:5.2f} s, receiver {receiver:5.2f} s"
            f"  -> {bound:5.0f} MB/s with a core per end"
        )
    cpu_ratio = statistics.median(
        cpu_bound_mb_per_s(p["link"]) / cpu_bound_mb_per_s(p["raw"]) for p in ns["rounds"]
    )
    lines += [
        f"  link / raw by CPU, median:        {cpu_ratio:8.2f}",
        f"  one 16 MiB message, send to ack:  {1000 * link['message_16mib']['median_s']:8.1f} ms"
        f"   ({16 * 1.048576 / link['message_16mib']['median_s']:.0f} MB/s)",
    ]
    for key, label in (
        ("heartbeats_idle", "heartbeat delay, idle link:"),
        ("heartbeats_under_bulk", f"heartbeat delay, {document['bulk_mib']} MiB bulk:"),
        ("heartbeats_under_bulk_sent_as_bulk", "  same, heartbeats sent as bulk:"),
    ):
        h = link[key]
        lines.append(
            f"  {label:<33}{h['max_ms']:8.1f} ms max, p99 {h['p99_ms']:.1f}, "
            f"median {h['median_ms']:.2f} ({h['count']} beats, {h['seconds']:.1f} s)"
            + ("   (target <= 100)" if key == "heartbeats_under_bulk" else "")
        )
    lines.append(f"  messages given up:                {link['given_up'] or 'none'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput figure")
    parser.add_argument("--handshakes", type=int, default=200, help="links set up for the CPU")
    parser.add_argument("--bulk-mib", type=int, default=100, help="bulk data under heartbeats")
    parser.add_argument("--fragment-kib", type=int, default=0, help="fragment size (0: default)")
    parser.add_argument(
        "--socket-buffer-kib", type=int, default=-1, help="link socket buffers (0: autotuned)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="raw/link throughput pairs")
    parser.add_argument(
        "--send", choices=["link", "link-throughput", "raw"], help=argparse.SUPPRESS
    )
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    global FRAGMENT, SOCKET_BUFFER
    FRAGMENT = options.fragment_kib * 1024
    SOCKET_BUFFER = options.socket_buffer_kib * 1024 if options.socket_buffer_kib >= 0 else -1

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    if options.serve or options.send:

        async def end(reactor: Any) -> None:
            if options.serve:
                await serve(reactor, options.key)
            else:
                senders = {
                    "link": send_link,
                    "link-throughput": send_link_throughput,
                    "raw": send_raw,
                }
                _emit(result=await senders[options.send](reactor, options))

        react(lambda reactor: Deferred.fromCoroutine(end(reactor)))  # exits

    from tests.lan import netns_available

    document: Record = {"bulk_mib": options.bulk_mib, "seconds": options.seconds}
    document["handshake_pure_ms"] = handshake_cpu_pure(options.handshakes)

    async def loopback(reactor: Any) -> None:
        document["handshake_tcp_ms"] = await handshake_cpu_loopback(
            reactor, max(1, options.handshakes // 4)
        )

    try:
        react(lambda reactor: Deferred.fromCoroutine(loopback(reactor)))
    except SystemExit as exit_:
        if exit_.code:
            raise
    reason = netns_available()
    if reason is None:
        document["namespaces"] = between_namespaces(options)
    else:
        document["skipped"] = reason
    print(report(document))
    if options.json:
        options.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
