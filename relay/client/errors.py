"""The exceptions a binding user sees, one type per outcome they must tell apart.

Argument mistakes (an empty cluster, an empty message, a timeout under 1 ms, a
second subscription to one topic) are plain :class:`ValueError` raised before
anything is sent: they are bugs in the calling code, not events on the wire.
"""

from __future__ import annotations


class IrisError(Exception):
    """Base of every error the relay bindings report."""


class Timeout(IrisError, TimeoutError):
    """The operation did not complete in time (request, tunnel set-up, send, recv).

    Also a builtin :class:`TimeoutError`, so generic timeout handling catches it.
    """


class RemoteFault(IrisError):
    """The remote service failed the request; ``str()`` is exactly its fault text."""

    def __init__(self, fault: str) -> None:
        super().__init__(fault)
        self.fault = fault

    def __str__(self) -> str:
        return self.fault


class ConnectionClosed(IrisError):
    """The connection or tunnel ended before (or while) the operation could complete.

    ``reason`` is empty after a graceful close and otherwise says why it ended.
    """

    def __init__(self, message: str = "closed", reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionDenied(IrisError):
    """The node refused the handshake (an unsupported protocol version); carries its reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"connection denied: {reason}")
        self.reason = reason


class ProtocolViolation(IrisError):
    """The node sent something the protocol does not allow; the connection was dropped."""
