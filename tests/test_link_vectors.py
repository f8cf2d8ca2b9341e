"""The test vectors of docs/wire-link.md §8, byte for byte.

Three sources must agree: the hex printed in the doc, an independent
re-implementation of the doc's sections 1-4 written here from primitives
(hashlib, struct, libsodium via pynacl's raw bindings), and the library
(``overlay.identity`` / ``overlay.link``) fed the same fixed entropy.

``python -m tests.test_link_vectors`` prints the block to paste into the doc.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from pathlib import Path

import nacl.bindings as sodium

from overlay.identity import Credentials, NetworkKey, NodeIdentity
from overlay.link import Established, LinkCore, Received, Role, Transmit
from overlay.link_frames import LinkLimits

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-link.md"

NETWORK_NAME = "test-net"
NETWORK_SEED = bytes(range(0x00, 0x20))
NODE_I_SEED = bytes(range(0x20, 0x40))
NODE_R_SEED = bytes(range(0x40, 0x60))
EPHEMERAL_I = bytes(range(0x60, 0x80))
EPHEMERAL_R = bytes(range(0x80, 0xA0))
CERT_I = {"serial": 1, "not_before": 0, "not_after": 0}
CERT_R = {"serial": 2, "not_before": 1_700_000_000, "not_after": 1_900_000_000}
NOW = 1_750_000_000
FRAGMENT_SIZE = 16
BULK_I2R = b"a bulk message cut in three fragments"
CONTROL_I2R = [b"hello, responder", b""]
CONTROL_R2I = b"hello, initiator"

INPUTS: dict[str, bytes] = {
    "network_name": NETWORK_NAME.encode(),
    "network_seed": NETWORK_SEED,
    "node_i_seed": NODE_I_SEED,
    "node_r_seed": NODE_R_SEED,
    "ephemeral_i": EPHEMERAL_I,
    "ephemeral_r": EPHEMERAL_R,
    "message_i2r_bulk": BULK_I2R,
    "message_i2r_control_0": CONTROL_I2R[0],
    "message_i2r_control_1": CONTROL_I2R[1],
    "message_r2i_control": CONTROL_R2I,
}


def _h(data: bytes, person: bytes, key: bytes = b"", size: int = 32) -> bytes:
    return hashlib.blake2b(data, digest_size=size, person=person, key=key).digest()


def _sign(seed: bytes, message: bytes) -> bytes:
    _, secret = sodium.crypto_sign_seed_keypair(seed)
    return sodium.crypto_sign(message, secret)[:64]


def _aead(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
    return sodium.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def reference_vectors() -> dict[str, bytes]:
    """Sections 1-3 of the doc, step by step, sharing no code with the library."""
    out: dict[str, bytes] = {}
    network_public, _ = sodium.crypto_sign_seed_keypair(NETWORK_SEED)
    out["network_public"] = network_public
    out["beacon_key"] = _h(b"", b"iris-beacon-key", NETWORK_SEED)
    publics = {}
    for side, seed in (("i", NODE_I_SEED), ("r", NODE_R_SEED)):
        public, _ = sodium.crypto_sign_seed_keypair(seed)
        publics[side] = public
        out[f"node_{side}_public"] = public
        out[f"node_{side}_id"] = _h(public, b"iris-node-id", size=16)
    certs = {}
    for side, fields in (("i", CERT_I), ("r", CERT_R)):
        body = (
            b"iriscert\x01\x00"
            + network_public
            + publics[side]
            + struct.pack(">QQQ", fields["serial"], fields["not_before"], fields["not_after"])
        )
        certs[side] = body + _sign(NETWORK_SEED, body)
        out[f"cert_{side}"] = certs[side]

    e_i = sodium.crypto_scalarmult_base(EPHEMERAL_I)
    e_r = sodium.crypto_scalarmult_base(EPHEMERAL_R)
    out["e_i_public"] = e_i
    out["e_r_public"] = e_r
    shared = sodium.crypto_scalarmult(EPHEMERAL_I, e_r)
    assert shared == sodium.crypto_scalarmult(EPHEMERAL_R, e_i)
    out["shared_secret"] = shared

    msg1 = b"irislink\x02" + e_i
    out["msg1"] = struct.pack(">I", len(msg1)) + msg1
    th1 = _h(msg1 + e_r, b"iris-link-th1")
    out["th1"] = th1
    k_hs_r = _h(th1, b"iris-link-hs-r", shared)
    k_hs_i = _h(th1, b"iris-link-hs-i", shared)
    out["k_hs_r"] = k_hs_r
    out["k_hs_i"] = k_hs_i

    def signed(role: bytes) -> bytes:
        return b"iris-link-sig-v1" + role + network_public + e_i + e_r

    sig_r = _sign(NODE_R_SEED, signed(b"R"))
    out["sig_r"] = sig_r
    auth_r = struct.pack(">H", len(certs["r"])) + certs["r"] + sig_r
    msg2 = e_r + _aead(k_hs_r, bytes(12), th1, auth_r)
    out["msg2"] = struct.pack(">I", len(msg2)) + msg2
    th2 = _h(msg1 + msg2, b"iris-link-th2")
    out["th2"] = th2

    sig_i = _sign(NODE_I_SEED, signed(b"I"))
    out["sig_i"] = sig_i
    auth_i = struct.pack(">H", len(certs["i"])) + certs["i"] + sig_i
    msg3 = _aead(k_hs_i, bytes(12), th2, auth_i)
    out["msg3"] = struct.pack(">I", len(msg3)) + msg3
    th3 = _h(msg1 + msg2 + msg3, b"iris-link-th3")
    out["th3"] = th3
    k_i2r = _h(th3, b"iris-link-i2r", shared)
    k_r2i = _h(th3, b"iris-link-r2i", shared)
    out["k_i2r"] = k_i2r
    out["k_r2i"] = k_r2i

    # §4: the bulk message in fragments of 16 bytes, the first control message sent
    # after the first bulk fragment went out (so it goes next), the empty one last.
    total = struct.pack(">I", len(BULK_I2R))
    plaintexts = {
        "i2r": [
            b"\x11" + total + BULK_I2R[:16],
            b"\x00" + CONTROL_I2R[0],
            b"\x12" + BULK_I2R[16:32],
            b"\x13" + BULK_I2R[32:],
            b"\x00" + CONTROL_I2R[1],
        ],
        "r2i": [b"\x00" + CONTROL_R2I],
    }
    for direction, key in (("i2r", k_i2r), ("r2i", k_r2i)):
        for seq, plaintext in enumerate(plaintexts[direction]):
            out[f"frame_{direction}_{seq}_plaintext"] = plaintext
            header = struct.pack(">IQ", 8 + len(plaintext) + 16, seq)
            nonce = bytes(4) + struct.pack(">Q", seq)
            out[f"frame_{direction}_{seq}"] = header + _aead(key, nonce, header, plaintext)
    return out


def _fixed(value: bytes) -> Callable[[int], bytes]:
    def entropy(n: int) -> bytes:
        assert n == len(value), "the core draws exactly one 32-byte ephemeral key"
        return value

    return entropy


def library_vectors() -> dict[str, bytes]:
    """The same values, as the library produces them from the same inputs."""
    out: dict[str, bytes] = {}
    network = NetworkKey(NETWORK_NAME, NETWORK_SEED)
    out["network_public"] = network.public
    out["beacon_key"] = network.beacon_key()
    creds = {}
    for side, seed, fields in (("i", NODE_I_SEED, CERT_I), ("r", NODE_R_SEED, CERT_R)):
        identity = NodeIdentity.from_seed(seed)
        out[f"node_{side}_public"] = identity.public
        out[f"node_{side}_id"] = identity.node_id.to_bytes(16, "big")
        cert = network.issue(identity.public, **fields)
        out[f"cert_{side}"] = cert.encode()
        creds[side] = Credentials(identity, cert, network.public)

    limits = LinkLimits(fragment_size=FRAGMENT_SIZE)
    initiator = LinkCore(Role.INITIATOR, creds["i"], _fixed(EPHEMERAL_I), NOW, limits=limits)
    responder = LinkCore(Role.RESPONDER, creds["r"], _fixed(EPHEMERAL_R), NOW, limits=limits)
    (msg1,) = initiator.start()
    assert isinstance(msg1, Transmit)
    out["msg1"] = msg1.data
    msg2, *rest = responder.receive(msg1.data, NOW)
    assert isinstance(msg2, Transmit) and not rest
    out["msg2"] = msg2.data
    msg3, up_i = initiator.receive(msg2.data, NOW)
    assert isinstance(msg3, Transmit) and isinstance(up_i, Established)
    out["msg3"] = msg3.data
    (up_r,) = responder.receive(msg3.data, NOW)
    assert isinstance(up_r, Established)
    assert initiator.queue(BULK_I2R, bulk=True)
    i2r = initiator.take(1)  # one frame: the first bulk fragment
    assert initiator.queue(CONTROL_I2R[0])
    i2r += initiator.take(1 << 20)
    i2r += initiator.send(CONTROL_I2R[1])
    r2i = responder.send(CONTROL_R2I)
    for direction, stream, receiver, messages in (
        ("i2r", i2r, responder, [CONTROL_I2R[0], BULK_I2R, CONTROL_I2R[1]]),
        ("r2i", r2i, initiator, [CONTROL_R2I]),
    ):
        seq = pos = 0
        while pos < len(stream):
            end = pos + 4 + struct.unpack_from(">I", stream, pos)[0]
            out[f"frame_{direction}_{seq}"] = stream[pos:end]
            seq, pos = seq + 1, end
        assert receiver.receive(stream, NOW) == [Received(m) for m in messages]
    return out


_LINE = re.compile(r"^([a-z0-9_]+) =(?: ([0-9a-f]+))?$")


def doc_vectors() -> dict[str, bytes]:
    """The ``name = hex`` lines between the vector markers (long values wrap, indented)."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- vectors:begin -->", 1)[1].split("<!-- vectors:end -->", 1)[0]
    values: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        match = _LINE.match(line)
        if match:
            name = match.group(1)
            assert name not in values, f"vector {name} is listed twice"
            values[name] = match.group(2) or ""
        elif line.startswith("    ") and name and re.fullmatch(r"[0-9a-f]+", line.strip()):
            values[name] += line.strip()
        else:
            name = None
    return {key: bytes.fromhex(value) for key, value in values.items()}


