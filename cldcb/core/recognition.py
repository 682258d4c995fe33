"""Recognition entries: how a node finds its own backup with ``hsm_secret`` alone.

At install time each client stores one entry on every server (DESIGN §6). An
entry is exactly :data:`ENTRY_LEN` (196) bytes::

    version (1, = 2) || client_pub (33) || sealed client key (33 + 32 + 16)
                     || sealed signature (65 + 16)

- The signature is the node's ``signmessage`` signature over
  :func:`recognition_message`, a plain-ASCII text made from
  ``ECDH(client key, node key)``. The message passes through lightningd's
  ``signmessage`` RPC, which can log its parameters at debug levels; with the
  message, a signature yields the node id by public-key recovery. So the entry
  never holds the signature in clear: it is sealed under
  ``HKDF-SHA256(ECDH(client, node), info = b"cldcb/1 recognition-signature" ||
  client_pub || e·G)`` (``e·G`` the sealed client key's ephemeral key, fresh for
  every entry, so no key seals twice), ChaCha20-Poly1305 with a zero nonce and
  ``version || client_pub || sealed client key`` as associated data; the
  plaintext is the 65-byte compact signature (recovery id, r, s). Only the
  node and the client can compute that key: the entry reveals nothing about
  the node even to someone who knows the message.
- The client private key is sealed to the node: ephemeral key ``e``,
  ``k = HKDF-SHA256(ECDH(e, node), info = b"cldcb/1 recognition-key" || client_pub)``,
  ChaCha20-Poly1305 with a zero nonce (each key is used once) and
  ``client_pub`` as associated data; ``e·G || ciphertext`` is stored.

An entry stored by an older client (version 1) holds the signature in clear::

    version (1, = 1) || client_pub (33) || u16 length || zbase signature (ASCII)
                     || sealed client key (33 + 32 + 16)

Recovery still reads it (existing backups must recover); a server no longer
accepts one on put (:func:`check_put`).

The server checks an entry on put (:func:`check_put`): the current version, the
exact length, and ``client_pub`` being the key of the session's own client. It
cannot check the sealed parts: only the node can open them.

On recovery the node computes ECDH with each entry's client key, opens the
signature, rebuilds the message, and keeps the entries whose signature verifies
against its own key (one ECDH per entry: the node does only ECDH with the
client's *public* key, so an HSM can do it); then it unseals the client key and
checks that it matches ``client_pub``. Pure code: the ephemeral key is a
parameter.
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

from cldcb.core.ids import client_id_from_pubkey
from cldcb.core.seal import EcdhKey
from cldcb.core.signmessage import verify_message, zbase32_decode, zbase32_encode
from cldcb.errors import SealError

VERSION = 2
OLD_VERSION = 1
_PUB_LEN = 33
_SIG_LEN = 65
_TAG_LEN = 16
_SEALED_KEY_LEN = _PUB_LEN + 32 + _TAG_LEN
_SEALED_SIG_LEN = _SIG_LEN + _TAG_LEN
ENTRY_LEN = 1 + _PUB_LEN + _SEALED_KEY_LEN + _SEALED_SIG_LEN
"""The length of every entry of the current version."""
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
    """One entry. ``signature``: the sealed signature (version 2), or the zbase
    signature's ASCII bytes (version 1)."""

    client_pub: bytes
    sealed_key: bytes
    signature: bytes
    version: int = VERSION

    def _sealed_head(self) -> bytes:
        return bytes([VERSION]) + self.client_pub + self.sealed_key

    def encode(self) -> bytes:
        if self.version == OLD_VERSION:
            return (bytes([OLD_VERSION]) + self.client_pub
                    + struct.pack(">H", len(self.signature)) + self.signature
                    + self.sealed_key)
        return self._sealed_head() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> Recognition:
        try:
            if not data or data[0] not in (VERSION, OLD_VERSION):
                raise ValueError(f"unknown version {data[0] if data else 'none'}")
            client_pub = data[1:34]
            if data[0] == VERSION:
                if len(data) != ENTRY_LEN:
                    raise ValueError(f"{len(data)} bytes, not {ENTRY_LEN}")
                return cls(client_pub, data[34:34 + _SEALED_KEY_LEN],
                           data[34 + _SEALED_KEY_LEN:])
            (n,) = struct.unpack_from(">H", data, 34)
            zbase = data[36:36 + n]
            zbase.decode("ascii")
            sealed = data[36 + n:]
            if len(client_pub) != 33 or len(zbase) != n or len(sealed) != _SEALED_KEY_LEN:
                raise ValueError("wrong length")
        except (IndexError, ValueError, struct.error) as exc:
            raise SealError(f"a recognition entry is malformed ({exc})") from None
        return cls(client_pub, sealed, zbase, OLD_VERSION)


