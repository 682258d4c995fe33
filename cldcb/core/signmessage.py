"""Lightning ``signmessage`` / ``checkmessage``, byte for byte as Core Lightning.

The signed digest is ``SHA256(SHA256(b"Lightning Signed Message:" + message))``;
the signature is a recoverable ECDSA signature (RFC 6979 nonces, low S: what
libsecp256k1 produces, so results are deterministic) and its text form is
zbase32 of ``bytes([31 + recid]) + r + s`` (104 characters).

lightningd signs the message text exactly as it appears inside the JSON string
it received, without unescaping, so a message meant to be signed by a running
node as well as here must be plain ASCII without ``"`` or ``\\``
(:func:`is_rpc_safe`). Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from coincurve import PrivateKey, PublicKey

from cldcb.core.ids import check_privkey
from cldcb.errors import KeyFormatError

MESSAGE_PREFIX = b"Lightning Signed Message:"
ZBASE32_ALPHABET = "ybndrfg8ejkmcpqxot1uwisza345h769"
_ZBASE32_VALUES = {ch: i for i, ch in enumerate(ZBASE32_ALPHABET)}
SIGNATURE_ZBASE_LEN = 104  # 65 bytes = 520 bits = 104 five-bit digits


@dataclass(frozen=True)
class SignedMessage:
    """A ``signmessage`` result: ``signature`` is r||s (64 bytes), ``recid`` 0..3."""

    signature: bytes
    recid: int
    zbase: str

    @classmethod
    def from_compact(cls, signature: bytes, recid: int) -> SignedMessage:
        """Build from r||s and the recovery id (what hsmd's sign_message_reply holds)."""
        if len(signature) != 64 or not 0 <= recid <= 3:
            raise KeyFormatError("a recoverable signature is 64 bytes r||s and a "
                                 "recovery id 0..3")
        return cls(bytes(signature), recid, zbase32_encode(bytes([31 + recid]) + signature))


def message_digest(message: str | bytes) -> bytes:
    """``SHA256(SHA256(prefix + message))``: what the node signs."""
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    return hashlib.sha256(hashlib.sha256(MESSAGE_PREFIX + data).digest()).digest()


def is_rpc_safe(message: str) -> bool:
    """True if lightningd's ``signmessage`` RPC signs ``message`` as given here.

    That is printable ASCII (and space) without ``"`` or ``\\``.
    """
    return all(" " <= ch <= "~" and ch not in '"\\' for ch in message)


def zbase32_encode(data: bytes) -> str:
    """zbase32 of ``data``, most significant bit first, zero-padded at the end."""
    bits = int.from_bytes(data, "big") if data else 0
    nbits = 8 * len(data)
    ndigits = (nbits + 4) // 5
    bits <<= 5 * ndigits - nbits
    return "".join(ZBASE32_ALPHABET[(bits >> (5 * (ndigits - 1 - i))) & 31]
                   for i in range(ndigits))


def zbase32_decode(text: str) -> bytes:
    """Inverse of :func:`zbase32_encode`; rejects unknown digits and non-zero padding."""
    value = 0
    for pos, ch in enumerate(text.lower()):
        digit = _ZBASE32_VALUES.get(ch)
        if digit is None:
            raise KeyFormatError(f"signature is not zbase32: {ch!r} at position {pos + 1}")
        value = (value << 5) | digit
    nbits = 5 * len(text)
    nbytes = nbits // 8
    extra = nbits - 8 * nbytes
    if value & ((1 << extra) - 1):
        raise KeyFormatError("signature is not canonical zbase32 (non-zero padding bits)")
    return (value >> extra).to_bytes(nbytes, "big")


def sign_message(privkey32: bytes, message: str) -> SignedMessage:
    """Sign ``message`` (UTF-8) with the node's private key, as ``signmessage`` does."""
    key = PrivateKey(check_privkey(privkey32))
    rsr = key.sign_recoverable(message_digest(message), hasher=None)
    return SignedMessage.from_compact(rsr[:64], rsr[64])


def _decode_signature(zbase: str) -> tuple[bytes, int]:
    if len(zbase) != SIGNATURE_ZBASE_LEN:
        raise KeyFormatError(f"signature must be {SIGNATURE_ZBASE_LEN} zbase32 "
                             f"characters, got {len(zbase)}")
    raw = zbase32_decode(zbase)
    header = raw[0]
    if not 27 <= header <= 34:
        raise KeyFormatError(f"signature header byte {header} is not a recovery id "
                             "(expected 31..34)")
    return raw[1:], (header - 27) & 3


def recover_pubkey(message: str, zbase: str) -> bytes:
    """The compressed public key (33 bytes) that signed ``message`` as ``zbase``."""
    signature, recid = _decode_signature(zbase)
    try:
        pub = PublicKey.from_signature_and_message(
            signature + bytes([recid]), message_digest(message), hasher=None)
    except ValueError as exc:
        raise KeyFormatError("signature does not recover to any public key: "
                             "it is damaged") from exc
    return pub.format(compressed=True)


def verify_message(message: str, zbase: str, pubkey33: bytes) -> bool:
    """True if ``zbase`` is a signature of ``message`` by ``pubkey33``.

    A malformed signature is simply not valid: this returns False, it never raises
    for bad input from a peer.
    """
    try:
        return recover_pubkey(message, zbase) == bytes(pubkey33)
    except KeyFormatError:
        return False
