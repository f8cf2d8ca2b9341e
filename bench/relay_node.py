"""The node under test: starting an ``irisnode`` subprocess, and reading any node's costs from /proc.

CPU time is utime + stime of ``/proc/PID/stat`` (clock ticks, usually 10 ms), so a
figure per operation is only as good as the window is long; memory is VmRSS
(resident now) and VmHWM (resident peak) of ``/proc/PID/status``.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

READY = re.compile(rb"ready: relay on (?:\[[0-9a-fA-F:.]+\]|[0-9.]+|[\w.-]+):(\d+)")
"""The node's ready log line on stderr; the first address carries the port."""
TRACEBACK = re.compile(rb"Traceback \(most recent call last\)|Unhandled Error|Unhandled error")
"""A line that means some code failed with an exception the node did not handle."""


class NodeError(Exception):
    """The node did not start, or its process cannot be read."""


class ProcStats:
    """Resource usage of one process (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ticks = os.sysconf("SC_CLK_TCK")

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU seconds the process has used so far."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as file:
                stat = file.read()
        except OSError as error:
            raise NodeError(f"cannot read /proc/{self.pid}/stat: {error}") from None
        # Fields after the command name, which is in parentheses and may contain spaces.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return int(fields[11]) / self._ticks, int(fields[12]) / self._ticks

    def cpu_seconds(self) -> float:
        user, system = self.cpu_times()
        return user + system

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM in bytes."""
        result = {}
        try:
            with open(f"/proc/{self.pid}/status", "rb") as file:
                for line in file:
                    key, _, value = line.partition(b":")
                    if key in (b"VmRSS", b"VmHWM"):
                        result[key.decode()] = int(value.split()[0]) * 1024
        except OSError as error:
            raise NodeError(f"cannot read /proc/{self.pid}/status: {error}") from None
        return result

    def rss(self) -> int:
        return self.memory().get("VmRSS", 0)


def compile_node() -> None:
    """Write the node's bytecode first, as an installed package has it.

    Where PYTHONDONTWRITEBYTECODE is set (as on the machines here), every start would
    otherwise compile our modules again, which is not what a user's start costs.
    """
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in ("irisnode", "relay", "overlay"):
        compileall.compile_dir(str(root / package), quiet=1)


class NodeProcess:
    """``irisnode --relay-port 0`` in a subprocess of this Python, ready to take connections.

    Its stderr is drained by a thread for as long as it runs (a full pipe would stall
    the node); the last lines are kept for error messages.
    """

    def __init__(
        self,
        extra_args: list[str] | None = None,
        timeout: float = 30.0,
        python_path: str | None = None,
        on_line: Callable[[bytes], None] | None = None,
    ) -> None:
        """``python_path``: run the node from that source tree instead (to compare two trees);
        ``on_line``: called (in the draining thread) with every line the node logs."""
        compile_node()
        self._on_line = on_line
        argv = [sys.executable, "-m", "irisnode", "--relay-port", "0", *(extra_args or [])]
        self._ready = threading.Event()
        self._log: collections.deque[bytes] = collections.deque(maxlen=50)
        self.log_lines = 0
        self.tracebacks = 0
        """Lines of the log that start a traceback or report an unhandled error."""
        self.port = 0
        started = time.perf_counter()
        env = None if python_path is None else {**os.environ, "PYTHONPATH": python_path}
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=python_path,  # ``-m`` puts the working directory first on sys.path
        )
        assert self.process.stderr is not None
        self._reader = threading.Thread(
            target=self._drain, args=(self.process.stderr,), name="node-stderr", daemon=True
        )
        self._reader.start()
        self._ready.wait(timeout)
        if not self.port:
            self.stop()
            raise NodeError(f"node was not ready within {timeout} s; its log ends:\n{self.log}")
        self.ready_seconds = self._ready_at - started
        self.pid = self.process.pid

    def _drain(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._log.append(line)
            self.log_lines += 1
            if TRACEBACK.search(line):
                self.tracebacks += 1
            if self._on_line is not None:
                self._on_line(line)
            if not self.port:
                match = READY.search(line)
                if match:
                    self._ready_at = time.perf_counter()
                    self.port = int(match.group(1))
                    self._ready.set()
        self._ready.set()  # the node exited: stop waiting

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def log(self) -> str:
        return b"".join(self._log).decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers (this process started it, by PID)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._reader.join(timeout)
