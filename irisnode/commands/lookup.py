"""``irisnode lookup``: which node the overlay routes a key (or a group's key) to."""

from __future__ import annotations

import argparse

from irisnode.commands.common import add_relay_port, add_timeout, ask

DESCRIPTION = (
    "Route a probe for a 128-bit key through the overlay and print the id of the node that "
    "answered as responsible for it. The key is given as 32 hex digits, or as the key of a "
    "cluster or topic name (the key its Scribe tree is rooted at). Run it on every node: "
    "the answers must agree."
)
EXAMPLE = (
    "  irisnode lookup 0123456789abcdef0123456789abcdef\n"
    "  irisnode lookup --cluster echo\n"
    "  irisnode lookup --topic news --relay-port 55600"
)


def key_argument(text: str) -> str:
    text = text.lower()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise argparse.ArgumentTypeError(f"a key is 32 hex digits: {text!r}")
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("key", nargs="?", type=key_argument, help="32 hex digits (a 128-bit id)")
    which.add_argument("--cluster", metavar="NAME", help="the key of this cluster's tree")
    which.add_argument("--topic", metavar="NAME", help="the key of this topic's tree")
    add_relay_port(parser)
    add_timeout(parser, 2.0, "give up after this long")


def key_of(args: argparse.Namespace) -> str:
    """The 32 hex digits to look up: given, or derived from a group name."""
    if args.key is not None:
        key: str = args.key
        return key
    from overlay.ids import format_id, key_for

    kind, name = ("cluster", args.cluster) if args.cluster is not None else ("topic", args.topic)
    return format_id(key_for(kind, name))


def run(args: argparse.Namespace) -> int:
    from irisnode.system import LOOKUP

    print(ask(args.relay_port, LOOKUP, key_of(args).encode(), args.timeout).decode())
    return 0