def check_put(data: bytes, client_pub: bytes) -> Recognition:
    """The entry a server may store for the client whose key is ``client_pub``: of the
    current version and length, and naming that client. SealError says why not."""
    entry = Recognition.decode(data)
    if entry.version != VERSION:
        raise SealError(f"a recognition entry of version {entry.version} (an older "
                        "client's, its signature in clear) is no longer accepted; update "
                        "cldcb on the node and run installplugin again")
    if entry.client_pub != client_pub:
        raise SealError(f"the recognition entry is not of client "
                        f"{client_id_from_pubkey(client_pub)}, the session's own client "
                        "(an entry is stored only by the client it names)")
    return entry


def _key_aead(shared: bytes, client_pub: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_hkdf(shared, b"cldcb/1 recognition-key" + client_pub))


def _signature_aead(shared: bytes, client_pub: bytes, sealed_key: bytes) -> ChaCha20Poly1305:
    """The key of the sealed signature, from ``ECDH(client, node)``."""
    return ChaCha20Poly1305(_hkdf(shared, b"cldcb/1 recognition-signature" + client_pub
                                  + sealed_key[:_PUB_LEN]))


def make_recognition(client_priv: bytes, node_pub: bytes, zbase: str,
                     ephemeral_priv: bytes) -> Recognition:
    """Build the entry from the node's signature over :func:`message_for_client`."""
    client = coincurve.PrivateKey(client_priv)
    client_pub = client.public_key.format()
    shared = client.ecdh(node_pub)
    if not verify_message(recognition_message(shared), zbase, node_pub):
        raise SealError("the node's signature over the recognition message does not verify: "
                        "the node id given does not belong to the node that signed")
    eph = coincurve.PrivateKey(ephemeral_priv)
    ct = _key_aead(eph.ecdh(node_pub), client_pub).encrypt(_ZERO_NONCE, client_priv, client_pub)
    unsigned = Recognition(client_pub, eph.public_key.format() + ct, b"")
    sealed_sig = _signature_aead(shared, client_pub, unsigned.sealed_key).encrypt(
        _ZERO_NONCE, zbase32_decode(zbase), unsigned._sealed_head())
    return Recognition(client_pub, unsigned.sealed_key, sealed_sig)


def _signature(entry: Recognition, shared: bytes) -> str | None:
    """The zbase signature of ``entry``, opened with ``ECDH(client, node)``; None if it
    does not open (another node's entry)."""
    if entry.version == OLD_VERSION:
        return entry.signature.decode("ascii")
    try:
        sig = _signature_aead(shared, entry.client_pub, entry.sealed_key).decrypt(
            _ZERO_NONCE, entry.signature, entry._sealed_head())
    except (InvalidTag, ValueError):
        return None
    return zbase32_encode(sig)


def is_own(entry: Recognition, node: EcdhKey) -> bool:
    """Whether ``entry`` was made for this node (its signature opens and verifies)."""
    try:
        shared = node.ecdh(entry.client_pub)
    except Exception:  # a client_pub that is no point: not ours
        return False
    zbase = _signature(entry, shared)
    return zbase is not None and verify_message(recognition_message(shared), zbase,
                                                node.pubkey)


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
