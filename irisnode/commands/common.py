"""What the subcommands share: argument types, the relay options, one request, stopping."""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from relay import codec

if TYPE_CHECKING:
    from relay.client.blocking import BlockingConnection

DEFAULT_RELAY_PORT = 55555


class CommandError(Exception):
    """What went wrong, in words for the user (printed as ``irisnode CMD: ...``, exit 1)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps examples as written and shows each option's default, unless it has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def port_number(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {value}")
    return value


def seconds(text: str) -> float:
    """A positive, finite number of seconds (``0.5``, ``10``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def count(text: str) -> int:
    """A positive whole number."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_relay_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--relay-port",
        type=port_number,
        default=DEFAULT_RELAY_PORT,
        metavar="PORT",
        help="the node's relay port on 127.0.0.1",
    )


def add_timeout(parser: argparse.ArgumentParser, default: float, what: str) -> None:
    parser.add_argument("--timeout", type=seconds, default=default, metavar="SECONDS", help=what)


def data_argument(text: str | None) -> bytes:
    """A DATA argument as bytes: ``-`` reads all of stdin; None is empty."""
    if text is None:
        return b""
    if text == "-":
        return sys.stdin.buffer.read()
    return os.fsencode(text)


def ask(port: int, cluster: str, request: bytes, timeout: float) -> bytes:
    """One request over the relay protocol; the reply, or CommandError saying what happened.

    Written with the codec on a plain socket rather than the bindings: it is the
    cheapest way to ask once (no thread, no event loop), and unlike the bindings it
    may send an empty request, which the protocol allows.
    """
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as error:
        raise CommandError(f"no node on relay port {port}: {error.strerror or error}") from None
    with sock:
        sock.settimeout(timeout + 1.0)
        decoder = codec.client_decoder()
        sock.sendall(
            codec.Init().encode()
            + codec.Request(0, cluster, request, max(1, int(timeout * 1000))).encode()
        )
        while True:
            try:
                data = sock.recv(65536)
            except OSError as error:
                raise CommandError(f"relay port {port}: {error}") from None
            if not data:
                raise CommandError(f"the node on relay port {port} closed the connection")
            for packet in decoder.feed(data):
                if isinstance(packet, codec.Replied):
                    return packet.reply
                if isinstance(packet, codec.Faulted):
                    raise CommandError(packet.fault)
                if isinstance(packet, codec.TimedOut):
                    raise CommandError(f"no answer within {timeout:g} s")
                if isinstance(packet, codec.Denied):
                    raise CommandError(f"the node refused us: {packet.reason}")
            if decoder.error is not None:
                raise CommandError(f"not an irisnode relay: {decoder.error}")


@contextmanager
def connection(port: int) -> Iterator[BlockingConnection]:
    """A plain client connection through the blocking bindings, closed on the way out."""
    from relay.client import IrisError, blocking

    try:
        conn = blocking.connect(port)
    except IrisError as error:
        raise CommandError(f"no node on relay port {port}: {error}") from None
    try:
        yield conn
    finally:
        conn.close()


def sync(conn: BlockingConnection, timeout: float = 1.0) -> None:
    """Return once the node has handled everything ``conn`` sent so far.

    The node handles one connection's packets in order, so the answer to a request
    (any answer: irisnode's ``$node.status`` replies at once) comes after them. A
    node without that service answers with a timeout, which says the same, later;
    a node that went away has nothing left to handle.
    """
    from irisnode.system import STATUS
    from relay.client import ConnectionClosed, RemoteFault, Timeout

    with suppress(RemoteFault, Timeout, ConnectionClosed):
        conn.request(STATUS, b"sync", timeout)


class Stop:
    """Set by SIGINT, SIGTERM (inside :meth:`signals`) or the command itself; what
    long-running commands wait on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.code = 0
        self.reason = ""

    def set(self, code: int = 0, reason: str = "") -> None:
        if not self.event.is_set():
            self.code, self.reason = code, reason
            self.event.set()

    def wait(self, closed: Any = None, poll: float = 0.2) -> int:
        """Block until set (or until ``closed()`` is true: the node went away); the exit code."""
        while not self.event.wait(poll):
            if closed is not None and closed():
                self.set(1, "the node closed the connection")
        if self.reason:
            print(self.reason, file=sys.stderr)
        return self.code

    @contextmanager
    def signals(self) -> Iterator[None]:
        """Within: SIGINT and SIGTERM set this (exit code 0) instead of ending the process.

        Enter it before saying you are ready, so a signal right after that line is
        caught. Only the main thread can catch signals; elsewhere this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, lambda signum, frame: self.set())
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
