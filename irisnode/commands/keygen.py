"""``irisnode keygen``: a new network key file."""

from __future__ import annotations

import argparse
import os

from irisnode.commands.common import CommandError

DESCRIPTION = (
    "Create the key of a new network and write it to FILE, readable by its owner only "
    "(mode 0600). Every node of the network needs a copy (irisnode --net NAME --key FILE); "
    "whoever holds it can admit nodes, so give it only to nodes you trust. An existing "
    "file is never overwritten."
)
EXAMPLE = "  irisnode keygen --net office -o office.key\n  irisnode --net office --key office.key"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", required=True, metavar="NAME", help="the network's name")
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where to write the key"
    )


def run(args: argparse.Namespace) -> int:
    from overlay.identity import CredentialError, NetworkKey

    try:
        key = NetworkKey.generate(args.net, os.urandom)
        key.save(args.output)
    except (CredentialError, ValueError) as error:
        raise CommandError(str(error)) from None
    print(f"wrote the key of network {args.net!r} to {args.output}")
    print("give this file (and only to nodes you trust) to every node of the network")
    return 0
