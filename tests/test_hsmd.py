"""The hsmd wire codec, the hsmd test double and AltHsmdNodeKey.

hsmd-transcripts.json holds the bytes exchanged with Core Lightning v26.06's own
lightning_hsmd; the double must answer those requests with those replies, and
cldcb's encoder must produce those requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from coincurve import PrivateKey

from cldcb.core import hsmd_wire
from cldcb.core.hsm_secret import node_key
from cldcb.errors import HsmdError, KeyFormatError
from cldcb.node import alt_hsmd
from cldcb.node.alt_hsmd import AltHsmdNodeKey
from cldcb.node.nodekey import NodeKey

DOUBLE = Path(__file__).parent / "hsmd_double.py"
# The transcripts' ECDH point: the public key of sha256("cldcb test peer").
PEER_POINT = PrivateKey(hashlib.sha256(b"cldcb test peer").digest()).public_key.format()


@pytest.fixture(scope="module")
def transcripts(data_dir: Path) -> list[dict[str, Any]]:
    return json.loads((data_dir / "hsmd-transcripts.json").read_text())["transcripts"]


@pytest.fixture(scope="module")
def secrets(data_dir: Path) -> dict[str, dict[str, Any]]:
    keys = json.loads((data_dir / "cln-keys.json").read_text())
    return {entry["name"]: entry for entry in keys["hsm_secrets"]}


def write_program(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def double(tmp_path: Path) -> Path:
    """The double, started through the interpreter running the tests."""
    return write_program(tmp_path / "hsmd",
                         f'exec {shlex.quote(sys.executable)} {shlex.quote(str(DOUBLE))} "$@"')


def node_dir(tmp_path: Path, file_bytes: bytes | None, network: str = "regtest") -> Path:
    lightning_dir = tmp_path / "lightning"
    (lightning_dir / network).mkdir(parents=True)
    if file_bytes is not None:
        (lightning_dir / network / "hsm_secret").write_bytes(file_bytes)
    return lightning_dir


# --- the codec ------------------------------------------------------------------

def test_encoder_produces_the_transcript_requests(transcripts: list[dict[str, Any]]) -> None:
    for t in transcripts:
        init, ecdh, sign = (bytes.fromhex(e["request_hex"]) for e in t["exchanges"])
        assert hsmd_wire.encode_init("regtest", t["passphrase"]) == init
        assert hsmd_wire.encode_ecdh_req(PEER_POINT) == ecdh
        assert hsmd_wire.encode_sign_message(b"hello cldcb") == sign
        decoded = hsmd_wire.decode_init(init)
        assert decoded.passphrase == t["passphrase"]
        assert decoded.network is not None and decoded.network.name == "regtest"
        assert (decoded.min_version, decoded.max_version) == (4, 6)


def test_decoder_reads_the_transcript_replies(transcripts: list[dict[str, Any]]) -> None:
    for t in transcripts:
        init, ecdh, sign = (bytes.fromhex(e["reply_hex"]) for e in t["exchanges"])
        reply = hsmd_wire.decode_init_reply(init)
        assert reply.node_id.hex() == t["node_id"]
        assert reply.hsm_version == 6 and len(reply.capabilities) == 13
        assert hsmd_wire.encode_init_reply(reply) == init
        assert len(hsmd_wire.decode_ecdh_resp(ecdh)) == 32
        signature, recid = hsmd_wire.decode_sign_message_reply(sign)
        assert hsmd_wire.encode_sign_message_reply(signature, recid) == sign


def test_network_parameters() -> None:
    bitcoin = hsmd_wire.decode_init(hsmd_wire.encode_init("bitcoin"))
    assert (bitcoin.bip32_pubkey_version, bitcoin.bip32_privkey_version) == (0x0488B21E,
                                                                          0x0488ADE4)
    assert bitcoin.chain_hash.hex().startswith("6fe28c0ab6f1b372c1a6a246ae63f74f")
    for name in ("testnet", "signet", "regtest"):
        request = hsmd_wire.decode_init(hsmd_wire.encode_init(name))
        assert request.bip32_pubkey_version == 0x043587CF
        assert request.network is not None and request.network.name == name
    with pytest.raises(HsmdError, match="unknown network 'mainnet'"):
        hsmd_wire.encode_init("mainnet")


@pytest.mark.parametrize(("decoder", "msg", "problem"), [
    (hsmd_wire.decode_ecdh_resp, b"\x00\x64" + bytes(31), "must carry 32 bytes"),
    (hsmd_wire.decode_ecdh_resp, b"\x00\x65" + bytes(32), "expected hsmd_ecdh_resp"),
    (hsmd_wire.decode_sign_message_reply, b"\x00\x7b" + bytes(64) + b"\x04", "recovery id 4"),
    (hsmd_wire.decode_init_reply, b"\x00\x72\x00\x00\x00\x06\x00\x00", "truncated"),
    (hsmd_wire.decode_sign_message, b"\x00\x17\x00\x05abc", "length does not match"),
    (hsmd_wire.decode_tlvs, b"\x02\x00\x01\x00", "ascending"),
    (hsmd_wire.decode_tlvs, b"\x01\x05ab", "truncated"),
])
def test_malformed_messages(decoder: Any, msg: bytes, problem: str) -> None:
    with pytest.raises(HsmdError, match=problem):
        decoder(msg)


def test_framing() -> None:
    assert hsmd_wire.frame(b"\x00\x01") == b"\x00\x00\x00\x02\x00\x01"
    assert hsmd_wire.frame_length(b"\x00\x00\x01\x00") == 256
    with pytest.raises(HsmdError, match="not speaking the hsmd protocol"):
        hsmd_wire.frame_length(b"\x7f\xff\xff\xff")
    with pytest.raises(HsmdError, match="NUL"):
        hsmd_wire.encode_init("regtest", "a\0b")


# --- the double, byte for byte ------------------------------------------------------

def recv_frame(sock: socket.socket) -> bytes:
    def exact(size: int) -> bytes:
        buf = b""
        while len(buf) < size:
            chunk = sock.recv(size - len(buf))
            assert chunk, "EOF from the hsmd double"
            buf += chunk
        return buf
    return exact(struct.unpack(">I", exact(4))[0])


def exchange_raw(program: Path, workdir: Path, requests: list[bytes]) -> tuple[list[bytes],
                                                                                bytes]:
    """Run ``program`` as lightningd would; the replies and its first status message."""
    status_ours, status_theirs = socket.socketpair()
    req_ours, req_theirs = socket.socketpair()
    fd = req_theirs.fileno()

    def to_fd3() -> None:
        if fd != 3:
            os.dup2(fd, 3)
        else:
            os.set_inheritable(3, True)

    proc = subprocess.Popen([str(program)], cwd=workdir, stdin=status_theirs.fileno(),
                            close_fds=False, preexec_fn=to_fd3)
    status_theirs.close()
    req_theirs.close()
    try:
        status_ours.settimeout(20)
        req_ours.settimeout(20)
        replies = []
        for request in requests:
            req_ours.sendall(hsmd_wire.frame(request))
            replies.append(recv_frame(req_ours))
        first_status = recv_frame(status_ours)
    finally:
        req_ours.close()
        assert proc.wait(10) == 0
        status_ours.close()
    return replies, first_status


def test_double_reproduces_transcripts(tmp_path: Path, double: Path,
                                       transcripts: list[dict[str, Any]],
                                       secrets: dict[str, dict[str, Any]]) -> None:
    for t in transcripts:
        workdir = tmp_path / t["hsm_secret"]
        workdir.mkdir()
        (workdir / "hsm_secret").write_bytes(bytes.fromhex(secrets[t["hsm_secret"]]["file_hex"]))
        requests = [bytes.fromhex(e["request_hex"]) for e in t["exchanges"]]
        replies, status = exchange_raw(double, workdir, requests)
        for exchange, reply in zip(t["exchanges"], replies, strict=True):
            assert reply.hex() == exchange["reply_hex"], (t["hsm_secret"], exchange["what"])
        assert hsmd_wire.message_type(status) == hsmd_wire.STATUS_LOG


# --- AltHsmdNodeKey against the double -------------------------------------------------

@pytest.mark.parametrize("name", ["plain32", "enc73", "mn_nopass", "mn_pass"])
def test_alt_hsmd_node_key(tmp_path: Path, double: Path, name: str,
                           secrets: dict[str, dict[str, Any]],
                           transcripts: list[dict[str, Any]]) -> None:
    entry = secrets[name]
    file_bytes = bytes.fromhex(entry["file_hex"])
    lightning_dir = node_dir(tmp_path, file_bytes)
    expected_sign = next(t for t in transcripts if t["hsm_secret"] == name)["exchanges"][2]
    local_key = PrivateKey(node_key(file_bytes, entry["passphrase"]))
    with AltHsmdNodeKey(double, lightning_dir, "regtest", entry["passphrase"],
                        timeout=20) as key:
        assert isinstance(key, NodeKey)
        assert key.node_id == entry["node_id"]
        assert key.pubkey == local_key.public_key.format()
        for peer in (PEER_POINT, PrivateKey(bytes([9]) * 32).public_key.format()):
            assert key.ecdh(peer) == local_key.ecdh(peer)
        signed = key.sign_message("hello cldcb")
        assert (signed.signature + bytes([signed.recid])).hex() == expected_sign["reply_hex"][4:]
        with pytest.raises(KeyFormatError):
            key.ecdh(b"\x02" + bytes(32))
    assert (lightning_dir / "regtest" / "hsm_secret").read_bytes() == file_bytes


def test_alt_hsmd_signatures_equal_the_vectors(tmp_path: Path, double: Path,
                                               secrets: dict[str, dict[str, Any]],
                                               data_dir: Path) -> None:
    vectors = json.loads((data_dir / "cln-keys.json").read_text())["signmessage"]
    lightning_dir = node_dir(tmp_path, bytes.fromhex(secrets["plain32"]["file_hex"]), "bitcoin")
    with AltHsmdNodeKey(double, lightning_dir, timeout=20) as key:
        assert key.node_id == vectors[0]["node_id"]
        for vector in vectors:
            signed = key.sign_message(vector["message"])
            assert signed.signature.hex() == vector["signature"]
            assert signed.zbase == vector["zbase"]


def test_created_hsm_secret_is_removed_and_named(tmp_path: Path, double: Path) -> None:
    lightning_dir = node_dir(tmp_path, None)
    with pytest.raises(HsmdError, match="created a new one") as info:
        with AltHsmdNodeKey(double, lightning_dir, "regtest", timeout=20):
            pytest.fail("must not get a node key from a fresh hsm_secret")
    assert re.search(r"new node 0[23][0-9a-f]{64}\b", str(info.value))
    assert list((lightning_dir / "regtest").iterdir()) == []


@pytest.mark.parametrize(("name", "passphrase", "said"), [
    ("mn_pass", None, "Passphrase required"),
    ("mn_pass", "wrong", "Wrong passphrase"),
    ("mn_nopass", "TREZOR", "not needed"),
])
def test_alt_hsmd_refusals_are_reported(tmp_path: Path, double: Path, name: str,
                                        passphrase: str | None, said: str,
                                        secrets: dict[str, dict[str, Any]]) -> None:
    lightning_dir = node_dir(tmp_path, bytes.fromhex(secrets[name]["file_hex"]))
    with pytest.raises(HsmdError, match=said) as info:
        with AltHsmdNodeKey(double, lightning_dir, "regtest", passphrase, timeout=20):
            pass
    if passphrase:
        assert passphrase not in str(info.value)
    assert (lightning_dir / "regtest" / "hsm_secret").exists()


def test_alt_hsmd_times_out_and_stops_the_program(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alt_hsmd, "_STOP_GRACE", 0.5)
    pid_file = tmp_path / "pid"
    program = write_program(tmp_path / "silent", f"echo $$ > {pid_file}\nexec sleep 60")
    lightning_dir = node_dir(tmp_path, b"\x01" * 32)
    with pytest.raises(HsmdError, match="did not answer hsmd_init within 0.5 s"):
        with AltHsmdNodeKey(program, lightning_dir, "regtest", timeout=0.5):
            pass
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_alt_hsmd_program_that_exits(tmp_path: Path) -> None:
    program = write_program(tmp_path / "quits", "exit 3")
    lightning_dir = node_dir(tmp_path, b"\x01" * 32)
    with pytest.raises(HsmdError, match="exited with status 3"):
        with AltHsmdNodeKey(program, lightning_dir, "regtest", timeout=5):
            pass


def test_alt_hsmd_bad_setup(tmp_path: Path, double: Path) -> None:
    with pytest.raises(HsmdError, match="cannot start"):
        with AltHsmdNodeKey(tmp_path / "no-such-program", node_dir(tmp_path, b"\x01" * 32),
                            "regtest"):
            pass
    with pytest.raises(HsmdError, match="does not exist"):
        with AltHsmdNodeKey(double, tmp_path / "nowhere", "regtest"):
            pass
    key = AltHsmdNodeKey(double, tmp_path / "lightning", "regtest")
    with pytest.raises(HsmdError, match="not running"):
        key.sign_message("hello")


def test_alt_hsmd_init_refused_with_a_message(tmp_path: Path) -> None:
    # Newer hsmds answer a wrong passphrase with an init failure message (a code and
    # a NUL-terminated text) instead of the init reply: its text must reach the user.
    script = tmp_path / "refuses.py"
    script.write_text(
        "import socket, struct\n"
        "s = socket.socket(fileno=3)\n"
        "size = struct.unpack('>I', s.recv(4, socket.MSG_WAITALL))[0]\n"
        "s.recv(size, socket.MSG_WAITALL)\n"
        "msg = struct.pack('>HI', 199, 4) + b'Failed to load hsm_secret: Wrong passphrase\\0'\n"
        "s.sendall(struct.pack('>I', len(msg)) + msg)\n"
        "s.recv(1)\n")
    program = write_program(tmp_path / "refuses",
                            f"exec {shlex.quote(sys.executable)} {shlex.quote(str(script))}")
    lightning_dir = node_dir(tmp_path, b"\x01" * 32)
    with pytest.raises(HsmdError, match="refused hsmd_init .*type 199: Failed to load "
                                        "hsm_secret: Wrong passphrase"):
        with AltHsmdNodeKey(program, lightning_dir, "regtest", "secret", timeout=10):
            pass
