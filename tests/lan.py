"""A private LAN of network namespaces, one ``irisnode`` process per namespace.

The layout (nothing of it ever exists in the host's root namespace)::

    namespace <prefix>-sw:   bridge irbr0 ── irp0 irp1 ... irpN-1   (the switch)
                                               │    │        │
    namespace <prefix>-nI:                   irv0 irv0 ... irv0      (one per node)

Each veth pair is created inside the switch namespace with its node end moved
straight into the node's namespace, so no interface is ever visible to the host.
A node namespace has ``lo`` up and ``irv0`` with an IPv4 address from a private
range and an IPv6 link-local address (duplicate address detection switched off
on ``irv0``, so the address is usable at once). Names carry this process's pid
so that concurrent runs never collide; :meth:`Lan.close` deletes exactly the
namespaces this object created, after killing (by pid) every process it started,
and then checks that none of them is left.

Used by ``tests/test_lan.py`` and ``bench/lan_bench.py``::

    with Lan(5) as lan:
        for i in range(5):
            lan.start_node(i)
        lan.wait_all_ready()
        print(overlay_of(lan.status(0))["peers"])

Run as a module, this file is the in-namespace agent (``python -m tests.lan
agent``) that :meth:`Lan.cli` uses to run many ``irisnode`` client commands in
one process instead of paying an interpreter start per command.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from overlay.ids import closest
from overlay.pastry import PastryConfig

ROOT = Path(__file__).resolve().parent.parent
BRIDGE = "irbr0"
NODE_IF = "irv0"
"""The node's end of its veth pair, inside its namespace (the same name in each)."""

WHOLE_LEAF_SET = 2 * PastryConfig().leaf_half
"""Peers a leaf set holds (both sides): a LAN of up to this many + 1 nodes is all in each."""
READY = re.compile(r"ready: relay on 127\.0\.0\.1:(\d+)")
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

Record = dict[str, Any]
"""One log line: the parsed JSON object, or ``{"message": line}`` for a text line;
``_received`` is added: when it arrived (``time.monotonic()``)."""
Match = str | re.Pattern[str] | Callable[[Record], bool]
"""What a log line is searched for: a regex in the raw line, or a predicate on the record."""

REFUSALS = frozenset(
    {
        "bad-magic",
        "unsupported-version",
        "malformed-handshake",
        "bad-ephemeral-key",
        "tampered-handshake",
        "wrong-network",
        "bad-certificate",
        "expired-certificate",
        "bad-signature",
        "unexpected-peer",
    }
)
"""Link failure reasons (docs/wire-link.md) that mean "the peer was refused"."""


def _matcher(match: Match) -> Callable[[str, Record], bool]:
    if callable(match):
        return lambda line, record: bool(match(record))
    pattern = re.compile(match)
    return lambda line, record: pattern.search(line) is not None


class LanError(Exception):
    """The LAN could not be built, or something it made could not be removed."""


def netns_available() -> str | None:
    """None if this process can build namespaces; otherwise why not (a skip reason)."""
    if os.geteuid() != 0:
        return "needs root to build network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    if not Path("/run/netns").exists() and not os.access("/run", os.W_OK):
        return "cannot create /run/netns"
    return None


def _run(command: Sequence[str], *, timeout: float = 10.0, check: bool = True) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LanError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """``ip ARGS`` in ``netns`` (``ip -n`` is ``ip netns exec NS ip``)."""
    return _run(["ip", *(["-n", netns] if netns else []), *args], check=check)


def netns_names() -> set[str]:
    """Every named network namespace on the host (ours and anyone else's)."""
    return {entry["name"] for entry in json.loads(_run(["ip", "-j", "netns", "list"]) or "[]")}


def host_links() -> set[str]:
    """Interface names in this process's (the host's root) namespace."""
    return {entry["ifname"] for entry in json.loads(_run(["ip", "-j", "link", "show"]))}


