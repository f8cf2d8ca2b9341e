"""Several networked nodes in this process, on loopback, joined through seeds (no multicast)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from irisnode.node import NetworkConfig, Node, NodeConfig
from overlay.identity import NetworkKey
from tests.support import reactor, wait_for


class Cluster:
    """Several nodes of one network, all in this process."""

    def __init__(self, key_file: Path, name: str) -> None:
        self.key_file = key_file
        self.name = name
        self.nodes: list[Node] = []

    async def start(self, *, seed: Node | None = None, key_file: Path | None = None) -> Node:
        seeds = () if seed is None else (f"127.0.0.1:{seed.overlay.link_port}",)
        network = NetworkConfig(
            name=self.name,
            key_file=str(key_file or self.key_file),
            link_port=0,
            link_interface="127.0.0.1",
            discovery=False,
            seeds=seeds,
            advertise=("127.0.0.1",),
        )
        node = Node(reactor, NodeConfig(relay_port=0, network=network))
        node.start()
        self.nodes.append(node)
        await wait_for(lambda: node.overlay is not None or node.failed, 5.0, "overlay start")
        assert node.failed is None
        return node

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A network "testnet" whose key is in ``tmp_path``; every node is stopped afterwards."""
    key_file = tmp_path / "net.key"
    NetworkKey.generate("testnet", os.urandom).save(key_file)
    running = Cluster(key_file, "testnet")
    yield running
    await running.stop()
