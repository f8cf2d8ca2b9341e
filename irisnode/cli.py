"""The ``irisnode`` command: the only place that touches the global reactor.

``irisnode`` with no arguments runs a node in developer mode: the relay on
127.0.0.1 and [::1] port 55555, no traffic off this machine.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import signal
import sys
import types
from collections.abc import Sequence
from typing import Any, TextIO

from irisnode import __version__

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
COMMANDS = ("keygen", "status", "lookup")
"""Subcommands (``irisnode keygen ...``); anything else runs a node."""


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {value}")
    return value


def _size(text: str) -> int:
    """A byte count, with an optional K/M/G suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    scale = units.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    try:
        value = int(digits, 10) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 16M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _seed(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    if ":" in host.strip("[]") and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"write an IPv6 seed as [ADDRESS]:PORT: {text!r}")
    if _port(port) == 0:
        raise argparse.ArgumentTypeError(f"a seed needs a real port: {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irisnode",
        description="Run an irisnode: applications on this machine attach over the Iris "
        "relay protocol. Other commands: 'irisnode keygen', 'irisnode status', "
        "'irisnode lookup' (each with --help).",
    )
    parser.add_argument("--version", action="version", version=f"irisnode {__version__}")
    parser.add_argument(
        "--relay-port",
        type=_port,
        default=55555,
        metavar="PORT",
        help="relay port on 127.0.0.1 and [::1] (default 55555; 0 picks a free one)",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="least severe level to log"
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    parser.add_argument(
        "--max-message-size",
        type=_size,
        default=16 << 20,
        metavar="BYTES",
        help="largest request, reply, broadcast or event accepted (default 16M)",
    )
    network = parser.add_argument_group(
        "network mode", "join a network of nodes (without --net: developer mode, this machine only)"
    )
    network.add_argument("--net", metavar="NAME", help="network name (needs --key)")
    network.add_argument(
        "--key", metavar="FILE", help="network key file made by 'irisnode keygen' (needs --net)"
    )
    network.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="NAME",
        help="discover peers on this interface (repeatable; default: every up, "
        "multicast-capable, non-loopback interface)",
    )
    network.add_argument(
        "--seed",
        action="append",
        default=[],
        type=_seed,
        metavar="HOST:PORT",
        help="link to this node even without multicast (repeatable; [IPV6]:PORT)",
    )
    network.add_argument(
        "--link-port",
        type=_port,
        default=55556,
        metavar="PORT",
        help="port for links with other nodes, on all addresses (default 55556)",
    )
    network.add_argument(
        "--discovery-port",
        type=_port,
        default=0,
        metavar="PORT",
        help="UDP port of the multicast beacons (default: the standard one, 47853)",
    )
    network.add_argument(
        "--no-discovery",
        action="store_true",
        help="no multicast discovery: only --seed nodes and those that link to us",
    )
    network.add_argument(
        "--advertise",
        action="append",
        default=[],
        metavar="HOST",
        help="address other nodes should dial this one on (repeatable; default: the "
        "addresses of this host's interfaces)",
    )
    network.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep this node's identity here (default: a new identity every start)",
    )
    parser.add_argument(
        "--max-backlog",
        type=_size,
        default=64 << 20,
        metavar="BYTES",
        help="unsent bytes per client beyond which broadcasts and events to it are dropped "
        "(default 64M)",
    )
    return parser


def json_log_observer(stream: TextIO) -> Any:
    """One JSON object per line: time, level, namespace, message, then the event's fields.

    Twisted's own JSON observer writes its internal event representation, which is
    meant for reloading events, not for reading or for log pipelines.
    """
    import json
    from datetime import UTC, datetime

    from twisted.logger import FileLogObserver, formatEvent

    def render(event: dict[str, Any]) -> str:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and key != "format":
                record[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        return json.dumps(record) + "\n"

    return FileLogObserver(stream, render)


def start_logging(level: str, fmt: str, stream: TextIO) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        ILogFilterPredicate,
        LogLevel,
        LogLevelFilterPredicate,
        PredicateResult,
        globalLogBeginner,
        textFileLogObserver,
    )
    from zope.interface import implementer

    threshold = LogLevel.levelWithName(level)

    @implementer(ILogFilterPredicate)
    class QuietLegacy:
        """Hide Twisted's legacy chatter ("Factory starting on 55555") unless debugging."""

        def __call__(self, event: dict[str, Any]) -> Any:
            if event.get("log_namespace") == "log_legacy" and threshold > LogLevel.debug:
                return PredicateResult.no
            return PredicateResult.maybe

    observer = json_log_observer(stream) if fmt == "json" else textFileLogObserver(stream)
    predicates = [LogLevelFilterPredicate(defaultLogLevel=threshold), QuietLegacy()]
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, predicates)], redirectStandardIO=False
    )


