"""Client and server key files, passphrase files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cldcb.core.ids import client_id_from_pubkey, pubkey_of, server_id_from_pubkey
from cldcb.errors import KeyFileError, KeyFormatError
from cldcb.node.keyfile import (
    format_key_file,
    parse_key_file,
    read_client_key,
    read_passphrase_file,
    read_server_key,
    write_key_file,
)

PRIV = bytes.fromhex("fe77a220dcb864fb843f0161a4a33f2a8844b89c7160476af9ebe196b6e9e0ed")
OTHER = bytes([7]) * 32
CID = client_id_from_pubkey(pubkey_of(PRIV))
SID = server_id_from_pubkey(pubkey_of(PRIV))


def test_format_is_the_design_text() -> None:
    assert format_key_file(PRIV, "client") == f"# cid = {CID}\n# cpk = {PRIV.hex()}\n"
    assert format_key_file(PRIV, "server") == f"# sid = {SID}\n# spk = {PRIV.hex()}\n"
    assert CID.startswith(("c2", "c3")) and SID.startswith(("52", "53"))


def test_write_read_client_key_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    assert write_key_file(path, PRIV, "client") == CID
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_client_key(path) == (PRIV, CID)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client.key"]


def test_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k"
        write_key_file(path, PRIV)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_read_server_key(tmp_path: Path) -> None:
    path = tmp_path / "server_key"
    assert write_key_file(path, PRIV, "server") == SID
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_server_key(path) == (PRIV, SID)


def test_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    write_key_file(path, PRIV)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists.*choose another path"):
        write_key_file(path, OTHER)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client.key"]


def test_never_follows_or_replaces_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(link, PRIV)
    assert not target.exists()


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        write_key_file(tmp_path / "no" / "k", PRIV)


def test_parse_checks_key_matches_id() -> None:
    text = f"# cid = {client_id_from_pubkey(pubkey_of(OTHER))}\n# cpk = {PRIV.hex()}\n"
    with pytest.raises(KeyFormatError, match="does not give the cid") as info:
        parse_key_file(text, "client")
    assert PRIV.hex() not in str(info.value)


def test_parse_accepts_upper_case_and_blank_lines() -> None:
    text = f"\n#cid={CID.upper()}\n\n#   cpk   =   {PRIV.hex().upper()}  \n"
    assert parse_key_file(text, "client") == (PRIV, CID)


@pytest.mark.parametrize(("text", "message"), [
    ("", "has no '# cid"),
    (f"# cid = {CID}\n", "has no '# cpk"),
    (f"# cid = {CID}\ncpk {PRIV.hex()}\n", "line 2 is not"),
    (f"# cid = {CID}\n# cpk = {PRIV.hex()[:-2]}\n", "cpk must be 64 hex digits"),
    (f"# cid = {CID}\n# cpk = {PRIV.hex()[:-1]}x\n", "cpk must be 64 hex digits"),
    (f"# cid = {SID}\n# cpk = {PRIV.hex()}\n", "client id must start with c2 or c3"),
    (f"# cid = {CID}\n# cid = {CID}\n# cpk = {PRIV.hex()}\n", "appears twice"),
    (f"# sid = {SID}\n# spk = {PRIV.hex()}\n", "is a server key file, not a client key file"),
    (f"# cid = {CID}\n# cpk = {'00' * 32}\n", "out of range"),
])
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message) as info:
        parse_key_file(text, "client")
    assert PRIV.hex() not in str(info.value)


def test_client_file_is_not_a_server_file(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    write_key_file(path, PRIV, "client")
    with pytest.raises(KeyFormatError, match="is a client key file, not a server key file"):
        read_server_key(path)


def test_read_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        read_client_key(tmp_path / "nope")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyFileError, match="not UTF-8 text"):
        read_client_key(tmp_path / "bin")
    with pytest.raises(KeyFileError, match="is a folder"):
        read_client_key(tmp_path)


@pytest.mark.parametrize(("content", "expected"), [
    (b"secret", "secret"),
    (b"secret\n", "secret"),
    (b"secret\r\n", "secret"),
    (b"secret\n\n", "secret\n"),
    (b"secret\r\n\r\n", "secret\r\n"),
    (b"secret\r", "secret\r"),
    (b"  two words \t\n", "  two words \t"),
    ("pässword\n".encode(), "pässword"),
])
def test_passphrase_file_strips_one_newline_only(tmp_path: Path, content: bytes,
                                                 expected: str) -> None:
    path = tmp_path / "pw"
    path.write_bytes(content)
    assert read_passphrase_file(path) == expected


def test_passphrase_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        read_passphrase_file(tmp_path / "nope")
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(KeyFileError, match="is empty"):
        read_passphrase_file(tmp_path / "empty")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    for kind, read in (("client", read_client_key), ("server", read_server_key)):
        path = tmp_path / f"{kind}.key"
        write_key_file(path, PRIV, kind)
        path.chmod(mode)
        with pytest.raises(KeyFileError) as err:
            read(path)
        text = str(err.value)
        assert f"{mode:04o}" in text and f"chmod 600 {path}" in text
        assert PRIV.hex() not in text
        path.chmod(0o600)
        assert read(path)[0] == PRIV
        path.chmod(0o400)
        assert read(path)[0] == PRIV
        path.unlink()
