"""Network keys, node identities and certificates (docs/wire-link.md §1)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.identity import (
    CERT_SIZE,
    BadCertificateSignature,
    Certificate,
    CertificateExpired,
    CredentialError,
    Credentials,
    MalformedCertificate,
    NetworkKey,
    NodeIdentity,
    WrongNetwork,
    node_id_of,
)


def counter_entropy(start: int = 0) -> Callable[[int], bytes]:
    """Deterministic, distinct bytes on every draw."""
    state = [start]

    def entropy(n: int) -> bytes:
        out = bytes((state[0] + i) % 256 for i in range(n))
        state[0] += 97
        return out

    return entropy


NET = NetworkKey("home", bytes(range(32)))
OTHER = NetworkKey("home", bytes(range(1, 33)))
NODE = NodeIdentity.from_seed(bytes(range(100, 132)))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- network key


def test_network_key_file_round_trip_is_private_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "net.key"
    NET.save(path)
    assert mode_of(path) == 0o600
    document = json.loads(path.read_text())
    assert document["type"] == "irisnode-network-key"
    assert document["version"] == 1
    assert document["name"] == "home"
    loaded = NetworkKey.load(path)
    assert loaded == NET
    assert loaded.public == NET.public


def test_save_never_widens_an_existing_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "net.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    with pytest.raises(CredentialError, match="already exists"):
        NET.save(path)
    assert path.read_text() == "old", "keygen never clobbers an existing file"
    NET.save(path, overwrite=True)
    assert mode_of(path) == 0o600
    assert NetworkKey.load(path) == NET
    assert [p.name for p in tmp_path.iterdir()] == ["net.key"], "no temporary left behind"


def test_load_checks_the_expected_network_name(tmp_path: Path) -> None:
    path = tmp_path / "net.key"
    NET.save(path)
    assert NetworkKey.load(path, expected_name="home") == NET
    with pytest.raises(CredentialError, match="for network 'home', not 'work'"):
        NetworkKey.load(path, expected_name="work")


def _corrupt(tmp_path: Path, edit: Callable[[dict[str, object]], None]) -> Path:
    path = tmp_path / "net.key"
    NET.save(path, overwrite=True)
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(type="something-else"), "not a network key file"),
        (lambda d: d.update(version=2), "unsupported network key file version 2"),
        (lambda d: d.pop("seed"), "field 'seed' is missing"),
        (lambda d: d.update(seed="!!!not base64"), "field 'seed' is not valid base64"),
        (lambda d: d.update(seed="AAAA"), "field 'seed' must be 32 bytes, not 3"),
        (lambda d: d.update(public=OTHER.public.hex()[:44]), "field 'public'"),
        (lambda d: d.update(name=""), "a network name is 1 to 64 bytes"),
        (lambda d: d.update(name=7), "field 'name' is missing or not a string"),
    ],
)
def test_bad_network_key_files_say_what_is_wrong(
    tmp_path: Path, edit: Callable[[dict[str, object]], None], message: str
) -> None:
    path = _corrupt(tmp_path, edit)
    with pytest.raises(CredentialError, match=message) as info:
        NetworkKey.load(path)
    assert str(path) in str(info.value)


def test_public_key_must_match_the_seed(tmp_path: Path) -> None:
    import base64

    path = _corrupt(tmp_path, lambda d: d.update(public=base64.b64encode(OTHER.public).decode()))
    with pytest.raises(CredentialError, match="does not match the seed"):
        NetworkKey.load(path)


def test_missing_and_non_json_files(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="no such network key file"):
        NetworkKey.load(tmp_path / "absent")
    garbage = tmp_path / "garbage"
    garbage.write_text("{not json")
    with pytest.raises(CredentialError, match="invalid JSON"):
        NetworkKey.load(garbage)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CredentialError, match="not UTF-8"):
        NetworkKey.load(binary)


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there", "nul\x00"])
def test_network_names_are_validated(name: str) -> None:
    with pytest.raises(ValueError, match="network name"):
        NetworkKey(name, bytes(32))


def test_generate_uses_the_entropy_and_ephemeral_is_random_and_named_dev() -> None:
    drawn: list[int] = []

    def entropy(n: int) -> bytes:
        drawn.append(n)
        return bytes([len(drawn)]) * n

    key = NetworkKey.generate("lab", entropy)
    assert key.seed == bytes([1]) * 32 and drawn == [32]
    one = NetworkKey.ephemeral(os.urandom)
    two = NetworkKey.ephemeral(os.urandom)
    assert one.name.startswith("dev-") and len(one.name) == 4 + 16
    assert one.public != two.public and one.name != two.name


def test_beacon_key_comes_from_the_secret_not_the_name() -> None:
    assert len(NET.beacon_key()) == 32
    assert NET.beacon_key() != OTHER.beacon_key()  # same name, different secret
    assert NET.beacon_key() == NetworkKey("renamed", NET.seed).beacon_key()
    assert NET.beacon_key() not in (NET.seed, NET.public)


def test_repr_does_not_show_the_secret() -> None:
    assert NET.seed.hex() not in repr(NET)
    assert NODE.seed.hex() not in repr(NODE)


# -- node identity


def test_node_id_is_128_bits_from_the_public_key() -> None:
    assert NODE.node_id == node_id_of(NODE.public)
    assert 0 <= NODE.node_id < 2**128
    assert NodeIdentity.from_seed(bytes(32)).node_id != NODE.node_id


def test_load_or_create_keeps_one_identity_per_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state" / "nested"
    first = NodeIdentity.load_or_create(state, counter_entropy())
    assert mode_of(state / "node-identity.json") == 0o600
    assert mode_of(state) == 0o700

    def no_entropy(n: int) -> bytes:
        raise AssertionError("an existing identity must be loaded, not regenerated")

    again = NodeIdentity.load_or_create(state, no_entropy)
    assert again.public == first.public and again.node_id == first.node_id
    other = NodeIdentity.load_or_create(tmp_path / "other", counter_entropy(5))
    assert other.node_id != first.node_id


def test_corrupt_identity_file_is_a_credential_error(tmp_path: Path) -> None:
    (tmp_path / "node-identity.json").write_text('{"type": "irisnode-node-identity"}')
    with pytest.raises(CredentialError, match="unsupported node identity file version"):
        NodeIdentity.load_or_create(tmp_path, counter_entropy())


# -- certificates


def test_certificate_round_trip_and_verify() -> None:
    cert = NET.issue(NODE.public, serial=7, not_before=100, not_after=200)
    wire = cert.encode()
    assert len(wire) == CERT_SIZE == 162
    assert Certificate.decode(wire) == cert
    assert cert.node_id == NODE.node_id
    cert.verify(NET.public, 150)


def test_certificate_for_another_network_is_wrong_network() -> None:
    cert = OTHER.issue(NODE.public)
    with pytest.raises(WrongNetwork) as info:
        cert.verify(NET.public, 0)
    assert info.value.reason == "wrong-network"


def test_forged_certificates_have_bad_signatures() -> None:
    cert = NET.issue(NODE.public, serial=1)
    bad_signature = replace(cert, signature=bytes(64))
    with pytest.raises(BadCertificateSignature):
        bad_signature.verify(NET.public, 0)
    changed_serial = replace(cert, serial=2)
    with pytest.raises(BadCertificateSignature):
        changed_serial.verify(NET.public, 0)
    other_node = replace(cert, node_public=NodeIdentity.from_seed(bytes(32)).public)
    with pytest.raises(BadCertificateSignature) as info:
        other_node.verify(NET.public, 0)
    assert info.value.reason == "bad-certificate"
    # Claiming our network while signed by another key: the signature does not verify.
    claimed = replace(OTHER.issue(NODE.public), network_public=NET.public)
    with pytest.raises(BadCertificateSignature):
        claimed.verify(NET.public, 0)


def test_validity_window() -> None:
    cert = NET.issue(NODE.public, not_before=100, not_after=200)
    for now in (99, 201):
        with pytest.raises(CertificateExpired) as info:
            cert.verify(NET.public, now)
        assert info.value.reason == "expired-certificate"
    cert.verify(NET.public, 100)
    cert.verify(NET.public, 200)
    NET.issue(NODE.public).verify(NET.public, 10**12)  # no window: always valid


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(0, ord("X"), "bad magic"), (8, 2, "version 2"), (9, 1, "flags")],
)
def test_malformed_certificates(offset: int, value: int, message: str) -> None:
    wire = bytearray(NET.issue(NODE.public).encode())
    wire[offset] = value
    with pytest.raises(MalformedCertificate, match=message):
        Certificate.decode(bytes(wire))
    with pytest.raises(MalformedCertificate, match="163 bytes"):
        Certificate.decode(NET.issue(NODE.public).encode() + b"\x00")


@given(st.binary(max_size=400))
def test_decoding_arbitrary_bytes_only_raises_malformed(data: bytes) -> None:
    try:
        cert = Certificate.decode(data)
    except MalformedCertificate:
        return
    assert cert.encode() == data


def test_issue_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NET.issue(b"short")
    with pytest.raises(ValueError, match="serial"):
        NET.issue(NODE.public, serial=2**64)


def test_credentials_must_match_the_identity() -> None:
    creds = Credentials.for_network(NET, NODE)
    assert creds.certificate.node_public == NODE.public
    assert creds.network_public == NET.public
    with pytest.raises(ValueError, match="not for this node"):
        Credentials(NodeIdentity.from_seed(bytes(32)), creds.certificate, NET.public)
