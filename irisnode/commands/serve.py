"""``irisnode serve``: be a member of a cluster and answer its requests."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from irisnode.commands.common import (
    CommandError,
    Stop,
    add_relay_port,
    add_timeout,
    count,
    sync,
)

if TYPE_CHECKING:
    from relay.client.blocking import BlockingTunnel

DESCRIPTION = (
    "Register as a member of CLUSTER and answer its requests until interrupted: with "
    "--echo the reply is the request (tunnels opened to the cluster are echoed too); with "
    "--exec CMD every request runs CMD (split like a shell would, but run without one) "
    "with the request on its stdin, and its stdout is the reply. A command that exits "
    "non-zero, or runs past --timeout (then it is killed), answers with a fault: its "
    "stderr, or what happened. Requests are handled concurrently (up to 16 at once)."
)
EXAMPLE = (
    "  irisnode serve echo --echo\n"
    "  irisnode serve upper --exec 'tr a-z A-Z'\n"
    "  irisnode serve shell --exec 'sh -c \"date; uptime\"' --count 1"
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster", metavar="CLUSTER", help="the cluster to join")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--echo", action="store_true", help="reply with the request itself")
    how.add_argument("--exec", metavar="CMD", dest="command", help="reply with CMD's output")
    parser.add_argument("--count", type=count, metavar="N", help="stop after answering N requests")
    add_timeout(parser, 10.0, "kill CMD after this long")
    add_relay_port(parser)


def run_command(argv: list[str], request: bytes, timeout: float) -> bytes:
    """CMD's stdout for ``request`` on its stdin; RuntimeError (the fault) if it fails."""
    try:
        done = subprocess.run(argv, input=request, capture_output=True, timeout=timeout)
    except OSError as error:
        raise RuntimeError(f"cannot run {argv[0]}: {error.strerror or error}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{argv[0]} took longer than {timeout:g} s") from None
    if done.returncode != 0:
        text = done.stderr.decode(errors="replace").strip()
        raise RuntimeError(text or f"{argv[0]} exited with status {done.returncode}")
    return done.stdout


def run(args: argparse.Namespace) -> int:
    from relay.client import ConnectionClosed, IrisError, blocking

    argv = shlex.split(args.command) if args.command is not None else None
    if argv is not None and not argv:
        raise CommandError("--exec needs a command")
    stop = Stop()
    answered = 0
    lock = threading.Lock()

    class Handler(blocking.ServiceHandler):
        def handle_request(self, request: bytes) -> bytes:
            nonlocal answered
            reply = request if argv is None else run_command(argv, request, args.timeout)
            with lock:
                answered += 1
                if args.count is not None and answered >= args.count:
                    stop.set()
            return reply

        def handle_tunnel(self, tunnel: BlockingTunnel) -> None:
            if argv is not None:
                tunnel.close()
                return
            try:
                while True:
                    tunnel.send(tunnel.recv())
            except ConnectionClosed:
                pass

        def handle_drop(self, reason: str) -> None:
            stop.set(1, f"irisnode serve: the node dropped us: {reason}")

    try:
        service = blocking.register(args.cluster, Handler(), args.relay_port)
    except IrisError as error:
        raise CommandError(
            f"cannot join {args.cluster!r} on relay port {args.relay_port}: {error}"
        ) from None
    with service, stop.signals():
        print(
            f"serving {args.cluster} on relay port {args.relay_port} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        code = stop.wait(closed=lambda: service.connection.closed)
        if not service.connection.closed:
            sync(service.connection)  # the last reply reaches the node before our goodbye
        return code
