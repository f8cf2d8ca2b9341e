"""``irisnode`` as a user runs it: node processes, and commands run as processes next to them."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

READY = re.compile(r"ready: relay on 127\.0\.0\.1:(\d+)")
LINK_PORT = re.compile(r"ready: .*links on port (\d+)")
STATUS_PAGE = re.compile(r"ready: .*status page on (http://\S+/)")


def irisnode(*args: str) -> list[str]:
    return [sys.executable, "-m", "irisnode", *args]


def run(
    *args: str, stdin: bytes | str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``irisnode ARGS`` to completion; text output."""
    data = stdin.decode() if isinstance(stdin, bytes) else stdin
    return subprocess.run(
        irisnode(*args), input=data, capture_output=True, text=True, timeout=timeout
    )


class Running:
    """A long-running ``irisnode`` process whose stderr is read line by line."""

    def __init__(self, *args: str, stdin: int | None = subprocess.DEVNULL) -> None:
        self.process = subprocess.Popen(
            irisnode(*args), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self._partial = b""

    def wait_line(self, pattern: re.Pattern[str] | str, timeout: float = 20) -> re.Match[str]:
        """Read stderr until a line matches; fail with what was read if the process ends first."""
        wanted = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[seen:]:
                if match := wanted.search(line):
                    return match
            seen = len(self.lines)
            if time.monotonic() > deadline or not self._read_some(deadline):
                self.kill()
                raise AssertionError(
                    f"no line like {wanted.pattern!r} from {self.process.args!r}: {self.lines}"
                )

    def _read_some(self, deadline: float) -> bool:
        """Read what stderr has (raw, so select stays truthful); False at its end or timeout."""
        stderr = self.process.stderr
        assert stderr is not None
        readable, _, _ = select.select([stderr], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return False
        data = os.read(stderr.fileno(), 65536)
        if not data:
            return False
        *complete, self._partial = (self._partial + data).split(b"\n")
        self.lines += [line.decode(errors="replace") + "\n" for line in complete]
        return True

    def finish(self, timeout: float = 20) -> tuple[int, bytes, str]:
        """Wait for the exit: (code, stdout, all of stderr)."""
        out, rest = self.process.communicate(timeout=timeout)
        text = (self._partial + rest).decode(errors="replace")
        return self.process.returncode, out, "".join(self.lines) + text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, bytes, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.finish(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class NodeProcess(Running):
    """``irisnode --relay-port 0 ARGS``, up once it printed its ready line."""

    def __init__(self, *args: str) -> None:
        super().__init__("--relay-port", "0", *args)
        ready = self.wait_line(READY)
        self.port = int(ready.group(1))
        link = LINK_PORT.search(ready.string)
        self.link_port = int(link.group(1)) if link else None
        page = STATUS_PAGE.search(ready.string)
        self.status_page = page.group(1) if page else None

    def status_json(self) -> dict[str, Any]:
        """``irisnode status --json`` of this node."""
        result = run("status", "--json", "--relay-port", str(self.port))
        assert result.returncode == 0, result.stderr
        document: dict[str, Any] = json.loads(result.stdout)
        return document


def network_key(directory: Path, network: str) -> Path:
    """A key file for ``network``, made by ``irisnode keygen``."""
    path = directory / f"{network}.key"
    if not path.exists():
        result = run("keygen", "--net", network, "-o", str(path))
        assert result.returncode == 0, result.stderr
    return path


def network_node(key: Path, network: str, *args: str, seeds: Sequence[int] = ()) -> NodeProcess:
    """A node of ``network`` on loopback only: no multicast, links on a free port,
    dialled by its peers on 127.0.0.1."""
    seeding = [arg for port in seeds for arg in ("--seed", f"127.0.0.1:{port}")]
    return NodeProcess(
        *("--net", network, "--key", str(key), "--no-discovery", "--link-port", "0"),
        *("--advertise", "127.0.0.1", *seeding, *args),
    )
