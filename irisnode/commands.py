"""``irisnode keygen``, ``irisnode status`` and ``irisnode lookup``: short-lived commands.

``status`` and ``lookup`` ask the local node over its relay port, through the
reserved clusters of :mod:`irisnode.system`, so they need nothing but the port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from relay import codec


class CommandError(Exception):
    """What went wrong, in words for the user."""


def keygen(args: argparse.Namespace) -> int:
    from overlay.identity import CredentialError, NetworkKey

    try:
        key = NetworkKey.generate(args.net, os.urandom)
        key.save(args.output)
    except (CredentialError, ValueError) as error:
        raise CommandError(str(error)) from None
    print(f"wrote the key of network {args.net!r} to {args.output}")
    print("give this file (and only to nodes you trust) to every node of the network")
    return 0


def ask(port: int, cluster: str, request: bytes, timeout: float) -> bytes:
    """One request to the local node's relay; the reply, or CommandError."""
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
                    raise CommandError(f"no answer within {timeout} s")
                if isinstance(packet, codec.Denied):
                    raise CommandError(f"the node refused us: {packet.reason}")
            if decoder.error is not None:
                raise CommandError(f"not an irisnode relay: {decoder.error}")


def status(args: argparse.Namespace) -> int:
    from irisnode.system import STATUS

    state = json.loads(ask(args.relay_port, STATUS, b"", args.timeout))
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        print(render_status(state))
    return 0


def render_status(state: dict[str, Any]) -> str:
    """The human view of ``irisnode status``."""
    lines = [f"irisnode {state['version']}, up {state['uptime']:.0f} s"]
    relay = state["relay"]
    lines.append(f"relay: {' and '.join(relay['addresses'])}, {relay['connections']} connections")
    overlay = state.get("overlay")
    if overlay is None:
        lines.append("overlay: none (developer mode: start with --net and --key to join a network)")
        return "\n".join(lines)
    lines.append(
        f"node {overlay['node_id']} in network {overlay['network']!r}"
        f" ({'joined' if overlay['ready'] else 'joining'}), links on port {overlay['link_port']}"
    )
    peers = overlay["peers"]
    lines.append(f"peers: {len(peers)}")
    for peer in peers:
        lines.append(
            f"  {peer['node_id']}  link {peer['link']:<4}  {'leaf ' if peer['leaf'] else '     '}"
            f" {peer['address'] or ''}"
        )
    leaf = overlay["leaf_set"]
    lines.append(f"leaf set: {len(leaf['left'])} left, {len(leaf['right'])} right")
    table = overlay["routing_table"]
    lines.append(f"routing table: {table['entries']} entries in {len(table['rows'])} rows")
    discovery = overlay.get("discovery")
    if discovery is not None:
        lines.append(
            f"discovery: on {', '.join(discovery['interfaces']) or 'no interface'},"
            f" {discovery['peers_heard']} peers heard"
        )
    return "\n".join(lines)


def lookup(args: argparse.Namespace) -> int:
    from irisnode.system import LOOKUP

    print(ask(args.relay_port, LOOKUP, args.key.encode(), args.timeout).decode())
    return 0


def _key(text: str) -> str:
    text = text.lower()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise argparse.ArgumentTypeError(f"a key is 32 hex digits: {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    from irisnode.cli import _port

    parser = argparse.ArgumentParser(prog="irisnode")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("keygen", help="create a network key file")
    make.add_argument("--net", required=True, metavar="NAME", help="the network's name")
    make.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")
    make.set_defaults(run=keygen)

    for name, run, text in (
        ("status", status, "show this node, its peers and its overlay state"),
        ("lookup", lookup, "which node is responsible for a key (routed through the overlay)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "--relay-port", type=_port, default=55555, metavar="PORT", help="the node's relay port"
        )
        command.add_argument(
            "--timeout", type=float, default=2.0, metavar="SECONDS", help="give up after this"
        )
        command.set_defaults(run=run)
        if name == "status":
            command.add_argument("--json", action="store_true", help="print JSON")
        else:
            command.add_argument("key", type=_key, help="32 hex digits (a 128-bit id)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except CommandError as error:
        print(f"irisnode {args.command}: {error}", file=sys.stderr)
        return 1
    return code
