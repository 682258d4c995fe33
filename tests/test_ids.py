"""Node, client and server ids (DESIGN section 1)."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from cldcb.core.ids import (
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
from cldcb.errors import KeyFormatError

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


RANDOM_CALLS = {("os", "urandom"), ("secrets", "token_bytes")}
KEY_TAKERS = {"PrivateKey", "pubkey_of", "RecordSealer", "SnapshotSealer", "StreamSealer",
              "make_recognition", "write_key_file", "sign_message"}


def _is_random_32(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and (node.func.value.id, node.func.attr) in RANDOM_CALLS
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == 32)


def _keys_made_by_hand(tree: ast.AST) -> list[int]:
    """Lines where 32 random bytes become a private key without new_privkey's range
    check: passed straight to something that takes a private key, or stored in a name
    that says it holds one (``priv``, ``privs``, ``client_priv``, ``ephemeral``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", "")
            if name in KEY_TAKERS:
                args = [*node.args, *(k.value for k in node.keywords)]
                lines += [a.lineno for a in args if _is_random_32(a)]
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [ast.unparse(t).lower() for t in targets]
            if node.value is not None and any("priv" in n or "ephemeral" in n for n in names):
                lines += [n.lineno for n in ast.walk(node.value) if _is_random_32(n)]
    return lines


def test_every_private_key_comes_from_the_key_generator() -> None:
    """No private key of the program or its benchmarks is 32 random bytes taken by hand
    (without the check that they are a key: 0 < k < N): new_privkey makes them all."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for path in sorted([*(root / "cldcb").rglob("*.py"), *(root / "bench").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        found += [f"{path.relative_to(root)}:{line}" for line in _keys_made_by_hand(tree)]
    assert found == []
    # the check itself finds the forms it is about
    assert _keys_made_by_hand(ast.parse(
        "priv = os.urandom(32)\nprivs = [os.urandom(32) for _ in x]\n"
        "e = make_recognition(c, n, z, os.urandom(32))\nnonce = os.urandom(32)")) == [1, 2, 3]
