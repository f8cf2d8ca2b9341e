"""The examples in docs/bindings.md run as written, against a real node (port 0)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from irisnode.node import Node, NodeConfig
from tests.support import reactor

DOC = Path(__file__).resolve().parent.parent / "docs" / "bindings.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


@pytest_twisted.async_yield_fixture
async def node() -> AsyncIterator[Node]:
    running = Node(reactor, NodeConfig(relay_port=0))
    running.start()
    yield running
    await running.stop()


def test_the_doc_has_one_example_per_api() -> None:
    assert [("txclient" in e, "aioclient" in e, "blocking" in e) for e in EXAMPLES] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]


@pytest.mark.parametrize("index", range(3), ids=["twisted", "asyncio", "blocking"])
@pytest_twisted.ensureDeferred
async def test_example_runs(node: Node, index: int) -> None:
    source = EXAMPLES[index]
    assert "PORT = 55555\n" in source
    source = source.replace("PORT = 55555\n", f"PORT = {node.relay_port}\n")
    done = await deferToThread(
        subprocess.run,
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DOC.parent.parent,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello\n", "")
