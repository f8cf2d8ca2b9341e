"""The groups a node shows (status, metrics, the status page): clusters and topics.

Until messaging crosses nodes, a node knows only its own members and subscribers,
so that is what :func:`groups` reports (``"scope": "node"``). When clusters and
topics become network-wide (Scribe trees), this is the one function to change:
everything that shows groups reads them here.
"""

from __future__ import annotations

from typing import Any

from irisnode.api import RESERVED_PREFIX
from irisnode.broker import Broker


def groups(broker: Broker) -> dict[str, Any]:
    """``{"scope", "clusters": {name: members}, "topics": {name: subscribers}}``.

    The node's own reserved clusters (``$node.status``...) are left out: they are
    not groups anyone joined.
    """
    clusters, topics = broker.group_sizes()
    return {
        "scope": "node",
        "clusters": {
            name: size for name, size in clusters.items() if not name.startswith(RESERVED_PREFIX)
        },
        "topics": topics,
    }
