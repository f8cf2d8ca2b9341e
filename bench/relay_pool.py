"""Load-generator processes: a small pool of spawned workers that run benchmark roles.

Workers are started once and reused by every scenario, so a scenario costs no
process start-up and the quick run stays quick. Each worker talks to the
coordinator over its own pipe:

* coordinator → worker: ``("run", (role, params, netns))``, ``("go", window)``,
  ``("stop", None)``, ``("exit", None)``; with a network namespace's name as ``netns``
  the role runs inside that namespace (the benchmark on a LAN, as root), else in the
  worker's own;
* worker → coordinator: ``("ready", info)`` once the role is connected and waiting,
  then ``("result", dict)`` or ``("error", text)``.

A worker that does not answer in time is killed (by its own PID, which the pool
started) and replaced, so one stuck role never stalls the benchmark.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NamedTuple

Result = dict[str, Any]


class Window(NamedTuple):
    """The measured interval, in ``time.monotonic_ns()`` (one clock for every process)."""

    start_ns: int
    end_ns: int

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class Stopped(Exception):
    """The coordinator called the role off before it started."""


class RoleFailed(Exception):
    """A role reported an error, or its worker stopped answering."""


class Control:
    """A role's line to the coordinator: report ready, learn the window, watch for stop."""

    __slots__ = ("_pipe", "stopped", "window")

    def __init__(self, pipe: Connection) -> None:
        self._pipe = pipe
        self.stopped = False
        self.window: Window | None = None

    def fileno(self) -> int:
        return self._pipe.fileno()

    def ready(self, **info: Any) -> None:
        self._pipe.send(("ready", info))

    def wait_go(self, timeout: float = 60.0) -> Window:
        """Block until the window is known; raises :class:`Stopped` if called off instead."""
        deadline = time.monotonic() + timeout
        while self.window is None and not self.stopped:
            if not self._pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RoleFailed("no start signal from the coordinator")
            self.poll()
        if self.window is None:
            raise Stopped
        return self.window

    def poll(self) -> None:
        """Take in whatever the coordinator sent (the window, or stop) without blocking."""
        try:
            while not self.stopped and self._pipe.poll():
                kind, value = self._pipe.recv()
                if kind == "go":
                    self.window = Window(*value)
                else:
                    self.stopped = True
        except (EOFError, OSError):
            self.stopped = True

    def stop_requested(self) -> bool:
        self.poll()
        return self.stopped


Role = Callable[..., Result]


def _worker_main(pipe: Connection) -> None:
    """The loop of one worker process: run roles until told to exit."""
    from bench.relay_roles import ROLES

    while True:
        try:
            kind, value = pipe.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if kind == "exit":
            return
        if kind != "run":
            continue  # a late "go" or "stop" for a role that already ended
        role, params, netns = value
        try:
            with _namespace(netns):
                result = ROLES[role](Control(pipe), **params)
        except Stopped:
            result = {"stopped": True}
        except KeyboardInterrupt:
            return
        except Exception as error:
            detail = traceback.format_exc(limit=3)
            pipe.send(("error", f"{role}: {type(error).__name__}: {error}\n{detail}"))
            continue
        pipe.send(("result", result))


def _namespace(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Inside network namespace ``name`` for the block (this worker has one thread, so its
    sockets are made there), or where the worker is if None."""
    if name is None:
        return contextlib.nullcontext()
    from tests.lan import in_netns

    return in_netns(name)


class Worker:
    """The coordinator's handle on one worker process."""

    def __init__(self, context: multiprocessing.context.SpawnContext, index: int) -> None:
        self._context = context
        self.index = index
        self.busy = False
        self._spawn()

    def _spawn(self) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, args=(theirs,), name=f"bench-worker-{self.index}", daemon=True
        )
        process.start()
        theirs.close()
        self.pipe: Connection = ours
        self.process: BaseProcess = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def run(self, role: str, params: dict[str, Any], netns: str | None = None) -> None:
        self.busy = True
        self.pipe.send(("run", (role, params, netns)))

    def go(self, window: Window) -> None:
        self.pipe.send(("go", tuple(window)))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(("stop", None))

    def expect(self, kind: str, deadline: float) -> Any:
        """Wait (until ``deadline``, monotonic seconds) for a ``kind`` message."""
        try:
            if not self.pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RoleFailed(f"worker {self.index} did not answer in time")
            got, value = self.pipe.recv()
        except (EOFError, OSError) as error:
            raise RoleFailed(f"worker {self.index} died: {error}") from None
        if got == "error":
            self.busy = False
            raise RoleFailed(value)
        if got == "result":
            self.busy = False
            if kind != "result":
                raise RoleFailed(f"worker {self.index} ended before it was ready: {value}")
        return value

    def restart(self) -> None:
        """Kill this worker's process (we started it) and put a fresh one in its place."""
        self.process.kill()
        self.process.join(2.0)
        self.pipe.close()
        self.busy = False
        self._spawn()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(("exit", None))
        self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        self.pipe.close()


class Pool:
    """A fixed set of worker processes (spawned, not forked: no inherited state)."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.workers = [Worker(context, index) for index in range(size)]

    def take(self, count: int) -> list[Worker]:
        if count > len(self.workers):
            raise ValueError(f"scenario needs {count} workers, the pool has {len(self.workers)}")
        return self.workers[:count]

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