def render() -> str:
    lines = ["Inputs:", "", "```"]
    for key, value in INPUTS.items():
        lines.extend(_wrap(key, value))
    lines += [
        "```",
        "",
        f"Certificates: `cert_i` has serial {CERT_I['serial']} and no validity window; "
        f"`cert_r` has serial {CERT_R['serial']}, not_before {CERT_R['not_before']} and "
        f"not_after {CERT_R['not_after']}. Both ends verify at now = {NOW}. Messages are "
        "ASCII strings and one empty message; the initiator cuts fragments of "
        f"{FRAGMENT_SIZE} bytes, queues the bulk message, sends one frame, then queues "
        "`hello, responder` (which goes next, ahead of the rest of the bulk message), "
        "then the empty control message.",
        "",
        "Outputs (`msg1`, `msg2`, `msg3` and frames include their length prefix, "
        "`frame_*_plaintext` is what §4 puts inside each frame; "
        "node ids are the 16 bytes of the 128-bit integer, big-endian):",
        "",
        "```",
    ]
    for key, value in reference_vectors().items():
        lines.extend(_wrap(key, value))
    lines.append("```")
    return "\n".join(lines)


def _wrap(key: str, value: bytes, width: int = 64) -> list[str]:
    text = value.hex()
    head, tail = text[:width], text[width:]
    first = f"{key} = {head}" if head else f"{key} ="
    return [first] + [f"    {tail[i : i + width]}" for i in range(0, len(tail), width)]


