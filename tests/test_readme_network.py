"""README's two-node example, run as pasted (with free ports instead of the fixed ones)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _example() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A network of nodes") :]
    block: str = re.findall(r"```sh\n(.*?)```", section, re.S)[1]
    return block.replace("\\\n", " ").strip().splitlines()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    """As a person pasting line by line would: the node they started is up by now."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


def test_the_readme_two_node_example_works_when_pasted(tmp_path: Path) -> None:
    ports = {str(fixed): str(_free_port()) for fixed in (55555, 55556, 55565, 55566)}
    background: list[subprocess.Popen[bytes]] = []
    try:
        last = None
        for line in _example():
            command = line.split("#")[0].strip()
            for fixed, free in ports.items():
                command = command.replace(fixed, free)
            command = command.replace(".venv/bin/", f"{BIN}/")
            args = shlex.split(command.rstrip("&").strip())
            if "--net" not in args and "--relay-port" in args:
                _wait_listening(int(args[args.index("--relay-port") + 1]))
            if command.endswith("&"):
                background.append(subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.DEVNULL))
                continue
            deadline = time.monotonic() + 20
            while True:
                last = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
                if last.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)  # a node still starting, or the tree still forming
            assert last.returncode == 0, (command, last.stderr)
        assert last is not None and last.stdout.strip() == "across"
    finally:
        for process in background:
            os.kill(process.pid, signal.SIGTERM)
        for process in background:
            process.wait(timeout=10)
