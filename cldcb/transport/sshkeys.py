"""SSH keys made from cldcb's secp256k1 keys.

- On the standalone daemon, the SSH host key **is** the server key and the
  client's SSH key **is** its client key (``ecdsa-sha2-1.3.132.0.10``, i.e.
  secp256k1, which asyncssh speaks): a client pins the host key from the
  ``5…`` id alone.
- OpenSSH and paramiko do not know secp256k1. For servers behind sshd the
  client uses an Ed25519 key derived from its client secret::

      seed = HKDF-SHA256(client_priv, salt none, info b"cldcb/1 ssh-ed25519")

  so there is nothing extra to store; :func:`authorized_keys_line` prints what
  the server's operator pastes into the ``cldcb`` account.
"""

from __future__ import annotations

import asyncssh
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECP256K1_SSH_ALG = "ecdsa-sha2-1.3.132.0.10"


def secp256k1_ssh_key(priv: bytes) -> asyncssh.SSHKey:
    """An asyncssh private key for a raw 32-byte secp256k1 secret."""
    key = ec.derive_private_key(int.from_bytes(priv, "big"), ec.SECP256K1())
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    return asyncssh.import_private_key(pem)


def secp256k1_ssh_public_key(pub: bytes) -> asyncssh.SSHKey:
    """An asyncssh public key for a 33-byte compressed secp256k1 point."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), pub)
    pem = key.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    return asyncssh.import_public_key(pem)


def compressed_point(key: asyncssh.SSHKey) -> bytes | None:
    """The 33-byte point of a secp256k1 SSH public key, None for any other kind."""
    if key.get_algorithm() != SECP256K1_SSH_ALG:
        return None
    pem = key.export_public_key("pkcs8-pem")
    pub = ser.load_pem_public_key(pem)
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return None
    return pub.public_bytes(ser.Encoding.X962, ser.PublicFormat.CompressedPoint)


def _ed25519_seed(client_priv: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"cldcb/1 ssh-ed25519").derive(client_priv)


def derived_ed25519(client_priv: bytes) -> ed25519.Ed25519PrivateKey:
    """The client's Ed25519 SSH key for servers behind OpenSSH (cryptography object)."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(_ed25519_seed(client_priv))


def derived_ssh_key(client_priv: bytes) -> asyncssh.SSHKey:
    """The same key for asyncssh."""
    pem = derived_ed25519(client_priv).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    return asyncssh.import_private_key(pem)


def derived_public_line(client_priv: bytes, comment: str = "") -> str:
    """``ssh-ed25519 AAAA… [comment]`` of the derived key."""
    pub = derived_ed25519(client_priv).public_key().public_bytes(
        ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode("ascii")
    return f"{pub} {comment}".rstrip()


def authorized_keys_line(client_priv: bytes, client_id: str,
                         server_command: str = "cldcb-server") -> str:
    """The ``authorized_keys`` line pinning this client's derived key to its id."""
    return (f'restrict,command="{server_command} stdio --client {client_id}" '
            + derived_public_line(client_priv, f"cldcb-{client_id[:12]}"))
