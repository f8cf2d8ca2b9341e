"""The ``irisnode`` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from relay import codec

READY = re.compile(r"ready: relay on 127\.0\.0\.1:(\d+)")


def irisnode(*args: str) -> list[str]:
    return [sys.executable, "-m", "irisnode", *args]


class NodeProcess:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            irisnode("--relay-port", "0", *args),
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port = self._wait_ready()

    def _wait_ready(self) -> int:
        stderr = self.process.stderr
        assert stderr is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            readable, _, _ = select.select([stderr], [], [], deadline - time.monotonic())
            line = stderr.readline() if readable else ""
            if not line:
                break
            self.lines.append(line)
            match = READY.search(line)
            if match:
                return int(match.group(1))
        self.process.kill()
        raise AssertionError(f"node never became ready: {self.lines}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, str]:
        self.process.send_signal(sig)
        _, rest = self.process.communicate(timeout=timeout)
        return self.process.returncode, "".join(self.lines) + rest


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    running = NodeProcess()
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def connect(port: int, cluster: str = "") -> tuple[socket.socket, codec.Decoder[codec.NodePacket]]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(codec.Init(cluster).encode())
    decoder = codec.client_decoder()
    assert receive(sock, decoder) == [codec.Accepted()]
    return sock, decoder


def receive(sock: socket.socket, decoder: codec.Decoder[codec.NodePacket]) -> list[object]:
    while True:
        data = sock.recv(65536)
        if not data:
            return []
        packets = decoder.feed(data)
        if packets:
            return list(packets)


def test_one_ready_line_and_a_working_relay(node: NodeProcess) -> None:
    assert len(node.lines) == 1
    service, service_decoder = connect(node.port, "echo")
    client, client_decoder = connect(node.port)
    client.sendall(codec.Request(1, "echo", b"ping", 1000).encode())
    (delivered,) = receive(service, service_decoder)
    assert isinstance(delivered, codec.RequestDelivered)
    service.sendall(codec.Reply(delivered.request_id, b"pong").encode())
    assert receive(client, client_decoder) == [codec.Replied(1, b"pong")]


def test_ipv6_loopback_listener_shares_the_port(node: NodeProcess) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        sock = socket.create_connection(("::1", node.port), timeout=5)
    except OSError:
        pytest.skip("::1 is not configured here")
    sock.sendall(codec.Init().encode())
    assert receive(sock, codec.client_decoder()) == [codec.Accepted()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_within_a_second_and_answers_everyone(sig: int) -> None:
    # SIGINT is ignored by processes started in the background of a shell; the
    # node must install its own handler either way, so start it the same way here.
    node = NodeProcess()
    try:
        service, service_decoder = connect(node.port, "slow")
        client, client_decoder = connect(node.port)
        client.sendall(codec.Request(7, "slow", b"x", 60_000).encode())
        assert isinstance(receive(service, service_decoder)[0], codec.RequestDelivered)
        started = time.monotonic()
        code, _ = node.stop(sig)
        assert time.monotonic() - started < 1.5
        assert code == 0
        got = receive(client, client_decoder)
        while len(got) < 2:
            more = receive(client, client_decoder)
            assert more, f"connection ended after {got}"
            got += more
        assert got == [codec.TimedOut(7), codec.Closed("node shutting down")]
    finally:
        if node.process.poll() is None:
            node.process.kill()


def test_json_log_lines() -> None:
    node = NodeProcess("--log-format", "json")
    _, output = node.stop()
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    ready = [r for r in records if "relay_port" in r]
    assert ready and ready[0]["relay_port"] == node.port
    assert ready[0]["level"] == "info"
    assert ready[0]["namespace"] == "irisnode"
    assert ready[0]["message"].startswith("irisnode ")
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--relay-port", "70000"], "port must be between 0 and 65535, got 70000"),
        (["--relay-port", "http"], "not a port number: 'http'"),
        (["--log-level", "loud"], "invalid choice: 'loud'"),
        (["--max-message-size", "lots"], "not a size: 'lots'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_say_what_is_wrong(args: list[str], message: str) -> None:
    result = subprocess.run(irisnode(*args), capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert message in result.stderr


def test_port_in_use_is_a_clear_error(node: NodeProcess) -> None:
    result = subprocess.run(
        irisnode("--relay-port", str(node.port)), capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 1
    assert f"cannot listen on relay port {node.port}" in result.stderr


def test_version() -> None:
    from irisnode import __version__

    result = subprocess.run(irisnode("--version"), capture_output=True, text=True, timeout=20)
    assert result.returncode == 0
    assert result.stdout.strip() == f"irisnode {__version__}"
