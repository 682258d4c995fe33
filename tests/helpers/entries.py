"""Real recognition entries for tests (the server refuses anything else)."""

from __future__ import annotations

from cldcb.core.ids import new_privkey
from cldcb.core.recognition import make_recognition, message_for_client
from cldcb.node.nodekey import LocalNodeKey


def recognition_entry(node: LocalNodeKey, client_priv: bytes) -> bytes:
    """A fresh entry (a fresh ephemeral key each call) of ``client_priv`` for ``node``."""
    zbase = node.sign_message(message_for_client(client_priv, node.pubkey)).zbase
    return make_recognition(client_priv, node.pubkey, zbase, new_privkey()).encode()