# -- entering a namespace from this process ---------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Move the calling *thread* into namespace ``name`` for the block, then back.

    A network namespace is per thread, and a socket stays in the namespace it was
    created in, so this is how the test process gets sockets on the LAN without a
    helper process. Create sockets in the block; do not start threads in it.
    """
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def netns_socket(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace ``name``; usable from any thread."""
    with in_netns(name):
        return socket.socket(family, kind, proto)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the thread that started it ends,
    and so when the test process dies: a crashed run leaves no node running. (Its
    namespaces stay; delete them by hand: ``ip netns list | grep irl-PID``.)"""
    PR_SET_PDEATHSIG = 1
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# -- processes ---------------------------------------------------------------------------


class Process:
    """A process in a namespace, started by :class:`Lan`; stderr read by a thread.

    ``ip netns exec`` replaces itself with the command, so :attr:`pid` is the
    command's own pid: kill and signal go straight to it.
    """

    def __init__(
        self,
        netns: str,
        command: Sequence[str],
        *,
        cwd: Path = ROOT,
    ) -> None:
        self.netns = netns
        self.command = list(command)
        self.records: list[Record] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, *command],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.popen.pid
        assert self.popen.stderr is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.popen.stderr,), name=f"stderr-{self.pid}", daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            record: Record
            try:
                parsed = json.loads(line)
                record = parsed if isinstance(parsed, dict) else {"message": line}
            except ValueError:
                record = {"message": line}
            record.setdefault("_received", time.monotonic())
            with self._changed:
                self.lines.append(line)
                self.records.append(record)
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def find_log(self, match: Match) -> Record | None:
        """The first log record matching: a regex searched in the raw line, or a predicate."""
        with self._changed:
            return self._find(_matcher(match), 0)[1]

    def _find(self, test: Callable[[str, Record], bool], start: int) -> tuple[int, Record | None]:
        """(where to resume, the first match at or after ``start``); hold ``_changed``."""
        for k in range(start, len(self.records)):
            if test(self.lines[k], self.records[k]):
                return k, self.records[k]
        return len(self.records), None

    def wait_for_log(self, match: Match, timeout: float) -> Record:
        """The first record matching; AssertionError (with the log) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        test = _matcher(match)
        with self._changed:
            start = 0
            while True:
                start, found = self._find(test, start)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self._reader.is_alive() and not self.alive):
                    break
                self._changed.wait(min(remaining, 0.5))
        raise AssertionError(
            f"{self.netns}: no log line matching {match!r} within {timeout} s"
            f" (exit code {self.popen.poll()}); log:\n" + "\n".join(self.lines[-40:])
        )

    def send_signal(self, signum: int) -> None:
        if self.alive:
            self.popen.send_signal(signum)

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``signum`` (by pid) and wait for the process to end; its exit code."""
        self.send_signal(signum)
        return self.popen.wait(timeout=timeout)

    def stop(self, grace: float = 3.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
        if self.alive:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait(timeout=10)
        self._reader.join(timeout=5)
        return code


class Node(Process):
    """An ``irisnode`` process; :attr:`ready_at` is when its ready line arrived."""

    def __init__(
        self,
        index: int,
        netns: str,
        command: Sequence[str],
        relay_port: int,
        link_port: int,
    ) -> None:
        super().__init__(netns, command)
        self.index = index
        self.relay_port = relay_port
        self.link_port = link_port
        self.ready_at: float | None = None

    def wait_ready(self, timeout: float = 10.0) -> float:
        """Seconds from spawning the process to its ready line on stderr."""
        if self.ready_at is None:
            record = self.wait_for_log(READY, timeout)
            self.ready_at = record["_received"]
        return self.ready_at - self.started

    def refusals(self) -> list[Record]:
        """Log records of peers refused in the handshake (``reason`` in :data:`REFUSALS`)."""
        with self._changed:
            return [r for r in self.records if r.get("reason") in REFUSALS]


# -- the agent: irisnode client commands, many per process --------------------------------


class Agent:
    """A ``python -m tests.lan agent`` process in one namespace.

    It runs ``irisnode.cli.main(argv)`` in-process for each command and answers
    with the exit code and what was printed: the same contract as running the
    command, without a fresh interpreter (and Twisted import) each time.

    Any other ``command`` that reads one JSON value per line and answers each
    with one JSON line can be driven the same way through :meth:`ask` (the
    applications of ``tests/lan_apps.py`` are).
    """

    def __init__(self, netns: str, command: Sequence[str] | None = None) -> None:
        self.netns = netns
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        argv = command or [sys.executable, "-m", "tests.lan", "agent"]
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.popen.pid
        self._lock = threading.Lock()

    def run(self, argv: Sequence[str] | None, timeout: float) -> subprocess.CompletedProcess[str]:
        """``irisnode ARGV`` in the agent; None only checks that it is up."""
        answer = self.ask(None if argv is None else list(argv), timeout)
        return subprocess.CompletedProcess(
            ["irisnode", *(argv or [])], answer["code"], answer["stdout"], answer["stderr"]
        )

    def ask(self, question: object, timeout: float) -> Any:
        """Send one JSON value, return the JSON answer; TimeoutExpired (the agent is
        then killed, its stderr in the exception) if none comes within ``timeout``."""
        stdin, stdout = self.popen.stdin, self.popen.stdout
        assert stdin is not None and stdout is not None
        with self._lock:
            stdin.write(json.dumps(question).encode() + b"\n")
            stdin.flush()
            ready, _, _ = select.select([stdout], [], [], timeout)
            line = stdout.readline() if ready else b""
        if not line:
            errors = self.stop()
            raise subprocess.TimeoutExpired(self.popen.args, timeout, stderr=errors)
        return json.loads(line)

    def stop(self) -> str:
        """Kill the agent (by pid); what it wrote to stderr."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()
        if self.errors.closed:
            return ""
        self.errors.seek(0)
        text = self.errors.read().decode(errors="replace")
        self.errors.close()
        return text


