"""Python bindings for the Iris relay protocol: talk to your local node.

Three APIs over one sans-I/O core (:mod:`relay.client.core`):

* :mod:`relay.client.txclient` for Twisted (Deferreds);
* :mod:`relay.client.aioclient` for asyncio (``async def``), no Twisted needed;
* :mod:`relay.client.blocking` for scripts (plain blocking calls).

See ``docs/bindings.md``. The exceptions and limits are shared and re-exported here.
"""

from relay.client.errors import (
    ConnectionClosed,
    ConnectionDenied,
    IrisError,
    ProtocolViolation,
    RemoteFault,
    Timeout,
)
from relay.client.pool import Limits, ServiceLimits

__all__ = [
    "ConnectionClosed",
    "ConnectionDenied",
    "IrisError",
    "Limits",
    "ProtocolViolation",
    "RemoteFault",
    "ServiceLimits",
    "Timeout",
]
