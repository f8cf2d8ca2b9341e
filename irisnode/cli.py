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
import stat
import sys
import textwrap
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from irisnode import __version__
from irisnode.commands import COMMANDS, suggestion
from irisnode.commands.common import HelpFormatter, seconds
from irisnode.commands.common import port_number as _port

if TYPE_CHECKING:
    from irisnode.limits import MessagingLimits
    from relay.server import RelayLimits

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_LEVEL_ALIASES = {"warning": "warn", "fatal": "critical"}


def _log_level(text: str) -> str:
    """Any case, and the usual other names (``WARNING``): what Twisted's levels are called."""
    level = text.lower()
    return LOG_LEVEL_ALIASES.get(level, level)


def _listen_address(text: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return "127.0.0.1", _port(text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"write an IPv6 address as [ADDRESS]:PORT: {text!r}")
    if not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT or PORT: {text!r}")
    return host, _port(port)


def _positive_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
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
    commands = "\n".join(f"  {name:<10} {summary}" for name, summary in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="irisnode",
        description=textwrap.fill(
            "Run an irisnode: applications on this machine attach over the Iris relay "
            "protocol. Without --net it runs in developer mode: a network of one, on "
            "loopback only.",
            79,
        ),
        epilog=f"commands (irisnode COMMAND --help for each):\n{commands}\n\n"
        "example:\n  irisnode --relay-port 55555 --metrics 9090\n"
        "  irisnode --net office --key office.key",
        formatter_class=HelpFormatter,
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
        "--metrics",
        type=_listen_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics (/metrics), /status.json and a live status page (/) "
        "over HTTP on PORT (127.0.0.1 unless HOST is given; 0 picks a free port; default: off)",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        choices=LOG_LEVELS,
        default="info",
        help="least severe level to log, in any case (warning is warn)",
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
        metavar="PORT",
        help="port for links with other nodes, on all addresses (default 55556; 0 picks a free "
        "one)",
    )
    network.add_argument(
        "--discovery-port",
        type=_port,
        metavar="PORT",
        help="UDP port of the multicast beacons (default: the standard one, 47853)",
    )
    network.add_argument(
        "--handshake-rate",
        type=_positive_rate,
        default=None,
        metavar="PER_SECOND",
        help="link handshakes accepted per second from one address, after a burst of 20 "
        "(default 5; each costs about half a millisecond of CPU)",
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
        type=seconds,
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
        type=seconds,
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
    class QuietTwisted:
        """Hide Twisted's own chatter ("Factory starting on 55555", "Main loop terminated.")
        unless debugging; its warnings and errors still show."""

        def __call__(self, event: dict[str, Any]) -> Any:
            namespace = event.get("log_namespace", "")
            chatter = namespace == "log_legacy" or (
                namespace.startswith("twisted.") and event.get("log_level") == LogLevel.info
            )
            if chatter and threshold > LogLevel.debug:
                return PredicateResult.no
            return PredicateResult.maybe

    observer = json_log_observer(stream) if fmt == "json" else textFileLogObserver(stream)
    predicates = [LogLevelFilterPredicate(defaultLogLevel=threshold), QuietTwisted()]
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
        warn_if_exposed(args.key)
        network = NetworkConfig(
            name=args.net,
            key_file=args.key,
            interfaces=tuple(args.interface),
            discovery=not args.no_discovery,
            discovery_port=args.discovery_port or 0,
            seeds=tuple(args.seed),
            state_dir=args.state_dir,
            advertise=tuple(args.advertise),
            **({} if args.link_port is None else {"link_port": args.link_port}),
            **({} if args.handshake_rate is None else {"handshake_rate": args.handshake_rate}),
        )

    log = Logger(namespace="irisnode")
    start_logging(args.log_level, args.log_format, sys.stderr)
    relay_limits, messaging_limits = limits_from(args)
    config = NodeConfig(
        relay_port=args.relay_port,
        relay_limits=relay_limits,
        messaging_limits=messaging_limits,
        network=network,
        monitor=args.metrics,
    )
    node = Node(reactor, config)
    exit_code = 0

    def ready() -> None:
        """Everything the node listens on is bound: say so, once, with where."""
        where = [f"relay on {' and '.join(node.relay_addresses)}"]
        fields: dict[str, Any] = {"relay_port": node.relay_port}
        if node.overlay is not None:
            where.append(f"links on port {node.overlay.link_port}")
            fields["link_port"] = node.overlay.link_port
        if node.monitor_url is not None:
            where.append(f"status page on {node.monitor_url}")
            fields["metrics_url"] = node.monitor_url
        log.info(
            "irisnode {version} ready: {where}",
            version=__version__,
            where=", ".join(where),
            **fields,
        )

    def failed(error: Exception) -> None:
        nonlocal exit_code
        print(f"irisnode: cannot join the network: {error}", file=sys.stderr)
        exit_code = 1
        if reactor.running:
            reactor.stop()

    node.on_ready = ready
    node.on_failure = failed
    try:
        node.start()
    except CannotListenError as error:
        if args.metrics is not None and (error.interface, error.port) == args.metrics:
            what = f"metrics address {args.metrics[0]}:{args.metrics[1]}"
        else:
            what = f"relay port {args.relay_port}"
        print(f"irisnode: cannot listen on {what}: {error.socketError}", file=sys.stderr)
        return 1
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


def warn_if_exposed(key_file: str) -> None:
    """Warn, as ssh does, when others may read the network key: whoever can, can join."""
    mode = stat.S_IMODE(os.stat(key_file).st_mode)
    if mode & 0o077:
        print(
            f"irisnode: warning: the network key {key_file} is accessible by others "
            f"(mode {mode:04o}): anyone who can read it can join the network; "
            f"chmod 600 {key_file}",
            file=sys.stderr,
        )


def network_only_options(args: argparse.Namespace) -> list[str]:
    """The network options given on a command line without --net (they would do nothing)."""
    given = {
        "--interface": args.interface,
        "--seed": args.seed,
        "--advertise": args.advertise,
        "--state-dir": args.state_dir is not None,
        "--link-port": args.link_port is not None,
        "--discovery-port": args.discovery_port is not None,
        "--no-discovery": args.no_discovery,
        "--handshake-rate": args.handshake_rate is not None,
    }
    return [option for option, used in given.items() if used]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in COMMANDS:
        from irisnode import commands

        return commands.main(arguments)
    parser = build_parser()
    if arguments and not arguments[0].startswith("-"):
        parser.print_usage(sys.stderr)
        print(
            f"irisnode: unknown command {arguments[0]!r}: {suggestion(arguments[0])}",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(arguments)
    if (args.net is None) != (args.key is None):
        parser.error("--net and --key go together: a network is its name and its key")
    if args.net is None and (unused := network_only_options(args)):
        parser.error(
            f"{', '.join(unused)}: only with --net and --key (without them the node runs in "
            "developer mode, on this machine only)"
        )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
