"""secp256k1 identities: node ids, client ids and server ids (DESIGN section 1).

All three are the 33-byte compressed public key written as 66 hex digits; they
differ only in the first hex digit, so that one can never be taken for another:

- node id:   ``02…`` / ``03…`` (the Lightning node id, unchanged)
- client id: ``c2…`` / ``c3…`` (the leading ``0`` replaced by ``c``)
- server id: ``52…`` / ``53…`` (the leading ``0`` replaced by ``5``)

Parsers accept upper or lower case and reject anything else (another prefix,
another length, a non-hex digit, a point not on the curve) with a
:class:`~cldcb.errors.KeyFormatError` that names the problem. Output is always
lower case. Nothing here does I/O.
"""

from __future__ import annotations

import secrets
import string

from coincurve import PrivateKey, PublicKey

from cldcb.errors import KeyFormatError

PUBKEY_LEN = 33
PRIVKEY_LEN = 32
ID_HEX_LEN = 2 * PUBKEY_LEN

# Order of the secp256k1 group: a private key is an integer in [1, N-1].
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_HEXDIGITS = frozenset(string.hexdigits)

# kind -> (first hex digit, name used in messages)
_KINDS: dict[str, tuple[str, str]] = {
    "node": ("0", "node id"),
    "client": ("c", "client id"),
    "server": ("5", "server id"),
}


def _check_pubkey(pub33: bytes) -> bytes:
    if not isinstance(pub33, bytes | bytearray) or len(pub33) != PUBKEY_LEN:
        raise KeyFormatError(f"a public key must be {PUBKEY_LEN} bytes (compressed)")
    if pub33[0] not in (2, 3):
        raise KeyFormatError("a public key must be compressed (first byte 02 or 03)")
    try:
        PublicKey(bytes(pub33))
    except ValueError as exc:
        raise KeyFormatError("the public key is not a point on secp256k1") from exc
    return bytes(pub33)


def _format(pub33: bytes, kind: str) -> str:
    digit, _ = _KINDS[kind]
    return digit + _check_pubkey(pub33).hex()[1:]


def client_id_from_pubkey(pub33: bytes) -> str:
    """The client id (``c2…``/``c3…``) of a compressed public key."""
    return _format(pub33, "client")


def server_id_from_pubkey(pub33: bytes) -> str:
    """The server id (``52…``/``53…``) of a compressed public key."""
    return _format(pub33, "server")


def node_id_from_pubkey(pub33: bytes) -> str:
    """The node id (``02…``/``03…``) of a compressed public key."""
    return _format(pub33, "node")


def _looks_like(text: str) -> str:
    """A hint naming the kind of id ``text`` looks like, or ''."""
    head = text[:2].lower()
    for digit, name in _KINDS.values():
        if head in (digit + "2", digit + "3"):
            return f" (that looks like a {name})"
    return ""


def _parse(text: str, kind: str, name: str | None = None) -> bytes:
    digit, kind_name = _KINDS[kind]
    name = name or kind_name
    if not isinstance(text, str):
        raise KeyFormatError(f"{name} must be a string of {ID_HEX_LEN} hex digits")
    if not text:
        raise KeyFormatError(f"{name} is empty: give {ID_HEX_LEN} hex digits "
                             f"starting with {digit}2 or {digit}3")
    low = text.lower()
    if low[:2] not in (digit + "2", digit + "3"):
        shown = text[:2] + ("…" if len(text) > 2 else "")
        raise KeyFormatError(f"{name} must start with {digit}2 or {digit}3, "
                             f"got {shown}{_looks_like(text)}")
    bad = next((i for i, ch in enumerate(text) if ch not in _HEXDIGITS), None)
    if bad is not None:
        raise KeyFormatError(f"{name} must be hex digits only, got {text[bad]!r} "
                             f"at position {bad + 1}")
    if len(text) != ID_HEX_LEN:
        raise KeyFormatError(f"{name} must be {ID_HEX_LEN} hex digits, got {len(text)}")
    pub33 = bytes.fromhex("0" + low[1:])
    try:
        PublicKey(pub33)
    except ValueError as exc:
        raise KeyFormatError(f"{name} {low[:8]}… is not a point on secp256k1: "
                             "check it for a typo") from exc
    return pub33


def parse_client_id(text: str) -> bytes:
    """The compressed public key of a client id ``c2…``/``c3…``."""
    return _parse(text, "client")


def parse_server_id(text: str) -> bytes:
    """The compressed public key of a server id ``52…``/``53…``."""
    return _parse(text, "server")


def parse_node_id(text: str) -> bytes:
    """The compressed public key of a node id ``02…``/``03…``."""
    return _parse(text, "node")


def parse_pubkey(text: str) -> bytes:
    """A compressed public key given as 66 hex digits (``02…``/``03…``)."""
    return _parse(text, "node", "public key")


def check_privkey(privkey32: bytes) -> bytes:
    """``privkey32`` as bytes if it is a valid secp256k1 private key."""
    if not isinstance(privkey32, bytes | bytearray) or len(privkey32) != PRIVKEY_LEN:
        raise KeyFormatError(f"a private key must be {PRIVKEY_LEN} bytes")
    if not 0 < int.from_bytes(privkey32, "big") < SECP256K1_N:
        raise KeyFormatError("the private key is out of range for secp256k1 "
                             "(zero or not below the group order)")
    return bytes(privkey32)


def pubkey_of(privkey32: bytes) -> bytes:
    """The compressed public key (33 bytes) of a private key."""
    return PrivateKey(check_privkey(privkey32)).public_key.format(compressed=True)


def new_privkey() -> bytes:
    """A fresh random secp256k1 private key from the OS's CSPRNG."""
    while True:
        candidate = secrets.token_bytes(PRIVKEY_LEN)
        if 0 < int.from_bytes(candidate, "big") < SECP256K1_N:
            return candidate
