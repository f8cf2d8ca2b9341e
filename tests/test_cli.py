"""The ``irisnode`` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import codec
from tests.lan import wait_until
from tests.processes import NodeProcess, irisnode, network_key, network_node, run


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    running = NodeProcess()
    yield running
    running.kill()


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
    assert node.status_page is None  # no HTTP unless --metrics asks for it
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
        code, _, _ = node.stop(sig)
        assert time.monotonic() - started < 1.5
        assert code == 0
        got = receive(client, client_decoder)
        while len(got) < 2:
            more = receive(client, client_decoder)
            assert more, f"connection ended after {got}"
            got += more
        assert got == [codec.TimedOut(7), codec.Closed("node shutting down")]
    finally:
        node.kill()


def test_json_log_lines() -> None:
    node = NodeProcess("--log-format", "json")
    _, _, output = node.stop()
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


# -- rough edges a new user hits (issue 8, part 4) ---------------------------------------


@pytest.mark.parametrize("level", ["WARN", "warning", "Warning", "ERROR", "Debug"])
def test_log_levels_in_any_case_and_by_their_usual_names(level: str) -> None:
    result = run("--log-level", level, "--version")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args", [["--link-port", "5000"], ["--no-discovery"], ["--discovery-port", "5000"]]
)
def test_network_options_without_a_network_are_refused(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert f"{args[0]}: only with --net and --key" in result.stderr


@pytest.mark.parametrize(
    ("word", "hint"),
    [("stauts", "did you mean 'status'?"), ("frobnicate", "commands: status, lookup, request")],
)
def test_unknown_commands_get_a_hint(word: str, hint: str) -> None:
    result = run(word)
    assert result.returncode == 2
    assert f"unknown command {word!r}" in result.stderr
    assert hint in result.stderr


def test_a_bad_option_of_a_command_shows_that_commands_usage() -> None:
    result = run("status", "--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: irisnode status")
    assert "unrecognized arguments: --bogus" in result.stderr


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "soon"])
def test_status_timeout_must_be_positive(timeout: str) -> None:
    result = run("status", "--timeout", timeout)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--timeout" in result.stderr and "seconds" in result.stderr


def test_every_command_has_help_with_a_description_and_an_example() -> None:
    from irisnode.commands import COMMANDS, build_parser

    for name in COMMANDS:
        text = build_parser(name).format_help()
        assert text.startswith(f"usage: irisnode {name}"), name
        assert "example:\n  irisnode " in text, name
        description = text.split("\n\n")[1]
        assert len(description.split()) > 10, (name, description)
    keygen = run("keygen", "--help")
    assert keygen.returncode == 0
    assert "mode 0600" in keygen.stdout


def test_top_level_help_lists_the_commands_and_shows_defaults() -> None:
    from irisnode.commands import COMMANDS

    result = run("--help")
    assert result.returncode == 0
    for name, summary in COMMANDS.items():
        assert f"{name}" in result.stdout and summary in result.stdout
    assert "(default: text)" in result.stdout  # --log-format
    assert "default 55556" in result.stdout  # --link-port
    status = run("status", "--help")
    assert "(default: 55555)" in status.stdout and "(default: 2.0)" in status.stdout


def test_keygen_writes_the_key_for_its_owner_only(tmp_path: Path) -> None:
    key = network_key(tmp_path, "office")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_key_file_others_can_read_is_accepted_with_a_warning(tmp_path: Path) -> None:
    key = network_key(tmp_path, "office")
    quiet = network_node(key, "office")
    quiet.stop()
    assert not any("warning" in line for line in quiet.lines)
    key.chmod(0o644)
    node = network_node(key, "office")
    try:
        warning = node.wait_line(r"irisnode: warning: the network key")
        assert "mode 0644" in warning.string and f"chmod 600 {key}" in warning.string
    finally:
        node.stop()


def test_a_busy_link_port_is_one_clear_line_before_ready(tmp_path: Path) -> None:
    key = network_key(tmp_path, "office")
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(
            "--relay-port", "0", "--net", "office", "--key", str(key), "--no-discovery",
            "--link-port", str(port),
        )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("irisnode: cannot join the network: ")
    assert "Address already in use" in lines[0]


def test_a_busy_metrics_port_is_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("--relay-port", "0", "--metrics", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"irisnode: cannot listen on metrics address 127.0.0.1:{port}: "
        "[Errno 98] Address already in use"
    ]


def test_routine_link_events_are_not_logged_as_failures(tmp_path: Path) -> None:
    key = network_key(tmp_path, "office")
    first = network_node(key, "office")
    second = network_node(key, "office", seeds=[first.link_port or 0])
    try:
        for node in (first, second):
            port = str(node.port)
            wait_until(
                lambda: "joined" in run("status", "--relay-port", port).stdout,  # noqa: B023
                15,
                "both nodes joined",
            )
    finally:
        logs = [node.stop()[2] for node in (second, first)]
    for log in logs:
        assert "link established" in log or "overlay started" in log
        assert "link failed" not in log, log
        assert "Traceback" not in log and "ReactorNotRunning" not in log
