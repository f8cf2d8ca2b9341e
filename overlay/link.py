"""The link protocol core: STS handshake, then AEAD frames (docs/wire-link.md §2-§4).

Sans-I/O in the style of h11: :class:`LinkCore` takes the bytes that arrived
(and ``now``) and returns effects in order — :class:`Transmit` (bytes to write),
:class:`Established`, :class:`Received` (one whole message, reassembled from its
fragments) and at most one :class:`Failed` — after which it ignores everything.
``queue`` takes a message to send (control or bulk, see
:mod:`overlay.link_frames`) and ``take`` encrypts the next frames, control first,
only when the adapter can write them, so sequence numbers follow wire order.
It never reads a clock, never draws randomness except through the injected
``entropy`` (one 32-byte draw, at construction), never logs, and never touches
a socket.

The pure link policies (duplicate links, backoff, handshake rate) live in
:mod:`overlay.link_policy`.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
from nacl._sodium import ffi as _ffi  # type: ignore[import-not-found]  # pynacl's libsodium
from nacl._sodium import lib as _lib

from overlay.identity import (
    Certificate,
    CertificateError,
    Credentials,
    Entropy,
    verify_signature,
)
from overlay.link_frames import DEFAULT_LIMITS, FragmentError, LinkLimits, Outbox, Reassembler

MAGIC = b"irislink"
VERSION = 2
KEY_SIZE = 32
TAG_SIZE = 16
SIGNATURE_SIZE = 64
MSG1_SIZE = len(MAGIC) + 1 + KEY_SIZE
MAX_HANDSHAKE_RECORD = 1024
MAX_CERTIFICATE = 512
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
FRAME_HEADER_SIZE = 12
FRAME_OVERHEAD = FRAME_HEADER_SIZE + TAG_SIZE
"""Bytes a frame adds to its plaintext on the wire: length, seq and tag."""

SIG_CONTEXT = b"iris-link-sig-v1"
ROLE_INITIATOR = b"I"
ROLE_RESPONDER = b"R"

_ZERO_NONCE = bytes(12)
_NONCE_PAD = bytes(4)
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">IQ")
_U16 = struct.Struct(">H")
_SEQ_LIMIT = 1 << 64
_MIN_FRAME_BODY = 8 + TAG_SIZE

_encrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt
_decrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt


def _seal_record(buffer: bytearray, record: int, size: int, key: bytes) -> None:
    """Encrypt, in place, the ``size`` plaintext bytes behind the 12-byte frame header at
    ``record`` and write the tag after them (§3). In place because a frame is one
    fragment of up to 1 MiB: pynacl's bytes-in, bytes-out calls would copy it three
    times more and zero a fresh buffer for each frame."""
    base = _ffi.from_buffer(buffer)
    body = base + record + FRAME_HEADER_SIZE
    nonce = _NONCE_PAD + bytes(buffer[record + 4 : record + FRAME_HEADER_SIZE])
    if _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        body, _ffi.NULL, body, size, base + record, FRAME_HEADER_SIZE, _ffi.NULL, nonce, key
    ):
        raise nacl.exceptions.CryptoError("encryption failed")


def _open_record(buffer: bytearray, record: int, length: int, key: bytes) -> bool:
    """Authenticate and decrypt, in place, the frame whose header is at ``record``."""
    base = _ffi.from_buffer(buffer)
    body = base + record + FRAME_HEADER_SIZE
    nonce = _NONCE_PAD + bytes(buffer[record + 4 : record + FRAME_HEADER_SIZE])
    failed = _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        body, _ffi.NULL, _ffi.NULL, body, length - 8, base + record, FRAME_HEADER_SIZE, nonce, key
    )
    return not failed


class Reason(enum.StrEnum):
    """Why a link was dropped; the strings are the ``reason`` field of the logs (§5)."""

    HANDSHAKE_TIMEOUT = "handshake-timeout"
    OVERSIZE_HANDSHAKE = "oversize-handshake"
    BAD_MAGIC = "bad-magic"
    UNSUPPORTED_VERSION = "unsupported-version"
    MALFORMED_HANDSHAKE = "malformed-handshake"
    BAD_EPHEMERAL_KEY = "bad-ephemeral-key"
    TAMPERED_HANDSHAKE = "tampered-handshake"
    WRONG_NETWORK = "wrong-network"
    BAD_CERTIFICATE = "bad-certificate"
    EXPIRED_CERTIFICATE = "expired-certificate"
    BAD_SIGNATURE = "bad-signature"
    SELF_LINK = "self-link"
    UNEXPECTED_PEER = "unexpected-peer"
    MALFORMED_FRAME = "malformed-frame"
    OVERSIZE_FRAME = "oversize-frame"
    MALFORMED_FRAGMENT = "malformed-fragment"
    OVERSIZE_MESSAGE = "oversize-message"
    REPLAYED_FRAME = "replayed-frame"
    REORDERED_FRAME = "reordered-frame"
    TAMPERED_FRAME = "tampered-frame"
    CONNECTION_LOST = "connection-lost"
    DUPLICATE_LINK = "duplicate-link"
    CLOSED = "closed"


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class LinkStateError(Exception):
    """Our own misuse of a link (a bug in the caller), e.g. sending before it is up."""


# --------------------------------------------------------------------------------
# Effects


@dataclass(frozen=True, slots=True)
class Transmit:
    """Write these bytes to the peer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """The peer proved its identity and membership; frames may flow."""

    peer_node_id: int
    peer_public_key: bytes
    certificate: Certificate


