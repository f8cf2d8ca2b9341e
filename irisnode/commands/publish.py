"""``irisnode publish``: events on a topic, from the command line or one per line of stdin."""

from __future__ import annotations

import argparse
import os
import sys

from irisnode.commands.common import add_relay_port, connection

DESCRIPTION = (
    "Publish DATA as one event on TOPIC. With DATA '-' (or no DATA), every line of stdin "
    "is one event (without its newline; empty lines are skipped). Every subscriber of the "
    "topic at that moment gets each event once."
)
EXAMPLE = '  irisnode publish news "hello"\n  tail -f /var/log/syslog | irisnode publish syslog -'


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", metavar="TOPIC", help="the topic to publish on")
    parser.add_argument("data", metavar="DATA", nargs="?", default="-", help="the event")
    add_relay_port(parser)


def run(args: argparse.Namespace) -> int:
    with connection(args.relay_port) as conn:
        if args.data != "-":
            conn.publish(args.topic, os.fsencode(args.data))
            return 0
        for line in sys.stdin.buffer:
            event = line.rstrip(b"\r\n")
            if event:
                conn.publish(args.topic, event)
    return 0
