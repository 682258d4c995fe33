"""Recognition entries: how a node finds its own backup with ``hsm_secret`` alone.

At install time each client stores one entry on every server (DESIGN §6)::

    version (1) || client_pub (33) || u16 length || zbase signature (ASCII)
                || sealed client key (33 + 32 + 16)

- The signature is the node's ``signmessage`` signature over
  :func:`recognition_message`, a plain-ASCII text made from
  ``ECDH(client key, node key)``. Only the node and the client can compute
  that secret, so the server cannot recover the node id from the signature
  (public-key recovery needs the message).
- The client private key is sealed to the node: ephemeral key ``e``,
  ``k = HKDF-SHA256(ECDH(e, node), info = b"cldcb/1 recognition-key" || client_pub)``,
  ChaCha20-Poly1305 with a zero nonce (each key is used once) and
  ``client_pub`` as associated data; ``e·G || ciphertext`` is stored.

On recovery the node computes ECDH with each entry's client key, rebuilds the
message, and keeps the entries whose signature verifies against its own key;
then it unseals the client key and checks that it matches ``client_pub``.
Pure code: the ephemeral key is a parameter.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cldcb.errors import SealError
from cldcb.seal import EcdhKey
from cldcb.signmessage import verify_message

VERSION = 1
_SEALED_KEY_LEN = 33 + 32 + 16
_ZERO_NONCE = bytes(12)


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def recognition_message(shared: bytes) -> str:
    """The text the node signs, from ``ECDH(client, node)`` (plain ASCII)."""
    return "cldcb recognition v1 " + _hkdf(shared, b"cldcb/1 recognition").hex()


def message_for_client(client_priv: bytes, node_pub: bytes) -> str:
    """What the client asks the running node to ``signmessage`` (ECDH is symmetric)."""
    return recognition_message(coincurve.PrivateKey(client_priv).ecdh(node_pub))


@dataclass(frozen=True)
class Recognition:
    client_pub: bytes
    zbase: str
    sealed_key: bytes

    def encode(self) -> bytes:
        z = self.zbase.encode("ascii")
        return (bytes([VERSION]) + self.client_pub + struct.pack(">H", len(z)) + z
                + self.sealed_key)

    @classmethod
    def decode(cls, data: bytes) -> Recognition:
        try:
            if data[0] != VERSION:
                raise ValueError(f"version {data[0]}")
            client_pub = data[1:34]
            (n,) = struct.unpack_from(">H", data, 34)
            zbase = data[36:36 + n].decode("ascii")
            sealed = data[36 + n:]
            if len(client_pub) != 33 or len(zbase) != n or len(sealed) != _SEALED_KEY_LEN:
                raise ValueError("wrong length")
        except (IndexError, ValueError, struct.error, UnicodeDecodeError) as exc:
            raise SealError(f"a recognition entry is malformed ({exc})") from None
        return cls(client_pub, zbase, sealed)


def _key_aead(shared: bytes, client_pub: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_hkdf(shared, b"cldcb/1 recognition-key" + client_pub))


def make_recognition(client_priv: bytes, node_pub: bytes, zbase: str,
                     ephemeral_priv: bytes) -> Recognition:
    """Build the entry from the node's signature over :func:`message_for_client`."""
    client_pub = coincurve.PrivateKey(client_priv).public_key.format()
    if not verify_message(message_for_client(client_priv, node_pub), zbase, node_pub):
        raise SealError("the node's signature over the recognition message does not verify: "
                        "the node id given does not belong to the node that signed")
    eph = coincurve.PrivateKey(ephemeral_priv)
    ct = _key_aead(eph.ecdh(node_pub), client_pub).encrypt(_ZERO_NONCE, client_priv, client_pub)
    return Recognition(client_pub, zbase, eph.public_key.format() + ct)


def is_own(entry: Recognition, node: EcdhKey) -> bool:
    """Whether ``entry`` was made for this node (its signature verifies)."""
    try:
        message = recognition_message(node.ecdh(entry.client_pub))
    except Exception:  # a client_pub that is no point: not ours
        return False
    return verify_message(message, entry.zbase, node.pubkey)


def unseal_client_key(entry: Recognition, node: EcdhKey) -> bytes:
    """The client private key of one of our own entries."""
    epub, ct = entry.sealed_key[:33], entry.sealed_key[33:]
    try:
        priv = _key_aead(node.ecdh(epub), entry.client_pub).decrypt(
            _ZERO_NONCE, ct, entry.client_pub)
    except (InvalidTag, ValueError):
        raise SealError("a recognition entry's sealed client key does not open") from None
    if coincurve.PrivateKey(priv).public_key.format() != entry.client_pub:
        raise SealError("a recognition entry's sealed key is not its client's key")
    return priv


def find_own(entries: Iterable[bytes], node: EcdhKey) -> list[tuple[Recognition, bytes]]:
    """Entries made for this node, each with its unsealed client private key.

    Malformed entries and other nodes' entries are skipped (a server holds
    many nodes' entries).
    """
    found = []
    seen: set[bytes] = set()
    for raw in entries:
        try:
            entry = Recognition.decode(raw)
        except SealError:
            continue
        if entry.client_pub in seen or not is_own(entry, node):
            continue
        try:
            found.append((entry, unseal_client_key(entry, node)))
            seen.add(entry.client_pub)
        except SealError:
            continue
    return found
