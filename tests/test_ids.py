"""Node, client and server ids (DESIGN section 1)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from cldcb.errors import KeyFormatError
from cldcb.ids import (
    SECP256K1_N,
    check_privkey,
    client_id_from_pubkey,
    new_privkey,
    node_id_from_pubkey,
    parse_client_id,
    parse_node_id,
    parse_pubkey,
    parse_server_id,
    pubkey_of,
    server_id_from_pubkey,
)

G = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
NOT_ON_CURVE = "02" + "00" * 32  # x = 0: 7 is not a square mod p


def vector_node_ids(data_dir: Path) -> list[str]:
    keys = json.loads((data_dir / "cln-keys.json").read_text())
    return [entry["node_id"] for entry in keys["hsm_secrets"]]


def test_vector_node_ids_round_trip(data_dir: Path) -> None:
    for node_id in vector_node_ids(data_dir):
        pub = parse_node_id(node_id)
        assert node_id_from_pubkey(pub) == node_id
        client_id = client_id_from_pubkey(pub)
        server_id = server_id_from_pubkey(pub)
        assert client_id == "c" + node_id[1:]
        assert server_id == "5" + node_id[1:]
        assert parse_client_id(client_id) == pub
        assert parse_server_id(server_id) == pub
        assert parse_pubkey(node_id) == pub


def test_upper_case_accepted_and_output_lower() -> None:
    pub = parse_node_id(G)
    client_id = client_id_from_pubkey(pub)
    assert parse_client_id(client_id.upper()) == pub
    assert parse_server_id(server_id_from_pubkey(pub).upper()) == pub
    assert parse_node_id(G.upper()) == pub
    assert client_id == client_id.lower()


def test_pubkey_of_generator() -> None:
    assert pubkey_of((1).to_bytes(32, "big")).hex() == G


@pytest.mark.parametrize(("parser", "name", "prefixes"), [
    (parse_client_id, "client id", "c2 or c3"),
    (parse_server_id, "server id", "52 or 53"),
    (parse_node_id, "node id", "02 or 03"),
    (parse_pubkey, "public key", "02 or 03"),
])
def test_parsers_reject_with_named_problem(parser: Callable[[str], bytes], name: str,
                                           prefixes: str) -> None:
    digit = prefixes[0]
    good = digit + G[1:]
    assert parser(good) == bytes.fromhex(G)

    wrong = "52" if digit != "5" else "c2"
    with pytest.raises(KeyFormatError, match=f"{name} must start with {prefixes}, got {wrong}…"):
        parser(wrong + G[2:])
    with pytest.raises(KeyFormatError, match=f"{name} must be 66 hex digits, got 64"):
        parser(good[:64])
    with pytest.raises(KeyFormatError, match=f"{name} must be 66 hex digits, got 68"):
        parser(good + "00")
    with pytest.raises(KeyFormatError,
                       match=f"{name} must be hex digits only, got 'z' at position 5"):
        parser(good[:4] + "z" + good[5:])
    with pytest.raises(KeyFormatError, match=f"{name} .* is not a point on secp256k1"):
        parser(digit + NOT_ON_CURVE[1:])
    with pytest.raises(KeyFormatError, match=f"{name} is empty"):
        parser("")


def test_wrong_kind_is_named() -> None:
    with pytest.raises(KeyFormatError, match="looks like a node id"):
        parse_client_id(G)
    with pytest.raises(KeyFormatError, match="looks like a client id"):
        parse_server_id("c" + G[1:])
    with pytest.raises(KeyFormatError, match="looks like a server id"):
        parse_node_id("5" + G[1:])


def test_formatters_reject_bad_pubkeys() -> None:
    with pytest.raises(KeyFormatError):
        client_id_from_pubkey(b"\x02" * 32)
    with pytest.raises(KeyFormatError):
        node_id_from_pubkey(bytes.fromhex(NOT_ON_CURVE))
    with pytest.raises(KeyFormatError):
        server_id_from_pubkey(b"\x04" + bytes(32))


@pytest.mark.parametrize("bad", [bytes(32), SECP256K1_N.to_bytes(32, "big"), b"\x01" * 31])
def test_check_privkey_rejects(bad: bytes) -> None:
    with pytest.raises(KeyFormatError):
        check_privkey(bad)
    with pytest.raises(KeyFormatError):
        pubkey_of(bad)


def test_new_privkey_is_valid_and_fresh() -> None:
    keys = {new_privkey() for _ in range(8)}
    assert len(keys) == 8
    for key in keys:
        assert check_privkey(key) == key


@given(st.integers(min_value=1, max_value=SECP256K1_N - 1))
def test_round_trip_any_key(secret: int) -> None:
    priv = secret.to_bytes(32, "big")
    pub = pubkey_of(priv)
    assert pub == PrivateKey(priv).public_key.format()
    for fmt, parse, first in ((client_id_from_pubkey, parse_client_id, "c"),
                              (server_id_from_pubkey, parse_server_id, "5"),
                              (node_id_from_pubkey, parse_node_id, "0")):
        text = fmt(pub)
        assert text[0] == first and len(text) == 66
        assert parse(text) == pub
