"""``irisnode request``: one request to a cluster, the reply on stdout."""

from __future__ import annotations

import argparse
import sys

from irisnode.commands.common import add_relay_port, add_timeout, ask, data_argument

DESCRIPTION = (
    "Send one request to a member of CLUSTER and print its reply. DATA is the request "
    "('-' reads it from stdin; without DATA the request is empty). Exits 1 with the "
    "service's fault text, or when no reply came within --timeout."
)
EXAMPLE = (
    '  irisnode request echo "hello"\n'
    "  date | irisnode request echo - --timeout 5\n"
    "  irisnode request '$node.status' status | jq .uptime"
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster", metavar="CLUSTER", help="the cluster to ask")
    parser.add_argument("data", metavar="DATA", nargs="?", help="the request ('-': stdin)")
    add_relay_port(parser)
    add_timeout(parser, 2.0, "how long the node waits for the reply")
    parser.add_argument(
        "--raw", action="store_true", help="write the reply exactly, with no newline added"
    )


def run(args: argparse.Namespace) -> int:
    reply = ask(args.relay_port, args.cluster, data_argument(args.data), args.timeout)
    if not args.raw and not reply.endswith(b"\n"):
        reply += b"\n"
    sys.stdout.buffer.write(reply)
    sys.stdout.flush()
    return 0