# --------------------------------------------------------------------------------


def test_doc_lists_every_vector() -> None:
    expected = set(INPUTS) | set(reference_vectors())
    assert set(doc_vectors()) == expected


def test_doc_inputs_are_the_test_inputs() -> None:
    documented = doc_vectors()
    for key, value in INPUTS.items():
        assert documented[key] == value, key


def test_reference_matches_doc_byte_for_byte() -> None:
    documented = doc_vectors()
    for key, value in reference_vectors().items():
        assert documented[key] == value, key


def test_library_matches_doc_byte_for_byte() -> None:
    documented = doc_vectors()
    produced = library_vectors()
    assert len(produced) == 17
    for key, value in produced.items():
        assert documented[key] == value, key


def test_sizes_in_the_doc() -> None:
    documented = doc_vectors()
    assert len(documented["cert_i"]) == 162
    assert len(documented["msg1"]) == 4 + 41
    assert len(documented["msg2"]) == 4 + 276
    assert len(documented["msg3"]) == 4 + 244
    assert len(documented["frame_i2r_4"]) == 4 + 24 + 1, "the empty message: its kind byte"
    assert len(documented["frame_i2r_0"]) == 4 + 24 + 5 + FRAGMENT_SIZE


if __name__ == "__main__":
    print(render())
