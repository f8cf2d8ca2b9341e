"""The ``irisnode`` subcommands: short-lived programs that talk to a node.

Each subcommand is one module here with the same four names: ``DESCRIPTION``
and ``EXAMPLE`` (for its ``--help``), ``configure(parser)`` and
``run(args) -> int``; its one-line summary is in :data:`COMMANDS`. Everything but
``keygen`` speaks the relay protocol to the node on ``--relay-port``, so the
commands work against any node that speaks it, ours or not.

Only the chosen command's module is imported: ``irisnode status`` pays for
nothing else.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import textwrap
from collections.abc import Sequence

from irisnode.commands.common import CommandError, HelpFormatter
from relay.client.errors import IrisError

COMMANDS: dict[str, str] = {
    "status": "show this node, its peers, its groups and its counters",
    "lookup": "which node the overlay names responsible for a key, cluster or topic",
    "request": "send one request to a cluster and print the reply",
    "broadcast": "send a message to every member of a cluster",
    "publish": "publish events on a topic",
    "subscribe": "print the events of topics as they come",
    "serve": "answer the requests of a cluster (echo, or a command per request)",
    "tunnel": "connect stdin and stdout to a member of a cluster, like nc",
    "keygen": "create a network key file",
    "bench": "benchmark a node (the relay benchmark of bench/)",
}
"""Subcommand names, in the order ``irisnode --help`` lists them, and what each does."""


def suggestion(word: str) -> str:
    """A hint for a mistyped command: ``did you mean 'status'?`` or the list of commands."""
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return "commands: " + ", ".join(COMMANDS)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``irisnode NAME``: its description, options and an example."""
    module = importlib.import_module(f"irisnode.commands.{name}")
    parser = argparse.ArgumentParser(
        prog=f"irisnode {name}",
        description=textwrap.fill(module.DESCRIPTION, 79),
        epilog=f"example:\n{module.EXAMPLE}",
        formatter_class=HelpFormatter,
    )
    module.configure(parser)
    parser.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str]) -> int:
    """``irisnode NAME ARGS...``: parse with NAME's own parser, run, report errors in one line."""
    name, *rest = argv
    parser = build_parser(name)
    module = sys.modules[f"irisnode.commands.{name}"]
    if getattr(module, "PASS_THROUGH", False):
        args, unknown = parser.parse_known_args(rest)
        args.rest = unknown
    else:
        args = parser.parse_args(rest)
    try:
        code: int = args.run(args)
    except (CommandError, IrisError) as error:
        print(f"irisnode {name}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
