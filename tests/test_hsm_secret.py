"""hsm_secret in the four formats -> node key (vectors from a real Core Lightning)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cldcb.core.hsm_secret import (
    HsmSecretFormat,
    bip39_problem,
    bip39_seed,
    bip39_words,
    detect_format,
    load_hsm_secret,
    needs_passphrase,
    node_key,
)
from cldcb.core.ids import node_id_from_pubkey, pubkey_of
from cldcb.errors import CorruptHsmSecret, HsmSecretError, PassphraseRequired, WrongPassphrase
from cldcb.node.nodekey import LocalNodeKey

FORMATS = {
    "plain32": HsmSecretFormat.PLAIN,
    "enc73": HsmSecretFormat.ENCRYPTED,
    "mn_nopass": HsmSecretFormat.MNEMONIC_NO_PASS,
    "mn_pass": HsmSecretFormat.MNEMONIC_WITH_PASS,
}
ABANDON = " ".join(["abandon"] * 11 + ["about"])


@pytest.fixture(scope="module")
def vectors(data_dir: Path) -> dict[str, dict[str, Any]]:
    keys = json.loads((data_dir / "cln-keys.json").read_text())
    return {entry["name"]: entry for entry in keys["hsm_secrets"]}


def file_of(vectors: dict[str, dict[str, Any]], name: str) -> bytes:
    return bytes.fromhex(vectors[name]["file_hex"])


def node_id_of(file_bytes: bytes, passphrase: str | None) -> str:
    return node_id_from_pubkey(pubkey_of(node_key(file_bytes, passphrase)))


def test_every_vector_gives_its_node_id(vectors: dict[str, dict[str, Any]]) -> None:
    assert set(vectors) == set(FORMATS)
    for name, entry in vectors.items():
        data = file_of(vectors, name)
        assert detect_format(data) is FORMATS[name]
        assert needs_passphrase(data) is (entry["passphrase"] is not None)
        assert node_id_of(data, entry["passphrase"]) == entry["node_id"], name


def test_secret_data_and_repr(vectors: dict[str, dict[str, Any]]) -> None:
    plain = load_hsm_secret(file_of(vectors, "plain32"))
    assert plain.secret_data == file_of(vectors, "plain32")
    mnemonic = load_hsm_secret(file_of(vectors, "mn_pass"), "TREZOR")
    assert len(mnemonic.secret_data) == 64
    assert mnemonic.secret_data.hex() not in repr(mnemonic)
    assert plain.secret_data.hex() not in repr(plain)


def test_local_node_key_from_file(tmp_path: Path, vectors: dict[str, dict[str, Any]]) -> None:
    path = tmp_path / "hsm_secret"
    path.write_bytes(file_of(vectors, "mn_pass"))
    key = LocalNodeKey.from_hsm_secret(path, "TREZOR")
    assert key.node_id == vectors["mn_pass"]["node_id"]
    assert "TREZOR" not in repr(key)
    assert node_key(file_of(vectors, "mn_pass"), "TREZOR").hex() not in repr(key)
    with pytest.raises(HsmSecretError, match="does not exist"):
        LocalNodeKey.from_hsm_secret(tmp_path / "missing")
    with pytest.raises(WrongPassphrase, match=str(path)):
        LocalNodeKey.from_hsm_secret(path, "trezor")


@pytest.mark.parametrize("name", ["enc73", "mn_pass"])
def test_passphrase_required(vectors: dict[str, dict[str, Any]], name: str) -> None:
    with pytest.raises(PassphraseRequired, match="--passphrase-file"):
        node_key(file_of(vectors, name))


def test_wrong_passphrase_encrypted(vectors: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(WrongPassphrase, match="does not decrypt"):
        node_key(file_of(vectors, "enc73"), "correct horse battery")


def test_wrong_passphrase_mnemonic(vectors: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(WrongPassphrase, match="does not match"):
        node_key(file_of(vectors, "mn_pass"), "TREZOR ")
    with pytest.raises(WrongPassphrase):
        node_key(file_of(vectors, "mn_pass"), "")


@pytest.mark.parametrize("name", ["plain32", "mn_nopass"])
def test_passphrase_given_but_none_needed(vectors: dict[str, dict[str, Any]],
                                          name: str) -> None:
    # Core Lightning refuses a passphrase for a mnemonic without one ("Passphrase
    # provided but not needed"); cldcb refuses it for every unprotected format.
    with pytest.raises(WrongPassphrase, match="without --passphrase-file"):
        node_key(file_of(vectors, name), "TREZOR")


def mnemonic_file(words: bytes, check: bytes = bytes(32)) -> bytes:
    return check + words


@pytest.mark.parametrize(("data", "problem"), [
    (b"", "0 bytes long"),
    (b"\x01" * 31, "31 bytes long"),
    (mnemonic_file("abandón".encode() + b" abandon" * 11), "not a letter or space"),
    (mnemonic_file(b"\xff" * 40), "not a letter or space"),
    (mnemonic_file(ABANDON.replace("about", "abandon").encode()), "checksum does not match"),
    (mnemonic_file(ABANDON.replace("about", "abuot").encode()), "word 12 is not in the"),
    (mnemonic_file(ABANDON.replace(" ", "  ", 1).encode()), "separated by single spaces"),
    (mnemonic_file((ABANDON + "\n").encode()), "offset 125 is 0x0a, not a letter or space"),
    (mnemonic_file(b" ".join([b"abandon"] * 11)), "11 words"),
    (mnemonic_file(ABANDON.upper().encode(), b"\x01" * 32), "word 1 is not in the"),
    (b"\x01" * 40, "not a letter or space"),
])
def test_corrupt_files(data: bytes, problem: str) -> None:
    with pytest.raises(CorruptHsmSecret, match=problem) as info:
        node_key(data, None)
    assert "use a backup" in str(info.value) or "hsm_secret" in str(info.value)
    # Damage is reported before anyone is asked for a passphrase.
    with pytest.raises(CorruptHsmSecret):
        needs_passphrase(data)
    with pytest.raises(CorruptHsmSecret):
        node_key(data, "some passphrase")


def test_the_three_errors_are_distinct(vectors: dict[str, dict[str, Any]]) -> None:
    errors = []
    for passphrase, data in ((None, file_of(vectors, "mn_pass")),
                             ("wrong", file_of(vectors, "mn_pass")),
                             (None, b"\x01" * 40)):
        with pytest.raises(HsmSecretError) as info:
            node_key(data, passphrase)
        errors.append(type(info.value))
    assert errors == [PassphraseRequired, WrongPassphrase, CorruptHsmSecret]


def test_mnemonic_ends_at_nul_like_core_lightning(vectors: dict[str, dict[str, Any]]) -> None:
    # Core Lightning reads the mnemonic with strndup, which stops at a NUL byte.
    data = file_of(vectors, "mn_nopass") + b"\0trailing junk"
    assert node_id_of(data, None) == vectors["mn_nopass"]["node_id"]


def test_bip39_word_list_is_the_standard_one() -> None:
    words = bip39_words()
    assert len(words) == 2048 and words[0] == "abandon" and words[-1] == "zoo"
    digest = hashlib.sha256(("\n".join(words) + "\n").encode()).hexdigest()
    assert digest == "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"


def test_bip39_reference_vectors() -> None:
    # First vector of the BIP39 reference test set (passphrase "TREZOR").
    assert bip39_seed(ABANDON, "TREZOR").hex() == (
        "c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e53495531f09a6987599d18264"
        "c1e1c92f2cf141630c7a3c4ab7c81b2f001698e7463b04")
    assert bip39_problem(ABANDON) == ""
    assert bip39_problem(" ".join(["zoo"] * 23 + ["vote"])) == ""
    assert bip39_problem(" ".join(["zoo"] * 24)) == "its checksum does not match"
