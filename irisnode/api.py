"""The node's own messaging policies: tunnel windows, offer time, its reserved names.

The port the relay drives the node through (``Messaging``, the endpoint roles) is
:mod:`relay.ports`; these are the node's choices behind it.
"""

from __future__ import annotations

import unicodedata

TUNNEL_WINDOW = 4 * 1024 * 1024
"""Bytes of tunnel data the node accepts from an application before it must wait."""

TUNNEL_CONFIRM_SECONDS = 3.0
"""How long a service has to accept a tunnel offer before the offer is withdrawn."""


RESERVED_PREFIX = "$"
"""Cluster names the node keeps for itself (see :mod:`irisnode.system`): applications cannot
register them, and a request to one the node does not serve fails at once."""

_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def is_reserved(name: str) -> bool:
    """Whether ``name`` is in the node's namespace: it starts with ``$``, or with a look-alike.

    Look-alikes are characters that read as ``$`` (fullwidth U+FF04, small U+FE69: their
    NFKC form is ``$``), possibly after invisible ones (spaces, controls, zero-width
    characters), so that no application can pose as a node service in a listing.
    """
    for char in name:
        if char == RESERVED_PREFIX:
            return True
        if unicodedata.category(char) not in _INVISIBLE:
            return unicodedata.normalize("NFKC", char).startswith(RESERVED_PREFIX)
    return False