def agent_main() -> None:
    """Agent side: one JSON argv per line in, one JSON answer per line out."""
    from irisnode import cli

    for line in sys.stdin:
        argv = json.loads(line)
        if argv is None:  # are you there?
            sys.stdout.write(json.dumps({"code": 0, "stdout": "", "stderr": ""}) + "\n")
            sys.stdout.flush()
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exit_:
                code = (
                    exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                )
            except Exception as error:  # reported to the parent as a failure
                code, err = 1, io.StringIO(f"agent: {error!r}")
        answer = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# -- packet capture ----------------------------------------------------------------------


@dataclass(slots=True)
class Capture:
    """Every frame seen by a raw ``AF_PACKET`` socket in one namespace, until :meth:`stop`.

    In the switch namespace, with no interface named, that is every frame on the
    LAN (each once per bridge port it crosses; :meth:`tcp_streams` removes the
    copies). Reads in a thread of this process; needs root.
    """

    sock: socket.socket
    frames: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, netns: str, interface: str | None = None) -> Capture:
        sock = netns_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        if interface is not None:
            with in_netns(netns):
                sock.bind((interface, ETH_P_ALL))
        sock.settimeout(0.05)
        capture = cls(sock)
        capture._thread = threading.Thread(target=capture._loop, name="capture", daemon=True)
        capture._thread.start()
        return capture

    def _loop(self) -> None:
        while True:
            try:
                data, address = self.sock.recvfrom(1 << 18)  # GSO frames exceed 64 KiB
            except TimeoutError:
                if self._stop.is_set():
                    return  # asked to stop, and nothing more is queued
                continue
            except OSError:
                return
            if address[2] != PACKET_OUTGOING:  # the same frame was seen arriving
                self.frames.append(data)

    def stop(self) -> list[bytes]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sock.close()
        return self.frames

    def tcp_streams(self) -> dict[tuple[str, int, str, int], bytes]:
        """Each TCP direction's payload bytes in sequence order, copies removed."""
        segments: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
        for frame in self.frames:
            parsed = parse_frame(frame)
            if parsed is None or parsed[0] != "tcp":
                continue
            _, flow, seq, payload = parsed
            if payload:
                segments.setdefault(flow, {})[seq] = payload
        streams = {}
        for flow, by_seq in segments.items():
            first = min(by_seq)  # a stream captured here is far shorter than 2**31
            stream = bytearray()
            for seq, payload in sorted(by_seq.items(), key=lambda i: (i[0] - first) % (1 << 32)):
                start = (seq - first) % (1 << 32)
                # A retransmission may overlap what we have; a lost copy leaves a gap.
                stream += payload[max(0, len(stream) - start) :]
            streams[flow] = bytes(stream)
        return streams

    def udp_payloads(self) -> list[bytes]:
        return [p[3] for f in self.frames if (p := parse_frame(f)) and p[0] == "udp"]


