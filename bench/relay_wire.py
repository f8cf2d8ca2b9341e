"""Blocking relay-protocol connections for the load generators: plain sockets plus ``relay.codec``.

Independent of the Python bindings on purpose: the benchmark measures the node and
nothing else, and it can measure any node that speaks the protocol.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from relay import codec
from relay.codec import Accepted, Closed, Denied, NodePacket

RECV_SIZE = 256 * 1024
"""Bytes asked of the kernel per read; large, so a busy connection costs few system calls."""


class RelayError(Exception):
    """The node refused the handshake, dropped the connection or broke the protocol."""


def connect(
    address: tuple[str, int], timeout: float, receive_buffer: int | None = None
) -> socket.socket:
    """A TCP connection with Nagle off (requests are small and latency is measured).

    ``receive_buffer`` shrinks the kernel's buffer for what the node sends (set before
    connecting, so the window follows): a client that never reads then makes the node
    hold its output after a few KiB instead of after several MiB.
    """
    if receive_buffer is None:
        sock = socket.create_connection(address, timeout=timeout)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Wire:
    """One relay connection after a successful handshake; every read has a timeout."""

    __slots__ = ("_early", "decoder", "sock")

    def __init__(
        self,
        address: tuple[str, int],
        cluster: str = "",
        timeout: float = 5.0,
        receive_buffer: int | None = None,
    ) -> None:
        self.sock = connect(address, timeout, receive_buffer)
        self.decoder = codec.client_decoder()
        self._early: list[NodePacket] = []
        try:
            self.sock.sendall(codec.Init(cluster).encode())
            packets = self._read()
            first = packets[0]
            if isinstance(first, Denied):
                raise RelayError(f"handshake denied: {first.reason}")
            if not isinstance(first, Accepted):
                raise RelayError(f"handshake answered with {type(first).__name__}")
            self._early = packets[1:]
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_packets(self, packets: Sequence[codec.ClientPacket]) -> None:
        self.sock.sendall(b"".join(packet.encode() for packet in packets))

    def recv(self) -> list[NodePacket]:
        """Block until at least one whole packet has arrived; a Closed packet is an error."""
        if self._early:
            packets, self._early = self._early, []
        else:
            packets = self._read()
        for packet in packets:
            if isinstance(packet, Closed):
                raise RelayError(f"node closed the connection: {packet.reason or 'graceful'}")
        return packets

    def recv_bytes(self) -> bytes:
        """Raw bytes, for callers that count frames themselves (see :class:`FrameCounter`)."""
        self._early = []  # anything decoded before the hand-over predates the measurement
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise RelayError("node closed the connection")
        return data

    def _read(self) -> list[NodePacket]:
        while True:
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise RelayError("node closed the connection")
            packets = self.decoder.feed(data)
            if self.decoder.error is not None:
                raise RelayError(f"node broke the protocol: {self.decoder.error}")
            if packets:
                return packets

    def close(self) -> None:
        """Say goodbye if the socket still works; never block on a misbehaving node."""
        try:
            self.sock.settimeout(0.2)
            self.sock.sendall(codec.Close().encode())
        except OSError:
            pass
        self.sock.close()


class FrameCounter:
    """Counts deliveries of one known frame in a byte stream at memory-compare speed.

    A benchmark's deliveries are all the same bytes, so a member does not need to decode
    them to count them: it compares whole runs of frames with the expected frame repeated,
    which costs the load generator almost nothing. Anything unexpected in the stream
    switches to the real decoder for the rest of it, so the count stays exact.
    """

    __slots__ = ("_block", "_carry", "_decoder", "_expected", "_frame_size", "_spare")

    def __init__(self, expected: NodePacket, decoder: codec.Decoder[NodePacket]) -> None:
        """``decoder`` is the one that read the stream so far (it may hold a partial packet)."""
        frame = expected.encode()
        self._expected = expected
        self._frame_size = len(frame)
        self._block = frame * (RECV_SIZE // len(frame) + 2)
        self._carry = b""
        self._decoder: codec.Decoder[NodePacket] | None = decoder if decoder.buffered else None
        self._spare = decoder

    def feed(self, data: bytes) -> int:
        """Whole expected frames completed by ``data``."""
        if self._decoder is None:
            buf = self._carry + data if self._carry else data
            whole = len(buf) - len(buf) % self._frame_size
            if whole <= len(self._block) and buf[:whole] == self._block[:whole]:
                self._carry = buf[whole:]
                return whole // self._frame_size
            self._decoder = self._spare
            data, self._carry = buf, b""
        packets = self._decoder.feed(data)
        if self._decoder.error is not None:
            raise RelayError(f"node broke the protocol: {self._decoder.error}")
        expected = self._expected
        kind = type(expected)
        count = 0
        for packet in packets:
            if type(packet) is kind and packet == expected:
                count += 1
            elif isinstance(packet, Closed):
                raise RelayError(f"node closed the connection: {packet.reason or 'graceful'}")
        return count

    @property
    def exact(self) -> bool:
        """True while the stream held nothing but the expected frame."""
        return self._decoder is None