@dataclass(frozen=True, slots=True)
class Received:
    """One whole message, complete once its last fragment arrived."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    """The link is dead; close it without telling the peer why."""

    reason: Reason
    detail: str = ""


Effect = Transmit | Established | Received | Failed


# --------------------------------------------------------------------------------
# Derivations (§2.2, §3); module functions so the test vectors can name each step


def blake2b_256(data: bytes, person: bytes, key: bytes = b"") -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=person, key=key).digest()


def signed_transcript(role: bytes, network_public: bytes, e_i: bytes, e_r: bytes) -> bytes:
    """What each side signs: context, its role, the network binding, both ephemeral keys."""
    return SIG_CONTEXT + role + network_public + e_i + e_r


def encode_auth(certificate: bytes, signature: bytes) -> bytes:
    return _U16.pack(len(certificate)) + certificate + signature


def record(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def frame_nonce(seq: int) -> bytes:
    return _NONCE_PAD + seq.to_bytes(8, "big")


class _HandshakeError(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _x25519(private: bytes, peer_public: bytes) -> bytes:
    try:
        shared = nacl.bindings.crypto_scalarmult(private, peer_public)
    except nacl.exceptions.RuntimeError:
        # libsodium refuses an all-zero result (a low-order peer key).
        raise _HandshakeError(Reason.BAD_EPHEMERAL_KEY, "X25519 gave the all-zero secret") from None
    if shared == bytes(KEY_SIZE):
        raise _HandshakeError(Reason.BAD_EPHEMERAL_KEY, "X25519 gave the all-zero secret")
    return shared


# --------------------------------------------------------------------------------
# The core


class _State(enum.Enum):
    AWAIT_MSG1 = "await-msg1"
    AWAIT_MSG2 = "await-msg2"
    AWAIT_MSG3 = "await-msg3"
    ESTABLISHED = "established"
    FAILED = "failed"


class LinkCore:
    """One end of one link, from the first byte to the last (§2-§4)."""

    def __init__(
        self,
        role: Role,
        credentials: Credentials,
        entropy: Entropy,
        now: float,
        *,
        limits: LinkLimits = DEFAULT_LIMITS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        expected_peer: int | None = None,
    ) -> None:
        if expected_peer is not None and role is not Role.INITIATOR:
            raise ValueError("only the initiator knows whom it meant to reach")
        self.role = role
        self.limits = limits
        self._outbox = Outbox(limits)
        self._scratch = bytearray()
        self._reassembler = Reassembler(limits.max_message_size)
        self._credentials = credentials
        self._expected_peer = expected_peer
        self._ephemeral = entropy(KEY_SIZE)
        self._ephemeral_public = nacl.bindings.crypto_scalarmult_base(self._ephemeral)
        self._deadline: float | None = now + handshake_timeout
        self._state = _State.AWAIT_MSG2 if role is Role.INITIATOR else _State.AWAIT_MSG1
        self._buffer = bytearray(1 << 16)
        self._start = self._end = 0
        self._msg1 = b""
        self._msg2 = b""
        self._shared = b""
        self._th2 = b""
        self._k_hs_i = b""
        self._send_key = b""
        self._recv_key = b""
        self._send_seq = 0
        self._recv_seq = 0
        self.peer: Established | None = None
        self.failure: Failed | None = None

    # -- inspection

    @property
    def established(self) -> bool:
        return self._state is _State.ESTABLISHED

    @property
    def failed(self) -> bool:
        return self._state is _State.FAILED

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must be called: the handshake deadline, or None."""
        return self._deadline

    @property
    def congested(self) -> bool:
        """More bulk bytes queued than the high-water mark, until below the low-water mark."""
        return self._outbox.congested

    @property
    def has_output(self) -> bool:
        """Frames are waiting for :meth:`take`."""
        return bool(self._outbox) and self._state is _State.ESTABLISHED

    @property
    def queued_bulk_bytes(self) -> int:
        return self._outbox.bulk.bytes

    @property
    def queued_control_bytes(self) -> int:
        return self._outbox.control.bytes

    # -- inputs

    def start(self) -> list[Effect]:
        """The initiator speaks first (msg1); the responder waits."""
        if self.role is Role.RESPONDER or self._msg1:
            return []
        self._msg1 = MAGIC + bytes([VERSION]) + self._ephemeral_public
        return [Transmit(record(self._msg1))]

    def on_timer(self, now: float) -> list[Effect]:
        if self._deadline is not None and now >= self._deadline:
            return [self._fail(Reason.HANDSHAKE_TIMEOUT, "the handshake did not finish in time")]
        return []

    def receive(self, data: bytes, now: float) -> list[Effect]:
        """Feed bytes from the peer; returns what to do, in order."""
        if self._state is _State.FAILED:
            return []
        self._append(data)
        buffer = self._buffer
        effects: list[Effect] = []
        pos = self._start
        end = self._end
        while end - pos >= 4:
            (length,) = _LENGTH.unpack_from(buffer, pos)
            failure = self._check_length(length)
            if failure is not None:
                effects.append(failure)
                return effects
            if end - pos - 4 < length:
                break
            start = pos + 4
            pos = start + length
            if self._state is _State.ESTABLISHED:
                failure = self._open_frame(buffer, start, length, effects)
            else:
                failure = self._handshake(bytes(buffer[start:pos]), now, effects)
            if failure is not None:
                effects.append(failure)
                return effects
        self._start, self._end = (0, 0) if pos == end else (pos, end)
        return effects

    def queue(self, data: bytes, *, bulk: bool = False) -> bool:
        """Queue one message; False if its class's queue is full (§4).

        Raises :class:`LinkStateError` before the link is established or for a
        message over ``limits.max_message_size``: both are the caller's bug.
        """
        if self._state is not _State.ESTABLISHED:
            raise LinkStateError(f"cannot send on a link that is {self._state.value}")
        if len(data) > self.limits.max_message_size:
            raise LinkStateError(
                f"message of {len(data)} bytes exceeds {self.limits.max_message_size}"
            )
        return self._outbox.push(data, bulk=bulk)

    def take(self, budget: int) -> bytes:
        """Encrypt queued frames, control first, until ``budget`` bytes or nothing is left.

        Frames are sealed only here, when the adapter can write them at once, so
        their sequence numbers are the order they reach the wire. They are built
        in one reused buffer and leave it as one ``bytes``: one copy in, one out.
        """
        if self._state is not _State.ESTABLISHED:
            return b""
        outbox = self._outbox
        scratch = self._scratch
        pos = 0
        while pos < budget:
            frame = outbox.pop()
            if frame is None:
                break
            header, message, start, end = frame
            size = len(header) + end - start
            record_end = pos + FRAME_OVERHEAD + size
            if len(scratch) < record_end:
                scratch.extend(bytes(record_end - len(scratch)))
            seq = self._send_seq
            if seq >= _SEQ_LIMIT:
                raise LinkStateError("frame counter exhausted; close the link")
            self._send_seq = seq + 1
            _HEADER.pack_into(scratch, pos, size + _MIN_FRAME_BODY, seq)
            body = pos + FRAME_HEADER_SIZE
            # Through memoryviews: a bytearray slice assigned from anything but a
            # bytearray first copies the source into a temporary bytearray.
            with memoryview(scratch) as out, memoryview(message) as source:
                out[body : body + len(header)] = header
                out[body + len(header) : body + size] = source[start:end]
            _seal_record(scratch, pos, size, self._send_key)
            pos = record_end
        if pos == 0:
            return b""
        with memoryview(scratch) as view, view[:pos] as frames:
            return bytes(frames)

    def send(self, data: bytes, *, bulk: bool = False) -> bytes:
        """Queue one message and return every frame now due (for tests and tools)."""
        if not self.queue(data, bulk=bulk):
            raise LinkStateError("the send queue is full")
        return self.take(1 << 62)

    def drop_queued(self) -> int:
        """Forget what was never sent (the link is closing); returns how many messages."""
        return self._outbox.clear()

    # -- internals

    def _append(self, data: bytes) -> None:
        """Add to the receive window ``_buffer[_start:_end]``. The buffer is reused, and
        grows only to the largest frame seen plus one read: resizing a bytearray
        with data deleted from its front reallocates it, and at frame sizes that
        means fresh pages from the kernel for every frame."""
        size = len(data)
        buffer = self._buffer
        start, end = self._start, self._end
        if end + size > len(buffer):
            live = end - start
            if live + size > len(buffer):
                grown = bytearray(max(live + size, 2 * len(buffer)))
                with memoryview(grown) as into, memoryview(buffer) as old:
                    into[:live] = old[start:end]
                self._buffer = buffer = grown
            elif live:
                _ffi.memmove(buffer, memoryview(buffer)[start:end], live)
            start, end = 0, live
        with memoryview(buffer) as view:
            view[end : end + size] = data  # one copy (see take)
        self._start, self._end = start, end + size

    def _fail(self, reason: Reason, detail: str) -> Failed:
        self._state = _State.FAILED
        self._deadline = None
        self._buffer = bytearray()
        self._start = self._end = 0
        self._reassembler = Reassembler(self.limits.max_message_size)
        self._shared = self._send_key = self._recv_key = self._k_hs_i = b""
        self.failure = Failed(reason, detail)
        return self.failure

    def _check_length(self, length: int) -> Failed | None:
        if self._state is _State.ESTABLISHED:
            if length < _MIN_FRAME_BODY:
                return self._fail(Reason.MALFORMED_FRAME, f"frame record of {length} bytes")
            limit = _MIN_FRAME_BODY + self.limits.max_frame_size
            if length > limit:
                return self._fail(
                    Reason.OVERSIZE_FRAME, f"frame record of {length} bytes, limit {limit}"
                )
        elif length > MAX_HANDSHAKE_RECORD:
            return self._fail(
                Reason.OVERSIZE_HANDSHAKE, f"handshake record of {length} bytes, limit 1024"
            )
        return None

    def _open_frame(
        self, buffer: bytearray, start: int, length: int, effects: list[Effect]
    ) -> Failed | None:
        (seq,) = struct.unpack_from(">Q", buffer, start)
        expected = self._recv_seq
        if seq != expected:
            if seq < expected:
                return self._fail(Reason.REPLAYED_FRAME, f"frame seq {seq}, expected {expected}")
            return self._fail(Reason.REORDERED_FRAME, f"frame seq {seq}, expected {expected}")
        if not _open_record(buffer, start - 4, length, self._recv_key):
            return self._fail(Reason.TAMPERED_FRAME, f"frame seq {seq} failed authentication")
        self._recv_seq = expected + 1
        try:
            body = start + 8
            message = self._reassembler.feed(buffer, body, body + length - _MIN_FRAME_BODY)
        except FragmentError as error:
            return self._fail(Reason(error.reason), f"frame seq {seq}: {error.detail}")
        if message is not None:
            effects.append(Received(message))
        return None

    def _handshake(self, body: bytes, now: float, effects: list[Effect]) -> Failed | None:
        try:
            if self._state is _State.AWAIT_MSG1:
                effects.append(self._on_msg1(body))
            elif self._state is _State.AWAIT_MSG2:
                effects.extend(self._on_msg2(body, now))
            else:
                effects.append(self._on_msg3(body, now))
        except _HandshakeError as error:
            return self._fail(error.reason, error.detail)
        return None

    def _derive_handshake_keys(self, e_r: bytes) -> tuple[bytes, bytes, bytes]:
        th1 = blake2b_256(self._msg1 + e_r, b"iris-link-th1")
        k_hs_r = blake2b_256(th1, b"iris-link-hs-r", self._shared)
        k_hs_i = blake2b_256(th1, b"iris-link-hs-i", self._shared)
        return th1, k_hs_r, k_hs_i

    def _auth(self, role: bytes, e_i: bytes, e_r: bytes) -> bytes:
        credentials = self._credentials
        transcript = signed_transcript(role, credentials.network_public, e_i, e_r)
        return encode_auth(credentials.certificate.encode(), credentials.identity.sign(transcript))

    def _check_auth(
        self, auth: bytes, role: bytes, e_i: bytes, e_r: bytes, now: float
    ) -> Established:
        """Steps 4-6 of §2.3 on a decrypted ``auth``: who the peer is, and is it one of us."""
        if len(auth) < 2:
            raise _HandshakeError(Reason.MALFORMED_HANDSHAKE, "authentication block too short")
        (cert_len,) = _U16.unpack_from(auth)
        if cert_len > MAX_CERTIFICATE or len(auth) != 2 + cert_len + SIGNATURE_SIZE:
            raise _HandshakeError(Reason.MALFORMED_HANDSHAKE, "authentication block has a bad size")
        credentials = self._credentials
        try:
            certificate = Certificate.decode(auth[2 : 2 + cert_len])
            certificate.verify(credentials.network_public, now)
        except CertificateError as error:
            raise _HandshakeError(Reason(error.reason), str(error)) from None
        transcript = signed_transcript(role, credentials.network_public, e_i, e_r)
        if not verify_signature(certificate.node_public, transcript, auth[2 + cert_len :]):
            raise _HandshakeError(Reason.BAD_SIGNATURE, "transcript signature is invalid")
        peer = Established(certificate.node_id, certificate.node_public, certificate)
        if certificate.node_public == credentials.identity.public:
            raise _HandshakeError(Reason.SELF_LINK, "the peer is this node")
        if self._expected_peer is not None and peer.peer_node_id != self._expected_peer:
            raise _HandshakeError(
                Reason.UNEXPECTED_PEER,
                f"reached node {peer.peer_node_id:032x}, wanted {self._expected_peer:032x}",
            )
        return peer

    def _on_msg1(self, msg1: bytes) -> Transmit:
        if msg1[: len(MAGIC)] != MAGIC:
            raise _HandshakeError(Reason.BAD_MAGIC, "not an irisnode link")
        if len(msg1) > len(MAGIC) and msg1[len(MAGIC)] != VERSION:
            raise _HandshakeError(
                Reason.UNSUPPORTED_VERSION, f"link version {msg1[len(MAGIC)]} requested"
            )
        if len(msg1) != MSG1_SIZE:
            raise _HandshakeError(Reason.MALFORMED_HANDSHAKE, f"msg1 of {len(msg1)} bytes")
        e_i = msg1[len(MAGIC) + 1 :]
        e_r = self._ephemeral_public
        self._msg1 = msg1
        self._shared = _x25519(self._ephemeral, e_i)
        th1, k_hs_r, self._k_hs_i = self._derive_handshake_keys(e_r)
        auth = self._auth(ROLE_RESPONDER, e_i, e_r)
        msg2 = e_r + _encrypt(auth, th1, _ZERO_NONCE, k_hs_r)
        self._msg2 = msg2
        self._th2 = blake2b_256(msg1 + msg2, b"iris-link-th2")
        self._state = _State.AWAIT_MSG3
        return Transmit(record(msg2))

    def _on_msg2(self, msg2: bytes, now: float) -> list[Effect]:
        if len(msg2) < KEY_SIZE + TAG_SIZE:
            raise _HandshakeError(Reason.MALFORMED_HANDSHAKE, f"msg2 of {len(msg2)} bytes")
        e_i = self._ephemeral_public
        e_r = msg2[:KEY_SIZE]
        self._shared = _x25519(self._ephemeral, e_r)
        th1, k_hs_r, k_hs_i = self._derive_handshake_keys(e_r)
        try:
            auth_r = _decrypt(msg2[KEY_SIZE:], th1, _ZERO_NONCE, k_hs_r)
        except nacl.exceptions.CryptoError:
            raise _HandshakeError(Reason.TAMPERED_HANDSHAKE, "msg2 failed authentication") from None
        peer = self._check_auth(auth_r, ROLE_RESPONDER, e_i, e_r, now)
        th2 = blake2b_256(self._msg1 + msg2, b"iris-link-th2")
        msg3 = _encrypt(self._auth(ROLE_INITIATOR, e_i, e_r), th2, _ZERO_NONCE, k_hs_i)
        th3 = blake2b_256(self._msg1 + msg2 + msg3, b"iris-link-th3")
        self._become_established(th3, peer)
        return [Transmit(record(msg3)), peer]

    def _on_msg3(self, msg3: bytes, now: float) -> Established:
        if len(msg3) < TAG_SIZE:
            raise _HandshakeError(Reason.MALFORMED_HANDSHAKE, f"msg3 of {len(msg3)} bytes")
        try:
            auth_i = _decrypt(msg3, self._th2, _ZERO_NONCE, self._k_hs_i)
        except nacl.exceptions.CryptoError:
            raise _HandshakeError(Reason.TAMPERED_HANDSHAKE, "msg3 failed authentication") from None
        e_i = self._msg1[len(MAGIC) + 1 :]
        peer = self._check_auth(auth_i, ROLE_INITIATOR, e_i, self._ephemeral_public, now)
        th3 = blake2b_256(self._msg1 + self._msg2 + msg3, b"iris-link-th3")
        self._become_established(th3, peer)
        return peer

    def _become_established(self, th3: bytes, peer: Established) -> None:
        k_i2r = blake2b_256(th3, b"iris-link-i2r", self._shared)
        k_r2i = blake2b_256(th3, b"iris-link-r2i", self._shared)
        if self.role is Role.INITIATOR:
            self._send_key, self._recv_key = k_i2r, k_r2i
        else:
            self._send_key, self._recv_key = k_r2i, k_i2r
        self._state = _State.ESTABLISHED
        self._deadline = None
        self._shared = self._k_hs_i = self._th2 = b""
        self._msg2 = b""
        self.peer = peer