def parse_frame(frame: bytes) -> tuple[str, tuple[str, int, str, int], int, bytes] | None:
    """("tcp"|"udp", (src, sport, dst, dport), tcp seq or 0, payload) of an Ethernet frame."""
    if len(frame) < 14:
        return None
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype == 0x0800 and len(frame) >= 34:
        header = (frame[14] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", frame, 16)
        proto = frame[23]
        src, dst = (
            socket.inet_ntop(socket.AF_INET, frame[26:30]),
            socket.inet_ntop(socket.AF_INET, frame[30:34]),
        )
        body = frame[14 + header : 14 + total]
    elif ethertype == 0x86DD and len(frame) >= 54:
        (length,) = struct.unpack_from("!H", frame, 18)
        proto = frame[20]  # extension headers do not occur on this LAN
        src, dst = (
            socket.inet_ntop(socket.AF_INET6, frame[22:38]),
            socket.inet_ntop(socket.AF_INET6, frame[38:54]),
        )
        body = frame[54 : 54 + length]
    else:
        return None
    if proto == 6 and len(body) >= 20:
        sport, dport, seq = struct.unpack_from("!HHI", body)
        offset = (body[12] >> 4) * 4
        return "tcp", (src, sport, dst, dport), seq, body[offset:]
    if proto == 17 and len(body) >= 8:
        sport, dport = struct.unpack_from("!HH", body)
        return "udp", (src, sport, dst, dport), 0, body[8:]
    return None


# -- the LAN -----------------------------------------------------------------------------


class Lan:
    """A bridge and ``size`` namespaces; nodes, agents and captures; and their removal.

    Ports may be fixed numbers: each namespace is empty apart from what this
    object starts in it. Use as a context manager, or call :meth:`open` and
    :meth:`close` (``close`` in a ``finally``).
    """

    def __init__(
        self,
        size: int,
        *,
        tag: str = "lan",
        subnet: str = "10.231.0",
        network: str = "irislan",
        relay_port: int = 47001,
        link_port: int = 47002,
        discovery_port: int | None = None,
        log_level: str = "info",
        python: str = sys.executable,
    ) -> None:
        if not 1 <= size <= 250:
            raise ValueError(f"1 to 250 namespaces, not {size}")
        prefix = f"irl-{os.getpid()}-{tag}"
        self.size = size
        self.subnet = subnet
        self.network = network
        self.relay_port = relay_port
        self.link_port = link_port
        self.discovery_port = discovery_port
        self.log_level = log_level
        self.python = python
        self.switch = f"{prefix}-sw"
        self.namespaces = [f"{prefix}-n{i}" for i in range(size)]
        self.processes: list[Process] = []
        self.nodes: dict[int, Node] = {}
        self._agents: dict[str, Agent] = {}
        self.agents: list[Agent] = []
        """Agents of other commands (:meth:`start_agent`), stopped by :meth:`close`."""
        self._created: list[str] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._key: Path | None = None
        self._keys = 0

    # -- building and removing

    def __enter__(self) -> Lan:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> Lan:
        """Build the LAN; on any failure remove what was built and raise."""
        taken = netns_names() & {self.switch, *self.namespaces}
        if taken:
            raise LanError(f"namespaces already exist (not ours to touch): {sorted(taken)}")
        self._tmp = tempfile.TemporaryDirectory(prefix="irisnode-lan-")
        try:
            self._add_netns(self.switch)
            ip("link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0", netns=self.switch)
            ip("link", "set", BRIDGE, "up", netns=self.switch)
            for i, ns in enumerate(self.namespaces):
                self._add_netns(ns)
                port = f"irp{i}"
                ip(
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    NODE_IF,
                    "netns",
                    ns,
                    netns=self.switch,
                )
                ip("link", "set", port, "master", BRIDGE, "up", netns=self.switch)
                _run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-qw",
                        f"net.ipv6.conf.{NODE_IF}.accept_dad=0",
                    ]
                )
                ip("addr", "add", f"{self.address(i)}/24", "dev", NODE_IF, netns=ns)
                ip("link", "set", NODE_IF, "up", netns=ns)
            self.wait_link_local(time.monotonic() + 10)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        ip("link", "set", "lo", "up", netns=name)

    def wait_link_local(self, deadline: float) -> None:
        """Until every node namespace has a usable IPv6 link-local address."""
        for i in range(self.size):
            while not self.link_local(i):
                if time.monotonic() > deadline:
                    raise LanError(f"{self.namespaces[i]}: no usable link-local address")
                time.sleep(0.02)  # polling a condition, with a deadline

    def close(self) -> None:
        """Kill every process started here (by pid), delete every namespace created
        here, and check that none is left; raises LanError if something stayed."""
        for agent in [*self._agents.values(), *self.agents]:
            agent.stop()
        self._agents.clear()
        self.agents.clear()
        for process in self.processes:
            process.stop(grace=2.0)
        problems = [f"pid {p.pid} still running" for p in self.processes if p.alive]
        for name in reversed(self._created):
            _run(["ip", "netns", "delete", name], check=False)
        left = netns_names() & set(self._created)
        problems += [f"namespace {name} still exists" for name in sorted(left)]
        self._created = [name for name in self._created if name in left]
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if problems:
            raise LanError("; ".join(problems))

    # -- addresses and sockets

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def link_local(self, i: int) -> str | None:
        """The IPv6 link-local address of node ``i``'s ``irv0`` (no scope), once usable."""
        found = json.loads(ip("-j", "-6", "addr", "show", "dev", NODE_IF, netns=self.namespaces[i]))
        for interface in found:
            for info in interface.get("addr_info", []):
                usable = not info.get("tentative") and not info.get("dadfailed")
                if info.get("scope") == "link" and usable:
                    return str(info["local"])
        return None

    def socket(self, i: int, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> Any:
        """A socket in node ``i``'s namespace."""
        return netns_socket(self.namespaces[i], family, kind)

    def check_connectivity(self, i: int, j: int, timeout: float = 5.0) -> None:
        """TCP from node ``i`` to node ``j`` over IPv4 and over IPv6 link-local, or raise."""
        v6 = self.link_local(j)
        if v6 is None:
            raise LanError(f"node {j} has no link-local address")
        server_v6: tuple[Any, ...] = (v6, 0, 0, self._ifindex(j))
        client_v6: tuple[Any, ...] = (v6, 0, 0, self._ifindex(i))
        for family, server_address, client_address in (
            (socket.AF_INET, (self.address(j), 0), (self.address(j), 0)),
            (socket.AF_INET6, server_v6, client_v6),
        ):
            with self.socket(j, family) as server, self.socket(i, family) as client:
                server.bind(server_address)
                server.listen(1)
                server.settimeout(timeout)
                client.settimeout(timeout)
                port = server.getsockname()[1]
                client.connect((client_address[0], port, *client_address[2:]))
                accepted, _ = server.accept()
                with accepted:
                    client.sendall(b"ping")
                    if accepted.recv(4) != b"ping":
                        raise LanError(f"node {i} -> {j}: data lost ({family!r})")

    def _ifindex(self, i: int) -> int:
        with in_netns(self.namespaces[i]):
            return socket.if_nametoindex(NODE_IF)

    def pull_cable(self, i: int) -> None:
        """Take node ``i``'s switch port down: the node runs on, cut off from the LAN."""
        ip("link", "set", f"irp{i}", "down", netns=self.switch)

    def plug_cable(self, i: int) -> None:
        ip("link", "set", f"irp{i}", "up", netns=self.switch)

    # -- keys and nodes

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            raise LanError("the LAN is not open")
        return Path(self._tmp.name)

    def keygen(self, network: str | None = None) -> Path:
        """A new network key file made by ``irisnode keygen`` (in the host namespace:
        it touches no network)."""
        self._keys += 1
        path = self.tmp / f"network-{self._keys}.key"
        command = [self.python, "-m", "irisnode", "keygen", "--net", network or self.network]
        result = subprocess.run(
            [*command, "-o", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise LanError(f"irisnode keygen failed: {result.stderr.strip()}")
        return path

    @property
    def key(self) -> Path:
        """The LAN's shared network key (made on first use)."""
        if self._key is None:
            self._key = self.keygen()
        return self._key

    def spawn(self, i: int, command: Sequence[str]) -> Process:
        """Any command in node ``i``'s namespace, killed by :meth:`close`."""
        process = Process(self.namespaces[i], command)
        self.processes.append(process)
        return process

    def start_node(
        self,
        i: int,
        *args: str,
        key: Path | None = None,
        network: str | None = None,
        seeds: Sequence[str] = (),
        state_dir: Path | None = None,
    ) -> Node:
        """``irisnode --net ... --key ...`` in namespace ``i`` with JSON logs; ``args``
        are appended as they are. The identity is kept in ``state_dir`` (default
        ``tmp/state-I``: a restarted node keeps its node id)."""
        running = self.nodes.get(i)
        if running is not None and running.alive:
            raise LanError(f"node {i} is already running (pid {running.pid})")
        state = state_dir or self.tmp / f"state-{i}"
        argv = [
            "--net",
            network or self.network,
            "--key",
            str(key or self.key),
            "--relay-port",
            str(self.relay_port),
            "--link-port",
            str(self.link_port),
            "--state-dir",
            str(state),
            "--log-format",
            "json",
            "--log-level",
            self.log_level,
        ]
        if self.discovery_port is not None:
            argv += ["--discovery-port", str(self.discovery_port)]
        for seed in seeds:
            argv += ["--seed", seed]
        command = [self.python, "-m", "irisnode", *argv, *args]
        node = Node(i, self.namespaces[i], command, self.relay_port, self.link_port)
        self.processes.append(node)
        self.nodes[i] = node
        return node

    def wait_all_ready(self, timeout: float = 10.0) -> None:
        for node in self.nodes.values():
            if node.alive:
                node.wait_ready(timeout)

    def running(self) -> list[int]:
        return sorted(i for i, node in self.nodes.items() if node.alive)

    # -- client commands in a namespace

    def cli(
        self, i: int, *argv: str, timeout: float = 10.0, fresh: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``irisnode ARGV`` in namespace ``i``: by default through that namespace's
        agent; ``fresh=True`` runs a new process, exactly as a user would."""
        ns = self.namespaces[i]
        if fresh:
            command = ["ip", "netns", "exec", ns, self.python, "-m", "irisnode", *argv]
            return subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=timeout
            )
        return self._agent(i).run(argv, timeout)

    def start_agent(self, i: int, command: Sequence[str]) -> Agent:
        """An agent running ``command`` in namespace ``i`` (see :class:`Agent`), killed
        by :meth:`close`. Start it from a thread that lives as long as the LAN."""
        agent = Agent(self.namespaces[i], command)
        self.agents.append(agent)
        return agent

    def start_agents(self, indices: Sequence[int] | None = None, timeout: float = 20.0) -> None:
        """Start the agents of ``indices`` (default: all) and wait until they answer,
        so that the first status poll does not also pay for their start."""
        chosen = range(self.size) if indices is None else indices
        agents = [self._agent(i) for i in chosen]
        for agent in agents:
            agent.run(None, timeout)

    def _agent(self, i: int) -> Agent:
        """Node ``i``'s agent, started if need be. Start agents from a thread that
        lives as long as the LAN: a child dies with the thread that started it."""
        ns = self.namespaces[i]
        agent = self._agents.get(ns)
        if agent is None or agent.popen.poll() is not None:
            agent = self._agents[ns] = Agent(ns)
        return agent

    def status(self, i: int, timeout: float = 5.0) -> Record:
        """``irisnode status --json`` of node ``i``, parsed."""
        result = self.cli(
            i, "status", "--relay-port", str(self.relay_port), "--json", timeout=timeout
        )
        if result.returncode != 0:
            raise LanError(f"status of node {i} failed: {result.stderr.strip()}")
        document: Record = json.loads(result.stdout)
        return document

    def lookup(self, i: int, key: int, timeout: float = 2.0) -> int | None:
        """The node id that node ``i``'s overlay names responsible for ``key``; None on failure."""
        result = self.cli(
            i,
            "lookup",
            f"{key:032x}",
            "--relay-port",
            str(self.relay_port),
            "--timeout",
            str(timeout),
            timeout=timeout + 5,
        )
        if result.returncode != 0:
            return None
        return int(result.stdout.strip(), 16)

    def statuses(self, indices: Sequence[int], timeout: float = 5.0) -> dict[int, Record]:
        """``status`` of several nodes at once (one thread per namespace)."""
        for i in indices:
            self._agent(i)  # here, not in a pool thread (see _agent)
        with ThreadPoolExecutor(max(1, len(indices))) as pool:
            futures = {i: pool.submit(self.status, i, timeout) for i in indices}
            return {i: future.result() for i, future in futures.items()}

    def node_ids(self, indices: Sequence[int]) -> dict[int, int]:
        return {i: own_id(state) for i, state in self.statuses(indices).items()}

    def routes_agree(
        self, indices: Sequence[int], keys: Sequence[int], owners: Sequence[int], timeout: float
    ) -> dict[int, tuple[int, int | None] | None]:
        """Look every key up from every node; per node, None if all answers were
        ``owners`` (in order), else the first (key, answer) that was not."""

        def check(i: int) -> tuple[int, int | None] | None:
            for key, owner in zip(keys, owners, strict=True):
                answer = self.lookup(i, key, timeout)
                if answer != owner:
                    return key, answer
            return None

        for i in indices:
            self._agent(i)
        with ThreadPoolExecutor(max(1, len(indices))) as pool:
            futures = {i: pool.submit(check, i) for i in indices}
            return {i: future.result() for i, future in futures.items()}

    def wait_converged(
        self, indices: Sequence[int], keys: Sequence[int], timeout: float
    ) -> Convergence:
        """Poll until the nodes ``indices`` have converged, or AssertionError.

        Converged: every node routes every key in ``keys`` to the same node, the
        one closest to the key (ring distance, :func:`overlay.ids.closest`) among
        ``indices``; and, on a LAN small enough that every leaf set can hold all
        the others (up to :data:`WHOLE_LEAF_SET` + 1 nodes), every node's leaf set
        is exactly the other nodes, each with a link up. :attr:`Convergence.at` is
        when the statuses first showed that (the lookups then confirm it, so it
        is not an underestimate).
        """
        deadline = time.monotonic() + timeout
        last: object = "no status yet"
        rounds = 0
        while True:
            rounds += 1
            try:
                states = self.statuses(indices)
            except (LanError, subprocess.TimeoutExpired, ValueError) as error:
                states, last = {}, error
            at = time.monotonic()
            if states:
                ids = {i: own_id(state) for i, state in states.items()}
                wrong = {}
                if len(ids) - 1 <= WHOLE_LEAF_SET:
                    for i, state in states.items():
                        others = set(ids.values()) - {ids[i]}
                        if leaf_set(state) != others or not others <= peers_up(state):
                            wrong[i] = sorted(f"{x:032x}"[:8] for x in leaf_set(state) ^ others)
                if wrong:
                    last = f"leaf sets or links differ (node: ids off by): {wrong}"
                else:
                    owners = [closest(key, ids.values()) for key in keys]
                    remaining = max(0.5, min(2.0, deadline - time.monotonic()))
                    mismatches = {
                        i: bad
                        for i, bad in self.routes_agree(indices, keys, owners, remaining).items()
                        if bad is not None
                    }
                    if not mismatches:
                        return Convergence(at, ids, owners, rounds)
                    last = f"lookups differ (node: (key, answer)): {mismatches}"
            if time.monotonic() > deadline:
                raise AssertionError(f"not converged within {timeout} s: {last}")
            time.sleep(0.02)  # polling a condition, with a deadline

    def capture(self, interface: str | None = None) -> Capture:
        """Start capturing every frame on the switch (or on one of its ports, ``irpI``)."""
        return Capture.start(self.switch, interface)


@dataclass(frozen=True, slots=True)
class Convergence:
    at: float
    """``time.monotonic()`` when convergence was observed."""
    node_ids: dict[int, int]
    owners: list[int]
    """The responsible node id of each key asked, in order."""
    rounds: int


def overlay_of(state: Record) -> Record:
    """The overlay part of a status document (nested under ``overlay``, or flat)."""
    nested = state.get("overlay")
    return nested if isinstance(nested, dict) else state


def own_id(state: Record) -> int:
    return int(overlay_of(state)["node_id"], 16)


def leaf_set(state: Record) -> set[int]:
    leaves = overlay_of(state)["leaf_set"]
    return {int(x, 16) for x in (*leaves["left"], *leaves["right"])}


def peers_up(state: Record) -> set[int]:
    """Peers with a link up (``link`` or ``state`` is ``"up"``)."""
    return {
        int(peer["node_id"], 16)
        for peer in overlay_of(state)["peers"]
        if peer.get("link", peer.get("state")) == "up"
    }


def peers_listed(state: Record) -> set[int]:
    return {int(peer["node_id"], 16) for peer in overlay_of(state)["peers"]}


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until truthy and return its value; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # polling a condition, with a deadline


if __name__ == "__main__":
    if sys.argv[1:] == ["agent"]:
        agent_main()
    else:
        sys.exit("usage: python -m tests.lan agent")
