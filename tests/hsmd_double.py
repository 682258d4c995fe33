#!/usr/bin/env python3
"""A test double of Core Lightning's ``lightning_hsmd`` for the requests recovery uses.

Run like the real one: working directory ``<lightning-dir>/<network>``, fd 0 a
socket for status messages, fd 3 a socket for requests, every message framed
by a 4-byte big-endian length. It answers ``hsmd_init`` (11), ``hsmd_ecdh_req``
(1) and ``hsmd_sign_message`` (23) from the ``hsm_secret`` in its working
directory (all four formats; the passphrase comes from the init TLV), with the
same bytes as Core Lightning v26.06's hsmd (see hsmd-transcripts.json).

It is self-contained on purpose (coincurve, PyNaCl and cryptography only, no
cldcb import), so that it checks cldcb rather than mirroring it.

Derivations, as Core Lightning's ``libhsmd.c``:
- node key: HKDF-SHA256(secret[0:32], salt=u32le(counter), "nodeid");
- bip32 master: BIP32 from HKDF-SHA256(secret, salt=u32le(counter), "bip32 seed");
  the reply carries the xpub of m/0/0;
- bolt12 key: the public key of m/9735' of that master;
- BIP86 base (mnemonic secrets only, TLV 2): m/86'/0'/0' of BIP32 from the
  64-byte BIP39 seed itself;
- TLV 1: the hsm_secret format (0 plain, 1 encrypted, 2 mnemonic, 3 mnemonic
  with passphrase).

Like the real hsmd, it creates an ``hsm_secret`` when none exists (here a
random legacy 32-byte one). On any failure it sends a ``status_fail`` on fd 0
and exits with status 1.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import sys
from typing import NoReturn

import nacl.bindings
import nacl.exceptions
import nacl.pwhash.argon2id
from coincurve import PrivateKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HARDENED = 0x80000000
# What Core Lightning v26.06's hsmd announces (message types it accepts).
CAPABILITIES = (28, 56, 142, 147, 149, 29, 32, 34, 40, 41, 45, 51, 52)
HSM_MIN_VERSION, HSM_MAX_VERSION = 4, 6
STATUS_LOG, STATUS_FAIL = 0xFFF0, 0xFFF2


# --- wire -----------------------------------------------------------------------

def send_status(msg: bytes) -> None:
    os.write(0, struct.pack(">I", len(msg)) + msg)


def log(text: str) -> None:
    send_status(struct.pack(">HBB", STATUS_LOG, 1, 0) + text.encode() + b"\0")


def fail(text: str) -> NoReturn:
    send_status(struct.pack(">HH", STATUS_FAIL, 2) + text.encode() + b"\0")
    sys.exit(1)


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_request(sock: socket.socket) -> bytes | None:
    header = recv_exact(sock, 4)
    if header is None:
        return None
    return recv_exact(sock, struct.unpack(">I", header)[0])


def bigsize(value: int) -> bytes:
    assert value < 0xFD
    return bytes([value])


def tlv(tlv_type: int, value: bytes) -> bytes:
    if len(value) < 0xFD:
        return bigsize(tlv_type) + bytes([len(value)]) + value
    return bigsize(tlv_type) + b"\xfd" + struct.pack(">H", len(value)) + value


def parse_tlvs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        tlv_type, length = data[pos], data[pos + 1]
        if tlv_type >= 0xFD or length >= 0xFD:
            fail("TLV too large for this double")
        out[tlv_type] = data[pos + 2:pos + 2 + length]
        pos += 2 + length
    return out


# --- hsm_secret ---------------------------------------------------------------------

def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def load_secret(passphrase: str | None) -> tuple[int, bytes]:
    """(format, secret data) of ./hsm_secret, creating a random one if absent."""
    try:
        fd = os.open("hsm_secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except FileExistsError:
        pass
    else:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
        os.close(fd)
        log("created new hsm_secret file")
    with open("hsm_secret", "rb") as f:
        data = f.read()
    if len(data) < 32:
        fail("Failed to load hsm_secret: Invalid hsm_secret format")
    if len(data) == 32:
        return 0, data
    if len(data) == 73:
        if passphrase is None:
            fail("Failed to load hsm_secret: Passphrase required but not provided")
        key = nacl.pwhash.argon2id.kdf(
            32, passphrase.encode(), b"c-lightning".ljust(16, b"\0"),
            opslimit=nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_MODERATE)
        state = nacl.bindings.crypto_secretstream_xchacha20poly1305_state()
        try:
            nacl.bindings.crypto_secretstream_xchacha20poly1305_init_pull(state, data[:24], key)
            secret, _ = nacl.bindings.crypto_secretstream_xchacha20poly1305_pull(
                state, data[24:], None)
        except nacl.exceptions.CryptoError:
            fail("Failed to load hsm_secret: Wrong passphrase")
        return 1, secret
    with_pass = data[:32] != bytes(32)
    try:
        mnemonic = data[32:].split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        fail("Failed to load hsm_secret: Invalid mnemonic")
    if with_pass and passphrase is None:
        fail("Failed to load hsm_secret: Passphrase required but not provided")
    if not with_pass and passphrase is not None:
        fail("Failed to load hsm_secret: Passphrase provided but not needed")
    seed = hashlib.pbkdf2_hmac("sha512", mnemonic.encode(),
                               b"mnemonic" + (passphrase or "").encode(), 2048)
    if with_pass and hashlib.sha256(seed).digest() != data[:32]:
        fail("Failed to load hsm_secret: Wrong passphrase")
    return (3 if with_pass else 2), seed


# --- BIP32 ------------------------------------------------------------------------

ExtKey = tuple[bytes, bytes, int, bytes, int]  # privkey, chaincode, depth, parent fp, child


def pub(priv: bytes) -> bytes:
    return PrivateKey(priv).public_key.format(compressed=True)


def bip32_master(seed: bytes) -> ExtKey:
    digest = hmac.new(b"Bitcoin seed", seed, hashlib.sha512).digest()
    return digest[:32], digest[32:], 0, bytes(4), 0


def bip32_child(key: ExtKey, index: int) -> ExtKey:
    priv, chaincode, depth, _, _ = key
    if index & HARDENED:
        data = b"\0" + priv + struct.pack(">I", index)
    else:
        data = pub(priv) + struct.pack(">I", index)
    digest = hmac.new(chaincode, data, hashlib.sha512).digest()
    child = (int.from_bytes(digest[:32], "big") + int.from_bytes(priv, "big")) % N
    fingerprint = hashlib.new("ripemd160", hashlib.sha256(pub(priv)).digest()).digest()[:4]
    return child.to_bytes(32, "big"), digest[32:], depth + 1, fingerprint, index


def xpub(key: ExtKey, version: int) -> bytes:
    priv, chaincode, depth, fingerprint, index = key
    return (struct.pack(">IB", version, depth) + fingerprint + struct.pack(">I", index)
            + chaincode + pub(priv))


def counter_hkdf(ikm: bytes, info: bytes) -> bytes:
    counter = 0
    while True:
        out = hkdf(ikm, struct.pack("<I", counter), info)
        if 0 < int.from_bytes(out, "big") < N:
            return out
        counter += 1


# --- requests --------------------------------------------------------------------

class Hsm:
    def __init__(self) -> None:
        self.node_key: bytes | None = None

    def init(self, msg: bytes) -> bytes:
        pub_version = struct.unpack(">I", msg[2:6])[0]
        pos = 42
        for _ in range(5):
            if msg[pos] != 0:
                fail("this double does not support hsm_encryption_key or dev_force_* fields")
            pos += 1
        min_version, max_version = struct.unpack(">II", msg[pos:pos + 8])
        if HSM_MIN_VERSION > max_version or HSM_MAX_VERSION < min_version:
            fail(f"Version {min_version}-{max_version} not valid: "
                 f"we need {HSM_MIN_VERSION}-{HSM_MAX_VERSION}")
        raw = parse_tlvs(msg[pos + 8:]).get(1)
        passphrase = raw.rstrip(b"\0").decode() if raw is not None else None
        secret_type, secret = load_secret(passphrase)
        self.node_key = counter_hkdf(secret[:32], b"nodeid")
        master = bip32_master(counter_hkdf(secret, b"bip32 seed"))
        bip32 = bip32_child(bip32_child(master, 0), 0)
        bolt12 = pub(bip32_child(master, HARDENED | 9735)[0])
        tlvs = tlv(1, bytes([secret_type]))
        if len(secret) == 64:
            base = bip32_master(secret)
            for index in (HARDENED | 86, HARDENED | 0, HARDENED | 0):
                base = bip32_child(base, index)
            tlvs += tlv(2, xpub(base, pub_version))
        version = min(max_version, HSM_MAX_VERSION)
        return (struct.pack(">HIH", 114, version, len(CAPABILITIES))
                + b"".join(struct.pack(">I", c) for c in CAPABILITIES)
                + pub(self.node_key) + xpub(bip32, pub_version) + bolt12 + tlvs)

    def key(self) -> PrivateKey:
        if self.node_key is None:
            fail("request before hsmd_init")
        return PrivateKey(self.node_key)

    def ecdh(self, msg: bytes) -> bytes:
        if len(msg) != 35:
            fail("bad hsmd_ecdh_req")
        try:
            secret = self.key().ecdh(msg[2:35])
        except ValueError:
            fail("hsmd_ecdh_req: point is not on the curve")
        return struct.pack(">H", 100) + secret

    def sign_message(self, msg: bytes) -> bytes:
        (length,) = struct.unpack(">H", msg[2:4])
        text = msg[4:4 + length]
        digest = hashlib.sha256(
            hashlib.sha256(b"Lightning Signed Message:" + text).digest()).digest()
        return struct.pack(">H", 123) + self.key().sign_recoverable(digest, hasher=None)


def main() -> None:
    log("hsmd double starting")
    requests = socket.socket(fileno=3)
    hsm = Hsm()
    handlers = {11: hsm.init, 1: hsm.ecdh, 23: hsm.sign_message}
    while True:
        msg = read_request(requests)
        if msg is None:
            return
        msg_type = struct.unpack(">H", msg[:2])[0]
        handler = handlers.get(msg_type)
        if handler is None:
            fail(f"unknown request type {msg_type}")
        reply = handler(msg)
        requests.sendall(struct.pack(">I", len(reply)) + reply)


if __name__ == "__main__":
    main()
