"""Network credentials, node identities and membership certificates (docs/wire-link.md §1).

Pure apart from the explicit file helpers (``save``/``load``/``load_or_create``):
randomness comes in as ``entropy: Callable[[int], bytes]`` and time as ``now``.
Everything a peer can send us (a certificate) is parsed with exact sizes and
fails with a :class:`CertificateError` subclass that says which check failed,
so the link layer can log a specific reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions

Entropy = Callable[[int], bytes]

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_NAME_BYTES = 64

NETWORK_FILE_TYPE = "irisnode-network-key"
IDENTITY_FILE_TYPE = "irisnode-node-identity"
FILE_VERSION = 1
IDENTITY_FILE_NAME = "node-identity.json"

CERT_MAGIC = b"iriscert"
CERT_VERSION = 1
_CERT_BODY = struct.Struct(">8sBB32s32sQQQ")
CERT_SIZE = _CERT_BODY.size + SIGNATURE_SIZE
"""162 bytes: the only size a version-1 certificate can have."""

_U64_MAX = (1 << 64) - 1


class CredentialError(Exception):
    """A key or identity file is missing or unusable; the message is fit for a CLI."""


class CertificateError(Exception):
    """A certificate cannot be accepted; ``reason`` is the link-failure reason."""

    reason = "bad-certificate"


class MalformedCertificate(CertificateError):
    reason = "bad-certificate"


class WrongNetwork(CertificateError):
    reason = "wrong-network"


class BadCertificateSignature(CertificateError):
    reason = "bad-certificate"


class CertificateExpired(CertificateError):
    """Outside the validity window (expired or not yet valid)."""

    reason = "expired-certificate"


def _blake2b(data: bytes, *, person: bytes, key: bytes = b"", digest_size: int = 32) -> bytes:
    return hashlib.blake2b(data, digest_size=digest_size, key=key, person=person).digest()


def node_id_of(public_key: bytes) -> int:
    """The 128-bit node id (Pastry id) of an identity public key."""
    return int.from_bytes(_blake2b(public_key, person=b"iris-node-id", digest_size=16), "big")


def _signing_keypair(seed: bytes) -> tuple[bytes, bytes]:
    if len(seed) != SEED_SIZE:
        raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes, not {len(seed)}")
    public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
    return public, secret


def sign(secret_key: bytes, message: bytes) -> bytes:
    """Detached Ed25519 signature (64 bytes)."""
    return nacl.bindings.crypto_sign(message, secret_key)[:SIGNATURE_SIZE]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message``; never raises."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    except nacl.exceptions.RuntimeError:
        return False
    return True


def _check_name(name: str) -> None:
    encoded = name.encode("utf-8", "surrogatepass")
    if not encoded or len(encoded) > MAX_NAME_BYTES:
        raise ValueError(f"a network name is 1 to {MAX_NAME_BYTES} bytes of UTF-8: {name!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError(f"a network name has no control characters: {name!r}")


# --------------------------------------------------------------------------------
# Files: small versioned JSON, base64 fields, mode 0600


def _write_private_json(path: Path, document: dict[str, Any], *, overwrite: bool) -> None:
    """Write atomically with mode 0600 from the start (never readable by others).

    Without ``overwrite`` an existing file is an error, checked atomically
    (``link``), so two writers can never replace each other's key.
    """
    text = json.dumps(document, indent=2) + "\n"
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise CredentialError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise CredentialError(f"{path}: already exists; not overwriting it") from None
    except OSError as exc:
        raise CredentialError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _read_json(path: Path, file_type: str, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: not a {what} file (not UTF-8 text)") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialError(f"{path}: not a {what} file (invalid JSON: {exc.msg})") from None
    if not isinstance(document, dict) or document.get("type") != file_type:
        raise CredentialError(f"{path}: not a {what} file (expected type {file_type!r})")
    if document.get("version") != FILE_VERSION:
        raise CredentialError(
            f"{path}: unsupported {what} file version {document.get('version')!r} "
            f"(this irisnode reads version {FILE_VERSION})"
        )
    return document


def _b64_field(document: dict[str, Any], field: str, size: int, path: Path) -> bytes:
    value = document.get(field)
    if not isinstance(value, str):
        raise CredentialError(f"{path}: field {field!r} is missing or not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CredentialError(f"{path}: field {field!r} is not valid base64") from None
    if len(raw) != size:
        raise CredentialError(f"{path}: field {field!r} must be {size} bytes, not {len(raw)}")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------------
# The network key


@dataclass(frozen=True, slots=True, repr=False)
class NetworkKey:
    """A network: its name and its Ed25519 signing key (whoever holds it may issue)."""

    name: str
    seed: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        _signing_keypair(self.seed)

    def __repr__(self) -> str:
        return f"NetworkKey(name={self.name!r}, public={self.public.hex()})"

    @classmethod
    def generate(cls, name: str, entropy: Entropy) -> NetworkKey:
        return cls(name, entropy(SEED_SIZE))

    @classmethod
    def ephemeral(cls, entropy: Entropy) -> NetworkKey:
        """Developer mode: a random network nobody else can join."""
        name = "dev-" + entropy(8).hex()
        return cls(name, entropy(SEED_SIZE))

    @property
    def public(self) -> bytes:
        """The network public key: the network's identity on the wire."""
        return _signing_keypair(self.seed)[0]

    def beacon_key(self) -> bytes:
        """32-byte secret for discovery beacons; from the seed, so the name stays secret."""
        return _blake2b(b"", person=b"iris-beacon-key", key=self.seed)

    def sign(self, message: bytes) -> bytes:
        return sign(_signing_keypair(self.seed)[1], message)

    def issue(
        self,
        node_public: bytes,
        *,
        serial: int = 0,
        not_before: int = 0,
        not_after: int = 0,
    ) -> Certificate:
        return Certificate.issue(
            self, node_public, serial=serial, not_before=not_before, not_after=not_after
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key file (mode 0600); refuses to replace one unless told to."""
        _write_private_json(
            Path(path),
            {
                "type": NETWORK_FILE_TYPE,
                "version": FILE_VERSION,
                "name": self.name,
                "seed": _b64(self.seed),
                "public": _b64(self.public),
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, expected_name: str | None = None) -> NetworkKey:
        """Read a key file; with ``expected_name`` (``--net``), the names must agree."""
        where = Path(path)
        document = _read_json(where, NETWORK_FILE_TYPE, "network key")
        name = document.get("name")
        if not isinstance(name, str):
            raise CredentialError(f"{where}: field 'name' is missing or not a string")
        seed = _b64_field(document, "seed", SEED_SIZE, where)
        public = _b64_field(document, "public", PUBLIC_KEY_SIZE, where)
        try:
            key = cls(name, seed)
        except ValueError as exc:
            raise CredentialError(f"{where}: {exc}") from None
        if key.public != public:
            raise CredentialError(f"{where}: the public key does not match the seed")
        if expected_name is not None and key.name != expected_name:
            raise CredentialError(
                f"{where}: this key is for network {key.name!r}, not {expected_name!r}"
            )
        return key


# --------------------------------------------------------------------------------
# Node identity


@dataclass(frozen=True, slots=True, repr=False)
class NodeIdentity:
    """A node's own Ed25519 key pair; its node id is derived from the public key."""

    seed: bytes
    public: bytes
    secret: bytes
    node_id: int

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        public, secret = _signing_keypair(seed)
        return cls(seed, public, secret, node_id_of(public))

    @classmethod
    def generate(cls, entropy: Entropy) -> NodeIdentity:
        return cls.from_seed(entropy(SEED_SIZE))

    def __repr__(self) -> str:
        return f"NodeIdentity(node_id={self.node_id:032x})"

    def sign(self, message: bytes) -> bytes:
        return sign(self.secret, message)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        _write_private_json(
            Path(path),
            {
                "type": IDENTITY_FILE_TYPE,
                "version": FILE_VERSION,
                "seed": _b64(self.seed),
                "public": _b64(self.public),
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        where = Path(path)
        document = _read_json(where, IDENTITY_FILE_TYPE, "node identity")
        seed = _b64_field(document, "seed", SEED_SIZE, where)
        public = _b64_field(document, "public", PUBLIC_KEY_SIZE, where)
        identity = cls.from_seed(seed)
        if identity.public != public:
            raise CredentialError(f"{where}: the public key does not match the seed")
        return identity

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str], entropy: Entropy) -> NodeIdentity:
        """Keep one identity per state directory (created 0700 if missing)."""
        directory = Path(state_dir)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CredentialError(f"{directory}: cannot create state directory: {exc}") from None
        path = directory / IDENTITY_FILE_NAME
        if path.exists():
            return cls.load(path)
        identity = cls.generate(entropy)
        try:
            identity.save(path)
        except CredentialError:
            if path.exists():  # another process created it first: use theirs
                return cls.load(path)
            raise
        return identity


# --------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True, slots=True)
class Certificate:
    """The network key's statement that ``node_public`` is a member (§1.3)."""

    network_public: bytes
    node_public: bytes
    serial: int
    not_before: int
    not_after: int
    signature: bytes

    @property
    def node_id(self) -> int:
        return node_id_of(self.node_public)

    def signed_bytes(self) -> bytes:
        return _CERT_BODY.pack(
            CERT_MAGIC,
            CERT_VERSION,
            0,
            self.network_public,
            self.node_public,
            self.serial,
            self.not_before,
            self.not_after,
        )

    @classmethod
    def issue(
        cls,
        network_key: NetworkKey,
        node_public: bytes,
        *,
        serial: int = 0,
        not_before: int = 0,
        not_after: int = 0,
    ) -> Certificate:
        if len(node_public) != PUBLIC_KEY_SIZE:
            raise ValueError(f"a node public key is {PUBLIC_KEY_SIZE} bytes")
        for label, value in (
            ("serial", serial),
            ("not_before", not_before),
            ("not_after", not_after),
        ):
            if not 0 <= value <= _U64_MAX:
                raise ValueError(f"{label} must fit in 64 bits: {value}")
        unsigned = cls(network_key.public, node_public, serial, not_before, not_after, b"")
        return cls(
            network_key.public,
            node_public,
            serial,
            not_before,
            not_after,
            network_key.sign(unsigned.signed_bytes()),
        )

    def encode(self) -> bytes:
        return self.signed_bytes() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        """Parse exactly one version-1 certificate; raises :class:`MalformedCertificate`."""
        if len(data) != CERT_SIZE:
            raise MalformedCertificate(f"certificate is {len(data)} bytes, not {CERT_SIZE}")
        magic, version, flags, network, node, serial, not_before, not_after = (
            _CERT_BODY.unpack_from(data)
        )
        if magic != CERT_MAGIC:
            raise MalformedCertificate("certificate has a bad magic")
        if version != CERT_VERSION:
            raise MalformedCertificate(f"unsupported certificate version {version}")
        if flags != 0:
            raise MalformedCertificate(f"unknown certificate flags {flags:#04x}")
        return cls(network, node, serial, not_before, not_after, data[_CERT_BODY.size :])

    def verify(self, expected_network_public: bytes, now: float) -> None:
        """Raise the specific :class:`CertificateError` unless valid for that network now."""
        if self.network_public != expected_network_public:
            raise WrongNetwork("certificate was issued by another network")
        if not verify_signature(self.network_public, self.signed_bytes(), self.signature):
            raise BadCertificateSignature("network signature on the certificate is invalid")
        if self.not_before and now < self.not_before:
            raise CertificateExpired(f"certificate is not valid before {self.not_before}")
        if self.not_after and now > self.not_after:
            raise CertificateExpired(f"certificate expired at {self.not_after}")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a node brings to every link: who it is, its membership, and the network it expects."""

    identity: NodeIdentity
    certificate: Certificate
    network_public: bytes

    @classmethod
    def for_network(cls, network_key: NetworkKey, identity: NodeIdentity) -> Credentials:
        """A node that holds the network key issues its own certificate."""
        return cls(identity, network_key.issue(identity.public), network_key.public)

    def __post_init__(self) -> None:
        if self.certificate.node_public != self.identity.public:
            raise ValueError("the certificate is not for this node's identity key")
