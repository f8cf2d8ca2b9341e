"""Every ``irisnode`` subcommand as a process, against a real node process on loopback."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from irisnode.commands.status import STATUS_BODY
from irisnode.system import STATUS
from overlay.ids import format_id, key_for
from relay import codec
from relay.client import blocking
from tests.lan import wait_until
from tests.processes import NodeProcess, Running, network_key, network_node, run


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    running = NodeProcess()
    yield running
    running.kill()


def relay(node: NodeProcess) -> list[str]:
    return ["--relay-port", str(node.port)]


def serving(node: NodeProcess, cluster: str, *how: str) -> Running:
    service = Running("serve", cluster, *how, *relay(node))
    service.wait_line(rf"serving {re.escape(cluster)} on relay port")
    return service


# -- request and serve ---------------------------------------------------------------


def test_request_gets_the_reply_of_serve_echo(node: NodeProcess) -> None:
    service = serving(node, "echo", "--echo")
    try:
        assert run("request", "echo", "hello", *relay(node)).stdout == "hello\n"
        piped = run("request", "echo", "-", "--raw", *relay(node), stdin="from stdin")
        assert (piped.returncode, piped.stdout) == (0, "from stdin")
        empty = run("request", "echo", "--raw", *relay(node))  # an empty request is allowed
        assert (empty.returncode, empty.stdout) == (0, "")
    finally:
        code, _, _ = service.stop()
    assert code == 0


def test_serve_exec_runs_a_command_per_request_and_stops_after_count(node: NodeProcess) -> None:
    service = serving(node, "upper", "--exec", "tr a-z A-Z", "--count", "2")
    assert run("request", "upper", "one", *relay(node)).stdout == "ONE\n"
    assert run("request", "upper", "two", *relay(node)).stdout == "TWO\n"
    code, _, _ = service.finish()
    assert code == 0
    gone = run("request", "upper", "three", "--timeout", "0.3", *relay(node))
    assert gone.returncode == 1


def test_a_failing_command_answers_with_a_fault(node: NodeProcess) -> None:
    service = serving(node, "broken", "--exec", "sh -c 'echo out of order >&2; exit 3'")
    try:
        result = run("request", "broken", "x", *relay(node))
        assert result.returncode == 1
        assert result.stderr == "irisnode request: out of order\n"
        silent = serving(node, "silent", "--exec", "false")
        slow = serving(node, "slow", "--exec", "sleep 30", "--timeout", "0.2")
        try:
            assert run("request", "silent", "x", *relay(node)).stderr.endswith(
                "false exited with status 1\n"
            )
            assert run("request", "slow", "x", *relay(node)).stderr.endswith(
                "sleep took longer than 0.2 s\n"
            )
        finally:
            silent.stop()
            slow.stop()
    finally:
        service.stop()


def test_request_without_an_answer_or_a_node(node: NodeProcess) -> None:
    nobody = run("request", "nobody-serves-this", "x", "--timeout", "0.2", *relay(node))
    assert (nobody.returncode, nobody.stderr) == (1, "irisnode request: no answer within 0.2 s\n")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    closed = run("request", "echo", "x", "--relay-port", str(port))
    assert closed.returncode == 1
    assert f"no node on relay port {port}" in closed.stderr


# -- broadcast, publish, subscribe ------------------------------------------------------


def member(port: int, cluster: str) -> tuple[socket.socket, codec.Decoder[codec.NodePacket]]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(codec.Init(cluster).encode())
    decoder = codec.client_decoder()
    assert next_packet(sock, decoder) == codec.Accepted()
    return sock, decoder


def next_packet(sock: socket.socket, decoder: codec.Decoder[codec.NodePacket]) -> object:
    while True:
        packets = decoder.feed(sock.recv(65536))
        if packets:
            (packet,) = packets
            return packet


def test_broadcast_reaches_every_member(node: NodeProcess) -> None:
    members = [member(node.port, "workers") for _ in range(2)]
    result = run("broadcast", "workers", "reload", *relay(node))
    assert result.returncode == 0, result.stderr
    for sock, decoder in members:
        assert next_packet(sock, decoder) == codec.BroadcastDelivered(b"reload")
        sock.close()
    empty = run("broadcast", "workers", "-", *relay(node), stdin="")
    assert empty.returncode == 1 and "the message is empty" in empty.stderr


def test_subscribe_prints_what_publish_sends(node: NodeProcess) -> None:
    watcher = Running("subscribe", "news", "weather", "--json", "--count", "4", *relay(node))
    plain = Running("subscribe", "news", "--count", "2", *relay(node))
    for process in (watcher, plain):
        process.wait_line("subscribed to")
    assert run("publish", "news", "extra!", *relay(node)).returncode == 0
    lines = run("publish", "weather", *relay(node), stdin="sun\n\nrain\n\xff-no-utf8\n")
    assert lines.returncode == 0, lines.stderr
    assert run("publish", "news", "-", *relay(node), stdin="late\n").returncode == 0
    code, out, _ = watcher.finish()
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"topic": "news", "data": "extra!"},
        {"topic": "weather", "data": "sun"},
        {"topic": "weather", "data": "rain"},
        {"topic": "weather", "data": "\xff-no-utf8"},  # text to us: UTF-8 from our stdin
    ]
    code, out, _ = plain.finish()
    assert (code, out) == (0, b"extra!\nlate\n")


def test_subscribe_json_shows_binary_events_as_base64(node: NodeProcess) -> None:
    watcher = Running("subscribe", "raw", "--json", "--count", "1", *relay(node))
    watcher.wait_line("subscribed to")
    with blocking.connect(node.port) as conn:
        conn.publish("raw", b"\xff\x00")
    code, out, _ = watcher.finish()
    assert code == 0
    assert json.loads(out) == {"topic": "raw", "data_base64": "/wA="}


def test_subscribe_ends_when_interrupted(node: NodeProcess) -> None:
    watcher = Running("subscribe", "quiet", *relay(node))
    watcher.wait_line("subscribed to")
    code, out, _ = watcher.stop()
    assert (code, out) == (0, b"")


# -- tunnel ------------------------------------------------------------------------------


def test_tunnel_carries_stdin_and_stdout_like_nc(node: NodeProcess) -> None:
    service = serving(node, "echo-tunnel", "--echo")
    try:
        data = "line one\n" + "x" * 200_000 + "\nlast\n"
        result = run("tunnel", "echo-tunnel", "--linger", "2", *relay(node), stdin=data)
        assert result.returncode == 0, result.stderr
        assert result.stdout == data
    finally:
        service.stop()
    nobody = run("tunnel", "nobody-here", "--timeout", "0.3", *relay(node), stdin="x")
    assert nobody.returncode == 1
    assert "no member of 'nobody-here' took the tunnel" in nobody.stderr


# -- status, lookup, bench -----------------------------------------------------------


def test_status_counts_other_clients_and_both_directions(node: NodeProcess) -> None:
    document = node.status_json()
    relay_state = document["relay"]
    assert isinstance(relay_state, dict)
    assert relay_state["bytes_out"] > 0 and relay_state["bytes_in"] > 0
    text = run("status", *relay(node)).stdout
    assert "no other clients" not in text  # "0 other clients": the query is not counted
    assert re.search(r"relay: 127\.0\.0\.1:\d+ and \[::1\]:\d+, 0 other clients,", text), text
    assert re.search(r"messaging: \d+ requests, \d+ replies", text)
    service = serving(node, "visible", "--echo")
    try:
        wait_until(
            lambda: "visible (1 member)" in run("status", *relay(node)).stdout,
            10,
            "the cluster in the status",
        )
    finally:
        service.stop()


def test_the_bindings_can_ask_the_node_for_its_status(node: NodeProcess) -> None:
    with blocking.connect(node.port) as conn:
        state = json.loads(conn.request(STATUS, STATUS_BODY, timeout=2.0))
    assert state["relay"]["addresses"][0] == f"127.0.0.1:{node.port}"


def test_lookup_by_key_cluster_or_topic(tmp_path: Path) -> None:
    key = network_key(tmp_path, "lookups")
    alone = network_node(key, "lookups")
    try:
        own = alone.status_json()["overlay"]
        assert isinstance(own, dict)
        port = ["--relay-port", str(alone.port)]
        for how in (["0123456789abcdef0123456789ABCDEF"], ["--cluster", "echo"], ["--topic", "n"]):
            result = run("lookup", *how, *port)
            assert (result.returncode, result.stdout) == (0, f"{own['node_id']}\n"), how
        both = run("lookup", "0" * 32, "--cluster", "echo", *port)
        assert both.returncode == 2 and "not allowed with" in both.stderr
    finally:
        alone.stop()
    assert format_id(key_for("cluster", "echo")) != format_id(key_for("topic", "echo"))


def test_lookup_in_developer_mode_says_why_not(node: NodeProcess) -> None:
    result = run("lookup", "--cluster", "echo", *relay(node))
    assert result.returncode == 1
    assert "developer mode" in result.stderr


def test_status_says_alone_and_why_when_the_seed_refuses(tmp_path: Path) -> None:
    ours, theirs = network_key(tmp_path, "ours"), network_key(tmp_path, "theirs")
    seed = network_node(ours, "ours")
    stranger = network_node(theirs, "theirs", seeds=[seed.link_port or 0])
    try:
        seed_text = run("status", "--relay-port", str(seed.port)).stdout
        assert "state: alone: no other node is linked to it" in seed_text
        assert "no --seed given and discovery is off (--no-discovery)" in seed_text

        def refused() -> bool:
            text = run("status", "--relay-port", str(stranger.port)).stdout
            return f"127.0.0.1:{seed.link_port} refused: wrong-network" in text

        wait_until(refused, 15, "the refusal in the status")
        text = run("status", "--relay-port", str(stranger.port)).stdout
        assert "state: alone" in text and "(joined)" not in text
        assert "peers: 0" in text
        friend = network_node(ours, "ours", seeds=[seed.link_port or 0])
        try:
            wait_until(
                lambda: (
                    "joined, 1 peer linked"
                    in run("status", "--relay-port", str(friend.port)).stdout
                ),
                15,
                "the friend joined",
            )
            peers = run("status", "--relay-port", str(friend.port)).stdout
            assert f"link up    leaf  127.0.0.1:{seed.link_port}" in peers, peers
        finally:
            friend.stop()
    finally:
        stranger.stop()
        seed.stop()


def test_bench_measures_a_running_node(node: NodeProcess, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run(
        "bench", *relay(node), "--quick", "--duration", "0.15", "--warmup", "0.05",
        "--scenarios", "rr-c1-16B-s1", "--json", str(out),
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.read_text())
    assert document["node"]["address"] == f"127.0.0.1:{node.port}"
    (record,) = document["scenarios"]
    assert record["name"] == "rr-c1-16B-s1" and record["error"] is None
    assert "rr-c1-16B-s1" in result.stdout
