"""``irisnode subscribe``: print the events of topics as they arrive."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
from collections.abc import Callable

from irisnode.commands.common import Stop, add_relay_port, connection, count, sync

DESCRIPTION = (
    "Subscribe to every TOPIC and print each event as it arrives, in arrival order: the "
    "event alone (prefixed with '[TOPIC] ' when there are several topics), or with --json "
    'one object per line: {"topic": ..., "data": ...}, where an event that is not UTF-8 '
    'text comes as "data_base64" instead. Runs until interrupted, or until --count events.'
)
EXAMPLE = (
    "  irisnode subscribe news\n"
    "  irisnode subscribe news weather --json | jq -r .data\n"
    "  irisnode subscribe alerts --count 1   # wait for one event"
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topics", metavar="TOPIC", nargs="+", help="a topic to subscribe to")
    parser.add_argument("--json", action="store_true", help="one JSON object per event")
    parser.add_argument("--count", type=count, metavar="N", help="stop after N events")
    add_relay_port(parser)


def format_event(topic: str, event: bytes, *, as_json: bool, with_topic: bool) -> bytes:
    """One output line for an event."""
    if as_json:
        record: dict[str, str] = {"topic": topic}
        try:
            record["data"] = event.decode("utf-8")
        except UnicodeDecodeError:
            record["data_base64"] = base64.b64encode(event).decode("ascii")
        return json.dumps(record, ensure_ascii=False).encode() + b"\n"
    prefix = f"[{topic}] ".encode(errors="surrogateescape") if with_topic else b""
    return prefix + event + b"\n"


def run(args: argparse.Namespace) -> int:
    from relay.client import Limits

    stop = Stop()
    lock = threading.Lock()
    seen = 0
    out = sys.stdout.buffer

    def printer(topic: str) -> Callable[[bytes], None]:
        def handle(event: bytes) -> None:
            nonlocal seen
            with lock:
                if stop.event.is_set():
                    return
                out.write(format_event(topic, event, as_json=args.json, with_topic=many))
                out.flush()
                seen += 1
                if args.count is not None and seen >= args.count:
                    stop.set()

        return handle

    many = len(args.topics) > 1
    in_order = Limits(handlers=1)  # one callback at a time: events print in arrival order
    with connection(args.relay_port) as conn, stop.signals():
        for topic in dict.fromkeys(args.topics):
            conn.subscribe(topic, printer(topic), in_order)
        sync(conn)  # subscribed for real before we say so
        print(
            f"subscribed to {', '.join(args.topics)} on relay port {args.relay_port}",
            file=sys.stderr,
            flush=True,
        )
        return stop.wait(closed=lambda: conn.closed)
