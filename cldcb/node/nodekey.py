"""The node key, however it is held: the one interface the rest of cldcb uses.

Everything that needs the node's private key (unsealing, recognition entries,
recovery) takes a :class:`NodeKey`. Two implementations:

- :class:`LocalNodeKey`: the private key in this process, from ``hsm_secret``
  (any of the four formats) or given directly;
- :class:`cldcb.node.alt_hsmd.AltHsmdNodeKey`: an hsmd-like program holds the key
  and this process only asks it for ECDH and signatures.

ECDH is ``SHA256(compressed(k * P))`` as Core Lightning's hsmd and coincurve's
``PrivateKey.ecdh`` compute it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from coincurve import PrivateKey, PublicKey

from cldcb.core import hsm_secret
from cldcb.core.ids import check_privkey, node_id_from_pubkey
from cldcb.core.signmessage import SignedMessage, sign_message
from cldcb.errors import HsmSecretError, KeyFormatError


@runtime_checkable
class NodeKey(Protocol):
    """What cldcb may do with the node's key."""

    @property
    def node_id(self) -> str:
        """The node id, ``02…``/``03…``, lower case."""
        ...

    @property
    def pubkey(self) -> bytes:
        """The node's compressed public key (33 bytes)."""
        ...

    def ecdh(self, point33: bytes) -> bytes:
        """``SHA256(compressed(node_key * point))`` (32 bytes)."""
        ...

    def sign_message(self, message: str) -> SignedMessage:
        """A Lightning ``signmessage`` signature of ``message`` by the node."""
        ...


def parse_point(point33: bytes) -> PublicKey:
    """``point33`` as a coincurve public key, or a KeyFormatError."""
    if len(point33) != 33 or point33[0] not in (2, 3):
        raise KeyFormatError("ECDH needs a compressed public key (33 bytes, 02/03)")
    try:
        return PublicKey(bytes(point33))
    except ValueError as exc:
        raise KeyFormatError("ECDH point is not on secp256k1") from exc


def read_hsm_secret_file(path: Path | str) -> bytes:
    """The bytes of an ``hsm_secret`` file, with errors that say what to do."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise HsmSecretError(f"hsm_secret {path} does not exist: give the node's "
                             "hsm_secret with --hsm-secret") from None
    except IsADirectoryError:
        raise HsmSecretError(f"hsm_secret {path} is a folder: give the hsm_secret "
                             "file itself") from None
    except OSError as exc:
        raise HsmSecretError(f"cannot read hsm_secret {path}: {exc.strerror or exc}; "
                             "check its permissions (run as the node's user or root)") from None


def with_path(err: HsmSecretError, path: Path | str) -> HsmSecretError:
    """``err`` (same class) with the file it is about named at the end."""
    if str(path) in str(err):
        return err
    return type(err)(f"{err} (file {path})")


class LocalNodeKey:
    """The node's private key held in this process."""

    def __init__(self, privkey32: bytes) -> None:
        self._key = PrivateKey(check_privkey(privkey32))
        self._pubkey = self._key.public_key.format(compressed=True)

    @classmethod
    def from_hsm_secret(cls, path: Path | str, passphrase: str | None = None) -> LocalNodeKey:
        """The node key of the ``hsm_secret`` file at ``path``."""
        try:
            return cls(hsm_secret.node_key(read_hsm_secret_file(path), passphrase))
        except HsmSecretError as err:
            raise with_path(err, path) from None

    @classmethod
    def from_hsm_secret_bytes(cls, file_bytes: bytes,
                              passphrase: str | None = None) -> LocalNodeKey:
        """The node key of an ``hsm_secret`` given as bytes."""
        return cls(hsm_secret.node_key(file_bytes, passphrase))

    @property
    def node_id(self) -> str:
        return node_id_from_pubkey(self._pubkey)

    @property
    def pubkey(self) -> bytes:
        return self._pubkey

    def ecdh(self, point33: bytes) -> bytes:
        return self._key.ecdh(parse_point(point33).format(compressed=True))

    def sign_message(self, message: str) -> SignedMessage:
        return sign_message(self._key.secret, message)

    def __repr__(self) -> str:
        return f"LocalNodeKey(node_id={self.node_id})"