class _DeferredModule(types.ModuleType):
    """Stands in for a module until one of its attributes is first used."""

    def __getattr__(self, name: str) -> Any:
        spec = object.__getattribute__(self, "__spec__")
        self.__class__ = types.ModuleType  # type: ignore[assignment]  # a plain module from now on
        spec.loader.exec_module(self)
        return getattr(self, name)


def defer_imports(*names: str) -> None:
    """Let modules that Twisted and asyncio import but the node never uses load on first use.

    Twisted imports ``http.cookiejar`` (and with it urllib, http.client and email)
    only to offer a deprecated alias, and asyncio imports ``ssl`` (OpenSSL) for TLS
    that the relay does not speak. Standing in for them saves about a fifth of the
    start-up time and a third of the node's memory. Anything that really uses one
    of them gets the real module, loaded at that moment. Must run before Twisted
    is imported.
    """
    for name in names:
        if name in sys.modules:
            continue
        parent, _, child = name.rpartition(".")
        if parent:
            # find_spec(name) would import the parent package: look inside it instead.
            parent_spec = importlib.util.find_spec(parent)
            locations = None if parent_spec is None else parent_spec.submodule_search_locations
            spec = importlib.machinery.PathFinder.find_spec(name, locations)
        else:
            spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        module = _DeferredModule(name)
        module.__spec__ = spec
        module.__loader__ = spec.loader
        module.__file__ = spec.origin
        sys.modules[name] = module
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def run(args: argparse.Namespace) -> int:
    defer_imports("http.cookiejar", "ssl", "asyncio.sslproto")
    from irisnode.reactor import install_reactor

    reactor: Any = install_reactor()
    from twisted.internet.defer import Deferred
    from twisted.internet.error import CannotListenError
    from twisted.logger import Logger

    from irisnode.node import NetworkConfig, Node, NodeConfig
    from relay.server import RelayLimits

    network = None
    if args.net is not None:
        from overlay.identity import CredentialError, NetworkKey

        try:
            NetworkKey.load(args.key, expected_name=args.net)  # say what is wrong, before we start
        except CredentialError as error:
            print(f"irisnode: {error}", file=sys.stderr)
            return 1
        network = NetworkConfig(
            name=args.net,
            key_file=args.key,
            link_port=args.link_port,
            interfaces=tuple(args.interface),
            discovery=not args.no_discovery,
            discovery_port=args.discovery_port,
            seeds=tuple(args.seed),
            state_dir=args.state_dir,
            advertise=tuple(args.advertise),
        )

    log = Logger(namespace="irisnode")
    start_logging(args.log_level, args.log_format, sys.stderr)
    limits = RelayLimits(max_payload=args.max_message_size, max_backlog=args.max_backlog)
    node = Node(
        reactor, NodeConfig(relay_port=args.relay_port, relay_limits=limits, network=network)
    )
    exit_code = 0

    def overlay_failed(error: Exception) -> None:
        nonlocal exit_code
        print(f"irisnode: cannot join the network: {error}", file=sys.stderr)
        exit_code = 1
        reactor.stop()

    node.on_failure = overlay_failed
    try:
        node.start()
    except CannotListenError as error:
        print(f"irisnode: cannot listen on relay port {args.relay_port}: {error}", file=sys.stderr)
        return 1
    log.info(
        "irisnode {version} ready: relay on {addresses}",
        version=__version__,
        addresses=" and ".join(node.relay_addresses),
        relay_port=node.relay_port,
    )
    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(node.stop()))
    # Twisted only takes over SIGINT if Python's default handler is in place; a shell
    # starts background jobs with SIGINT ignored, and the node must still stop on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reactor.run()
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in COMMANDS:
        from irisnode import commands

        return commands.main(arguments)
    parser = build_parser()
    args = parser.parse_args(arguments)
    if (args.net is None) != (args.key is None):
        parser.error("--net and --key go together: a network is its name and its key")
    if args.net is None and (args.interface or args.seed or args.state_dir or args.advertise):
        parser.error("--interface, --seed, --advertise and --state-dir need --net and --key")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
