"""``irisnode bench``: the relay benchmark of ``bench/`` behind one subcommand."""

from __future__ import annotations

import argparse
from typing import Any

from irisnode.commands.common import CommandError, port_number

DESCRIPTION = (
    "Benchmark a node: request/reply, broadcast, publish, tunnels, the node's CPU per "
    "operation and its memory (docs/benchmarks.md). Without --relay-port it starts a node "
    "of its own; with it, it measures the node already running there (any node that speaks "
    "the relay protocol). Every other option goes to the benchmark itself: run "
    "'irisnode bench --list' for the scenarios. The benchmark lives in the source tree "
    "(bench/), so run this from a checkout."
)
EXAMPLE = (
    "  irisnode bench --quick\n"
    "  irisnode bench --relay-port 55555 --scenarios 'rr-c1-*,pub-s1' --duration 2"
)
PASS_THROUGH = True
"""Options this parser does not know go to the benchmark's own parser."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--relay-port",
        type=port_number,
        metavar="PORT",
        help="measure the node on this relay port (default: start a node to measure)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from bench.relay_bench import main
    except ImportError:
        raise CommandError(
            "the benchmark is not installed with irisnode: run this from a source checkout"
        ) from None
    argv: list[Any] = list(args.rest)
    if args.relay_port is not None:
        argv = ["--relay", f"127.0.0.1:{args.relay_port}", *argv]
    code: int = main(argv)
    return code
