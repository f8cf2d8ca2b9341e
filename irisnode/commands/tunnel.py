"""``irisnode tunnel``: stdin and stdout through a tunnel to one member of a cluster."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from irisnode.commands.common import CommandError, add_relay_port, add_timeout, connection, seconds

DESCRIPTION = (
    "Open a tunnel to one member of CLUSTER, send what comes on stdin and write what "
    "comes back to stdout, like nc. Each read from stdin (up to 64 KiB) travels as one "
    "tunnel message, in order. When stdin ends, the command goes on printing what arrives "
    "until the far side closes the tunnel or nothing came for --linger seconds, then "
    "closes it."
)
EXAMPLE = (
    "  irisnode serve echo --echo &\n"
    "  echo hello | irisnode tunnel echo\n"
    "  irisnode tunnel files --linger 30 < request.bin > answer.bin"
)

CHUNK = 64 * 1024


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster", metavar="CLUSTER", help="the cluster to open a tunnel to")
    add_relay_port(parser)
    add_timeout(parser, 5.0, "how long to wait for a member to accept the tunnel")
    parser.add_argument(
        "--linger",
        type=seconds,
        default=1.0,
        metavar="SECONDS",
        help="after stdin ends, stop once nothing arrived for this long",
    )


def run(args: argparse.Namespace) -> int:
    from relay.client import ConnectionClosed, Timeout

    with connection(args.relay_port) as conn:
        try:
            tunnel = conn.tunnel(args.cluster, args.timeout)
        except Timeout:
            raise CommandError(f"no member of {args.cluster!r} took the tunnel") from None
        stdin_done = threading.Event()
        failure: list[str] = []

        def pump_stdin() -> None:
            try:
                while chunk := os.read(sys.stdin.fileno(), CHUNK):
                    tunnel.send(chunk)
            except ConnectionClosed:
                pass
            except OSError as error:
                failure.append(f"reading stdin: {error}")
            finally:
                stdin_done.set()

        threading.Thread(target=pump_stdin, name="tunnel-stdin", daemon=True).start()
        out = sys.stdout.buffer
        try:
            while True:
                try:
                    message = tunnel.recv(args.linger if stdin_done.is_set() else 0.2)
                except Timeout:
                    if stdin_done.is_set():
                        break
                    continue
                out.write(message)
                out.flush()
        except ConnectionClosed:
            pass  # the far side closed: everything it sent has been written
        if not tunnel.closed:
            tunnel.close()
    if failure:
        raise CommandError(failure[0])
    return 0
