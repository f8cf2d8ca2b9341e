"""The ``irisnode`` command: the only place that touches the global reactor.

``irisnode`` with no arguments runs a node in developer mode: the relay on
127.0.0.1 and [::1] port 55555, no traffic off this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import os
import signal
import sys
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from irisnode import __version__

if TYPE_CHECKING:
    from irisnode.limits import MessagingLimits
    from relay.server import RelayLimits

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
    add_limit_options(parser)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """What the node holds for applications (docs/backpressure.md); defaults in the dataclasses."""
    limits = parser.add_argument_group("limits", "what one node holds for its applications")
    limits.add_argument(
        "--max-connections",
        type=_count,
        metavar="N",
        help="relay connections at once; more are refused (default 4096, or the descriptor "
        "limit less 128 if that is lower)",
    )
    limits.add_argument(
        "--max-subscriptions",
        type=_count,
        default=1000,
        metavar="N",
        help="topics one connection may subscribe to; the next one drops it (default 1000)",
    )
    limits.add_argument(
        "--max-timeout",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="longest request timeout honoured; longer ones are shortened (default 600)",
    )
    limits.add_argument(
        "--max-request-bytes",
        type=_size,
        default=64 << 20,
        metavar="BYTES",
        help="request bytes held node-wide before requesters are no longer read (default 64M)",
    )
    limits.add_argument(
        "--max-partial-bytes",
        type=_size,
        default=64 << 20,
        metavar="BYTES",
        help="bytes of packets still arriving, node-wide (default 64M)",
    )
    limits.add_argument(
        "--packet-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="time a packet that has begun may take to arrive whole (default 10)",
    )


def limits_from(args: argparse.Namespace) -> tuple[RelayLimits, MessagingLimits]:
    """The relay's and the messaging's limits from the parsed options."""
    from irisnode.limits import MessagingLimits
    from relay.server import RelayLimits

    relay = RelayLimits(
        max_payload=args.max_message_size,
        max_backlog=args.max_backlog,
        max_partial_bytes=args.max_partial_bytes,
        packet_seconds=args.packet_timeout,
    )
    if args.max_connections is not None:
        relay = dataclasses.replace(relay, max_connections=args.max_connections)
    messaging = MessagingLimits(
        max_timeout_ms=max(1, round(args.max_timeout * 1000)),
        max_subscriptions=args.max_subscriptions,
        max_request_bytes=args.max_request_bytes,
    )
    return relay, messaging


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


class _LazyLoader(importlib.util.LazyLoader):
    """``importlib.util.LazyLoader``, except that an ``import`` statement does not load.

    The lazy module loads on its first attribute access, and on Python before 3.15
    the import system itself reads ``__spec__`` whenever a module already in
    ``sys.modules`` is imported again, so every ``import ssl`` would load ``ssl``.
    Reading ``__spec__`` is bookkeeping, not use: it is answered without loading.
    """

    def exec_module(self, module: types.ModuleType) -> None:
        super().exec_module(module)
        module.__class__ = _spec_without_loading(type(module))


def _spec_without_loading(lazy: type[types.ModuleType]) -> type[types.ModuleType]:
    class Deferred(lazy):  # type: ignore[valid-type,misc]
        def __getattribute__(self, name: str) -> Any:
            if name == "__spec__":
                return types.ModuleType.__getattribute__(self, name)
            return super().__getattribute__(name)

    return Deferred


def defer_imports(*names: str) -> None:
    """Let modules that Twisted and asyncio import but the node never uses load on first use.

    Twisted imports ``http.cookiejar`` (and with it urllib, http.client and email)
    only to offer a deprecated alias, and asyncio imports ``ssl`` (OpenSSL) for TLS
    that the relay does not speak. Deferring them saves about a fifth of the
    start-up time and a third of the node's memory. Anything that really uses one
    of them gets the real module, loaded at that moment. Must run before Twisted
    is imported; a parent package (``http``, ``asyncio``) is imported here, after
    its deferred child is in place (Twisted imports both anyway).
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
        loader = _LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        if parent:
            setattr(importlib.import_module(parent), child, module)


DEFERRED_MODULES = ("ssl", "http.cookiejar", "asyncio.sslproto")
"""Modules the node's dependencies import but the node never uses (see :func:`defer_imports`)."""


def run(args: argparse.Namespace) -> int:
    defer_imports(*DEFERRED_MODULES)
    from irisnode.reactor import install_reactor

    reactor: Any = install_reactor()
    from twisted.internet.defer import Deferred
    from twisted.internet.error import CannotListenError
    from twisted.logger import Logger

    from irisnode.node import NetworkConfig, Node, NodeConfig

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
    relay_limits, messaging_limits = limits_from(args)
    config = NodeConfig(args.relay_port, relay_limits, messaging_limits, network)
    node = Node(reactor, config)
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
    # Everything is answered and closed, and the log is written: skip tearing the interpreter
    # down object by object, which takes longer than the stop itself with many clients.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


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
