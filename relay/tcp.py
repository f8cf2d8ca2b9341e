"""What the relay asks of a TCP connection beyond Twisted's public API.

Two things, both Linux TCP transports only, both degrading to "no" elsewhere:

* :func:`idle_socket`: the socket of a transport whose write buffer is empty, so the
  relay can write to it directly (it saves a reactor turn per write). There is no
  public way to ask Twisted whether a transport's buffer is empty, so this reads
  ``FileDescriptor`` internals, for the Twisted releases in
  :data:`TWISTED_SHORTCUT_VERSIONS` only (the dependency's range in
  ``pyproject.toml``; ``tests/test_twisted_internals.py`` fails loudly on any other).
  Correctness never depends on it: backpressure uses only the producer contract.
* :func:`client_gone`: whether the client of a connection the node is not reading
  has closed or reset its end (nothing polls such a connection, so nothing else
  would notice).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted import __version__ as twisted_version
from twisted.internet.abstract import FileDescriptor

TWISTED_SHORTCUT_VERSIONS = ((24, 3), (27, 0))
"""Twisted releases (from, up to but not including) whose TCP transport internals
:func:`idle_socket` was written for."""

_TCP_ESTABLISHED = 1


def _internals_present() -> bool:
    """Whether this Twisted's TCP transports keep their write buffer where we look."""
    major, minor = (int(part) for part in twisted_version.split(".")[:2])
    low, high = TWISTED_SHORTCUT_VERSIONS
    if not low <= (major, minor) < high:
        return False
    sample = FileDescriptor(reactor=object())  # type: ignore[arg-type]  # never started
    names = ("dataBuffer", "offset", "_tempDataLen", "connected", "disconnecting")
    return all(hasattr(sample, name) for name in names)


SOCKET_SHORTCUT = _internals_present()
"""Write straight to an idle TCP socket; off on a Twisted whose internals may have moved,
where everything goes through ``transport.write``."""


def idle_socket(transport: Any) -> socket.socket | None:
    """The socket of a Twisted TCP transport with nothing buffered, else None."""
    sock = getattr(transport, "socket", None)
    if (
        SOCKET_SHORTCUT
        and isinstance(sock, socket.socket)
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        return sock
    return None


def client_gone(transport: Any) -> bool:
    """Whether the client of a TCP transport has closed or reset its end.

    The TCP state says it (``CLOSE_WAIT`` after the client's FIN, ``CLOSE`` after a
    reset) even while unread data is still waiting, unless the client's close is
    itself still queued behind data the node has not let in.
    """
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return bool(state != _TCP_ESTABLISHED)
