"""``irisnode broadcast``: one message to every member of a cluster."""

from __future__ import annotations

import argparse

from irisnode.commands.common import CommandError, add_relay_port, connection, data_argument

DESCRIPTION = (
    "Send DATA to every member of CLUSTER ('-' reads it from stdin). Best effort: there "
    "is no answer, and a cluster without members gets nothing."
)
EXAMPLE = '  irisnode broadcast workers "reload"\n  irisnode broadcast workers - < config.json'


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster", metavar="CLUSTER", help="the cluster whose members get it")
    parser.add_argument("data", metavar="DATA", help="the message ('-': stdin)")
    add_relay_port(parser)


def run(args: argparse.Namespace) -> int:
    message = data_argument(args.data)
    if not message:
        raise CommandError("the message is empty: the relay protocol's bindings refuse that")
    with connection(args.relay_port) as conn:
        conn.broadcast(args.cluster, message)
    return 0
