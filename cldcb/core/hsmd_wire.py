"""The part of Core Lightning's hsmd wire protocol that recovery needs.

Pure encode/decode (no I/O). Every message is framed by a 4-byte big-endian
length; a message starts with its 2-byte big-endian type; integers are
big-endian. Fields, from Core Lightning v26.06 ``hsmd/hsmd_wire.csv``:

- ``hsmd_init`` (11): bip32 pubkey version u32, privkey version u32, the
  network's genesis hash (32 bytes, internal order), five optional fields (one
  byte 0/1, then the value), min version u32, max version u32, a TLV stream
  (type 1: the passphrase followed by one NUL byte).
- ``hsmd_init_reply_v4`` (114): hsm_version u32, u16 count + u32 capabilities,
  node id (33), bip32 extended public key (78), bolt12 key (33), TLV stream
  (type 1: the hsm_secret format; type 2: the BIP86 base xpub, mnemonic only).
- ``hsmd_ecdh_req`` (1): point (33); ``hsmd_ecdh_resp`` (100): secret (32).
- ``hsmd_sign_message`` (23): u16 length + message; ``hsmd_sign_message_reply``
  (123): r||s (64) + recovery id (1).

Status messages (on the status socket) are ``status_log`` (0xFFF0) and
``status_fail`` (0xFFF2), whose last field is a NUL-terminated string.
Malformed input raises :class:`~cldcb.errors.HsmdError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cldcb.errors import HsmdError

MSG_ECDH_REQ = 1
MSG_INIT = 11
MSG_SIGN_MESSAGE = 23
MSG_ECDH_RESP = 100
MSG_INIT_REPLY_V4 = 114
MSG_SIGN_MESSAGE_REPLY = 123
STATUS_LOG = 0xFFF0
STATUS_FAIL = 0xFFF2

TLV_INIT_PASSPHRASE = 1
TLV_REPLY_SECRET_TYPE = 1
TLV_REPLY_BIP86_BASE = 2

MIN_VERSION = 4
MAX_VERSION = 6
MAX_FRAME = 1 << 20  # no message recovery needs comes near this
EXT_KEY_LEN = 78


@dataclass(frozen=True)
class Network:
    """What hsmd_init says about a network."""

    name: str
    bip32_pubkey_version: int
    bip32_privkey_version: int
    genesis_hash: str  # the usual (reversed) hex

    @property
    def chain_hash(self) -> bytes:
        """The genesis hash in internal byte order, as on the wire."""
        return bytes.fromhex(self.genesis_hash)[::-1]


_MAINNET_VERSIONS = (0x0488B21E, 0x0488ADE4)
_TESTNET_VERSIONS = (0x043587CF, 0x04358394)
NETWORKS: dict[str, Network] = {
    "bitcoin": Network("bitcoin", *_MAINNET_VERSIONS,
                       "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"),
    "testnet": Network("testnet", *_TESTNET_VERSIONS,
                       "000000000933ea01ad0ee984209779baaec3ced90fa3f408719526f8d77f4943"),
    "signet": Network("signet", *_TESTNET_VERSIONS,
                      "00000008819873e925422c1ff0f99f7cc9bbb232af63a077a480a3633bee1ef6"),
    "regtest": Network("regtest", *_TESTNET_VERSIONS,
                       "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"),
}


def network(name: str) -> Network:
    """The :class:`Network` called ``name`` (bitcoin, testnet, signet, regtest)."""
    try:
        return NETWORKS[name]
    except KeyError:
        raise HsmdError(f"unknown network {name!r}: use one of "
                        f"{', '.join(NETWORKS)}") from None


def network_by_chain_hash(chain_hash: bytes) -> Network | None:
    """The network whose genesis hash (internal order) is ``chain_hash``."""
    return next((n for n in NETWORKS.values() if n.chain_hash == chain_hash), None)


# --- framing ---------------------------------------------------------------

def frame(msg: bytes) -> bytes:
    """``msg`` with its 4-byte big-endian length in front."""
    if len(msg) > MAX_FRAME:
        raise HsmdError(f"hsmd message of {len(msg)} bytes is too long")
    return struct.pack(">I", len(msg)) + msg


def frame_length(header: bytes) -> int:
    """The message length announced by a 4-byte frame header."""
    if len(header) != 4:
        raise HsmdError("hsmd frame header must be 4 bytes")
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME:
        raise HsmdError(f"hsmd announced a {length}-byte message, more than the "
                        f"{MAX_FRAME} allowed: it is not speaking the hsmd protocol")
    return length


def message_type(msg: bytes) -> int:
    """The 2-byte type of a message."""
    if len(msg) < 2:
        raise HsmdError("hsmd message shorter than its 2-byte type")
    return int.from_bytes(msg[:2], "big")


# --- BigSize and TLV streams ------------------------------------------------

def encode_bigsize(value: int) -> bytes:
    """BOLT 1 BigSize."""
    if value < 0xFD:
        return bytes([value])
    if value <= 0xFFFF:
        return b"\xfd" + struct.pack(">H", value)
    if value <= 0xFFFFFFFF:
        return b"\xfe" + struct.pack(">I", value)
    return b"\xff" + struct.pack(">Q", value)


def _decode_bigsize(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise HsmdError("truncated BigSize in hsmd TLV stream")
    first = data[pos]
    if first < 0xFD:
        return first, pos + 1
    size, minimum = {0xFD: (2, 0xFD), 0xFE: (4, 0x10000), 0xFF: (8, 0x100000000)}[first]
    if pos + 1 + size > len(data):
        raise HsmdError("truncated BigSize in hsmd TLV stream")
    value = int.from_bytes(data[pos + 1:pos + 1 + size], "big")
    if value < minimum:
        raise HsmdError("non-minimal BigSize in hsmd TLV stream")
    return value, pos + 1 + size


def encode_tlvs(records: list[tuple[int, bytes]]) -> bytes:
    """A TLV stream from ``(type, value)`` records, in ascending type order."""
    out = b""
    for tlv_type, value in sorted(records):
        out += encode_bigsize(tlv_type) + encode_bigsize(len(value)) + value
    return out


def decode_tlvs(data: bytes) -> dict[int, bytes]:
    """The records of a TLV stream; types must be strictly ascending."""
    records: dict[int, bytes] = {}
    pos, last = 0, -1
    while pos < len(data):
        tlv_type, pos = _decode_bigsize(data, pos)
        length, pos = _decode_bigsize(data, pos)
        if tlv_type <= last:
            raise HsmdError("hsmd TLV stream types are not in ascending order")
        if pos + length > len(data):
            raise HsmdError("truncated record in hsmd TLV stream")
        records[tlv_type] = data[pos:pos + length]
        pos += length
        last = tlv_type
    return records


# --- hsmd_init -------------------------------------------------------------

@dataclass(frozen=True)
class InitRequest:
    """A decoded ``hsmd_init``."""

    bip32_pubkey_version: int
    bip32_privkey_version: int
    chain_hash: bytes
    min_version: int
    max_version: int
    passphrase: str | None = field(default=None, repr=False)

    @property
    def network(self) -> Network | None:
        return network_by_chain_hash(self.chain_hash)


def encode_init(network_name: str, passphrase: str | None = None,
                min_version: int = MIN_VERSION, max_version: int = MAX_VERSION) -> bytes:
    """``hsmd_init`` as lightningd sends it for ``network_name``."""
    net = network(network_name)
    msg = struct.pack(">HII", MSG_INIT, net.bip32_pubkey_version, net.bip32_privkey_version)
    msg += net.chain_hash
    msg += bytes(5)  # hsm_encryption_key and the four dev_force_* fields: absent
    msg += struct.pack(">II", min_version, max_version)
    if passphrase is not None:
        raw = passphrase.encode("utf-8")
        if b"\0" in raw:
            raise HsmdError("the passphrase contains a NUL character, which the hsmd "
                            "protocol cannot carry")
        msg += encode_tlvs([(TLV_INIT_PASSPHRASE, raw + b"\0")])
    return msg


# Sizes of the optional fields of hsmd_init when present: hsm_encryption_key
# (secret), dev_force_privkey, dev_force_bip32_seed, dev_force_channel_secrets
# (struct secrets: 5 keys), dev_force_channel_secrets_shaseed.
_INIT_OPTIONAL_SIZES = (32, 32, 32, 5 * 32, 32)


def decode_init(msg: bytes) -> InitRequest:
    """Decode ``hsmd_init``; a present ``dev_force_*`` field is refused."""
    _expect_type(msg, MSG_INIT, "hsmd_init")
    if len(msg) < 2 + 8 + 32:
        raise HsmdError("truncated hsmd_init")
    pub_v, priv_v = struct.unpack(">II", msg[2:10])
    chain_hash = msg[10:42]
    pos = 42
    for index, size in enumerate(_INIT_OPTIONAL_SIZES):
        if pos >= len(msg) or msg[pos] not in (0, 1):
            raise HsmdError("malformed optional field in hsmd_init")
        present = msg[pos] == 1
        pos += 1
        if present:
            if index > 0:
                raise HsmdError("hsmd_init carries dev_force_* fields, which are not supported")
            pos += size
    if pos + 8 > len(msg):
        raise HsmdError("truncated hsmd_init")
    min_v, max_v = struct.unpack(">II", msg[pos:pos + 8])
    tlvs = decode_tlvs(msg[pos + 8:])
    passphrase = None
    if TLV_INIT_PASSPHRASE in tlvs:
        raw = tlvs[TLV_INIT_PASSPHRASE]
        if not raw.endswith(b"\0"):
            raise HsmdError("hsm_passphrase in hsmd_init is not NUL-terminated")
        passphrase = raw[:-1].split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return InitRequest(pub_v, priv_v, chain_hash, min_v, max_v, passphrase)


@dataclass(frozen=True)
class InitReply:
    """A decoded ``hsmd_init_reply_v4``."""

    hsm_version: int
    capabilities: tuple[int, ...]
    node_id: bytes
    bip32: bytes
    bolt12: bytes
    tlvs: dict[int, bytes] = field(default_factory=dict)


def encode_init_reply(reply: InitReply) -> bytes:
    """``hsmd_init_reply_v4``."""
    if len(reply.node_id) != 33 or len(reply.bip32) != EXT_KEY_LEN or len(reply.bolt12) != 33:
        raise HsmdError("hsmd_init_reply_v4 field of the wrong size")
    msg = struct.pack(">HIH", MSG_INIT_REPLY_V4, reply.hsm_version, len(reply.capabilities))
    msg += b"".join(struct.pack(">I", cap) for cap in reply.capabilities)
    msg += reply.node_id + reply.bip32 + reply.bolt12
    return msg + encode_tlvs(list(reply.tlvs.items()))


def decode_init_reply(msg: bytes) -> InitReply:
    """Decode ``hsmd_init_reply_v4``."""
    _expect_type(msg, MSG_INIT_REPLY_V4, "hsmd_init_reply_v4")
    if len(msg) < 8:
        raise HsmdError("truncated hsmd_init_reply_v4")
    version, count = struct.unpack(">IH", msg[2:8])
    pos = 8 + 4 * count
    end = pos + 33 + EXT_KEY_LEN + 33
    if len(msg) < end:
        raise HsmdError("truncated hsmd_init_reply_v4")
    caps = struct.unpack(f">{count}I", msg[8:pos])
    node_id = msg[pos:pos + 33]
    bip32 = msg[pos + 33:pos + 33 + EXT_KEY_LEN]
    bolt12 = msg[pos + 33 + EXT_KEY_LEN:end]
    return InitReply(version, tuple(caps), node_id, bip32, bolt12, decode_tlvs(msg[end:]))


# --- ECDH and sign_message ---------------------------------------------------

def encode_ecdh_req(point33: bytes) -> bytes:
    if len(point33) != 33:
        raise HsmdError("hsmd_ecdh_req point must be 33 bytes")
    return struct.pack(">H", MSG_ECDH_REQ) + point33


def decode_ecdh_req(msg: bytes) -> bytes:
    return _fixed(msg, MSG_ECDH_REQ, "hsmd_ecdh_req", 33)


def encode_ecdh_resp(secret32: bytes) -> bytes:
    if len(secret32) != 32:
        raise HsmdError("hsmd_ecdh_resp secret must be 32 bytes")
    return struct.pack(">H", MSG_ECDH_RESP) + secret32


def decode_ecdh_resp(msg: bytes) -> bytes:
    return _fixed(msg, MSG_ECDH_RESP, "hsmd_ecdh_resp", 32)


def encode_sign_message(message: bytes) -> bytes:
    if len(message) > 0xFFFF:
        raise HsmdError("a message to sign through hsmd is at most 65535 bytes")
    return struct.pack(">HH", MSG_SIGN_MESSAGE, len(message)) + message


def decode_sign_message(msg: bytes) -> bytes:
    _expect_type(msg, MSG_SIGN_MESSAGE, "hsmd_sign_message")
    if len(msg) < 4:
        raise HsmdError("truncated hsmd_sign_message")
    (length,) = struct.unpack(">H", msg[2:4])
    if len(msg) != 4 + length:
        raise HsmdError("hsmd_sign_message length does not match its content")
    return msg[4:]


def encode_sign_message_reply(signature64: bytes, recid: int) -> bytes:
    if len(signature64) != 64 or not 0 <= recid <= 3:
        raise HsmdError("hsmd_sign_message_reply needs 64 bytes r||s and a recovery id 0..3")
    return struct.pack(">H", MSG_SIGN_MESSAGE_REPLY) + signature64 + bytes([recid])


def decode_sign_message_reply(msg: bytes) -> tuple[bytes, int]:
    """``(r||s, recid)`` from ``hsmd_sign_message_reply``."""
    body = _fixed(msg, MSG_SIGN_MESSAGE_REPLY, "hsmd_sign_message_reply", 65)
    if body[64] > 3:
        raise HsmdError(f"hsmd_sign_message_reply has recovery id {body[64]} (expected 0..3)")
    return body[:64], body[64]


# --- status messages ----------------------------------------------------------

def encode_status_log(text: str, level: int = 1) -> bytes:
    """``status_log``: u8 level, absent peer, NUL-terminated text."""
    return struct.pack(">HBB", STATUS_LOG, level, 0) + text.encode("utf-8") + b"\0"


def encode_status_fail(text: str, reason: int = 2) -> bytes:
    """``status_fail``: u16 reason, NUL-terminated text."""
    return struct.pack(">HH", STATUS_FAIL, reason) + text.encode("utf-8") + b"\0"


def trailing_text(msg: bytes) -> str:
    """The printable text that ends ``msg`` (before its final NUL), or ''.

    Status and failure messages end with a NUL-terminated string; this reads it
    without depending on the exact fields before it.
    """
    body = msg[2:].rstrip(b"\0")
    start = len(body)
    while start > 0 and 0x20 <= body[start - 1] < 0x7F:
        start -= 1
    return body[start:].decode("ascii")


def _expect_type(msg: bytes, expected: int, name: str) -> None:
    got = message_type(msg)
    if got != expected:
        raise HsmdError(f"expected {name} (type {expected}), got message type {got}")


def _fixed(msg: bytes, expected: int, name: str, size: int) -> bytes:
    _expect_type(msg, expected, name)
    if len(msg) != 2 + size:
        raise HsmdError(f"{name} must carry {size} bytes, got {len(msg) - 2}")
    return msg[2:]
