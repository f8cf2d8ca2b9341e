"""The two kinds of protocol error, after h11: whose fault was it?

A :class:`RemoteProtocolError` means the peer sent something we cannot accept:
log it, drop that one connection, keep everything else running. A
:class:`LocalProtocolError` means our own code tried to do something the protocol
forbids: that is a bug, so it should fail loudly.
"""


class ProtocolError(Exception):
    """Base of both kinds; the message says what was wrong."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the relay protocol; drop its connection with this reason."""


class LocalProtocolError(ProtocolError):
    """We tried to violate the relay protocol ourselves (a bug in the caller)."""
