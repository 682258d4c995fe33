"""Lightning signmessage, byte for byte as Core Lightning (vectors from a real node)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from cldcb.core.hsm_secret import node_key
from cldcb.core.ids import parse_node_id
from cldcb.core.signmessage import (
    SignedMessage,
    is_rpc_safe,
    message_digest,
    recover_pubkey,
    sign_message,
    verify_message,
    zbase32_decode,
    zbase32_encode,
)
from cldcb.errors import KeyFormatError
from cldcb.node.nodekey import LocalNodeKey, NodeKey

# The plain32 hsm_secret of cln-keys.json: its node made the signmessage vectors.
PLAIN32 = bytes.fromhex("fe77a220dcb864fb843f0161a4a33f2a8844b89c7160476af9ebe196b6e9e0ed")


@pytest.fixture(scope="module")
def keys(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "cln-keys.json").read_text())


@pytest.fixture(scope="module")
def node(keys: dict[str, Any]) -> LocalNodeKey:
    key = LocalNodeKey.from_hsm_secret_bytes(PLAIN32)
    assert key.node_id == keys["signmessage"][0]["node_id"]
    return key


def test_vectors_reproduced_byte_for_byte(keys: dict[str, Any], node: LocalNodeKey) -> None:
    assert len(keys["signmessage"]) == 2
    for vector in keys["signmessage"]:
        signed = node.sign_message(vector["message"])
        assert signed.signature.hex() == vector["signature"]
        assert f"{signed.recid:02x}" == vector["recid"]
        assert signed.zbase == vector["zbase"]


def test_vectors_verify_and_recover(keys: dict[str, Any]) -> None:
    for vector in keys["signmessage"]:
        pub = parse_node_id(vector["node_id"])
        assert recover_pubkey(vector["message"], vector["zbase"]) == pub
        assert verify_message(vector["message"], vector["zbase"], pub)
        assert verify_message(vector["message"], vector["zbase"].upper(), pub)
        assert not verify_message(vector["message"] + " ", vector["zbase"], pub)
        other = PrivateKey(bytes([5]) * 32).public_key.format()
        assert not verify_message(vector["message"], vector["zbase"], other)


def test_sign_message_function_equals_node_key(node: LocalNodeKey) -> None:
    direct = sign_message(node_key(PLAIN32), "hello cldcb")
    assert direct == node.sign_message("hello cldcb")


@pytest.mark.parametrize("bad", [
    "",
    "y" * 103,
    "y" * 105,
    "l" + "y" * 103,  # 'l' is not a zbase32 digit
    "y" * 104,  # header byte 0: no recovery id
])
def test_malformed_signatures(bad: str) -> None:
    pub = PrivateKey(bytes([5]) * 32).public_key.format()
    assert not verify_message("hello", bad, pub)
    with pytest.raises(KeyFormatError):
        recover_pubkey("hello", bad)


def test_tampered_signature_does_not_verify(keys: dict[str, Any]) -> None:
    vector = keys["signmessage"][0]
    pub = parse_node_id(vector["node_id"])
    zbase = vector["zbase"]
    for pos in (3, 50, 103):
        swapped = "y" if zbase[pos] != "y" else "b"
        tampered = zbase[:pos] + swapped + zbase[pos + 1:]
        assert not verify_message(vector["message"], tampered, pub)


def test_digest_is_double_sha256_of_prefixed_message() -> None:
    inner = hashlib.sha256(b"Lightning Signed Message:hello").digest()
    assert message_digest("hello") == hashlib.sha256(inner).digest()


def test_zbase32_known_values() -> None:
    assert zbase32_encode(b"") == ""
    assert zbase32_encode(b"\x00") == "yy"
    assert zbase32_encode(b"\xff") == "9h"
    assert zbase32_decode("9h") == b"\xff"
    with pytest.raises(KeyFormatError, match="non-zero padding"):
        zbase32_decode("99")


@given(st.binary(max_size=80))
def test_zbase32_round_trip(data: bytes) -> None:
    assert zbase32_decode(zbase32_encode(data)) == data


@given(st.binary(min_size=32, max_size=32), st.text(max_size=60))
def test_sign_then_recover(secret: bytes, message: str) -> None:
    try:
        key = LocalNodeKey(secret)
    except KeyFormatError:
        return
    signed = key.sign_message(message)
    assert isinstance(signed, SignedMessage) and len(signed.zbase) == 104
    assert recover_pubkey(message, signed.zbase) == key.pubkey


def test_ecdh_equals_coincurve(node: LocalNodeKey) -> None:
    peer = PrivateKey(bytes([3]) * 32)
    shared = node.ecdh(peer.public_key.format())
    assert shared == peer.ecdh(node.pubkey)
    assert shared == PrivateKey(node_key(PLAIN32)).ecdh(peer.public_key.format())
    with pytest.raises(KeyFormatError):
        node.ecdh(b"\x02" + bytes(32))


def test_local_node_key_is_a_node_key(node: LocalNodeKey) -> None:
    assert isinstance(node, NodeKey)
    assert node.node_id.startswith(("02", "03")) and len(node.pubkey) == 33


def test_rpc_safe_messages() -> None:
    assert is_rpc_safe("cldcb recognition 0a1b2c")
    assert not is_rpc_safe('say "hi"')
    assert not is_rpc_safe("back\\slash")
    assert not is_rpc_safe("naïve")
    assert not is_rpc_safe("two\nlines")
