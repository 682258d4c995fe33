"""Recognition entries: the node finds its own among many; the server learns nothing."""

from __future__ import annotations

import os

import pytest

from cldcb.errors import SealError
from cldcb.ids import pubkey_of
from cldcb.nodekey import LocalNodeKey
from cldcb.recognition import Recognition, find_own, make_recognition, message_for_client
from cldcb.signmessage import recover_pubkey

PLAIN32 = "fe77a220dcb864fb843f0161a4a33f2a8844b89c7160476af9ebe196b6e9e0ed"
NODE = LocalNodeKey(bytes.fromhex(PLAIN32))
OTHER_NODE = LocalNodeKey(bytes([3]) * 32)


def entry_for(node: LocalNodeKey, client: bytes) -> bytes:
    message = message_for_client(client, node.pubkey)
    zbase = node.sign_message(message).zbase
    return make_recognition(client, node.pubkey, zbase, os.urandom(32)).encode()


def test_the_node_finds_its_own_entries_among_others() -> None:
    mine = [os.urandom(32) for _ in range(2)]
    theirs = [os.urandom(32) for _ in range(5)]
    entries = [entry_for(OTHER_NODE, c) for c in theirs[:3]] + [entry_for(NODE, mine[0])]
    entries += [b"garbage", entry_for(OTHER_NODE, theirs[3]), entry_for(NODE, mine[1])]
    found = find_own(entries, NODE)
    assert sorted(priv for _, priv in found) == sorted(mine)
    assert all(e.client_pub == pubkey_of(p) for e, p in found)
    assert len(find_own(entries, OTHER_NODE)) == 4


def test_message_is_plain_ascii_and_hides_the_node_id() -> None:
    client = os.urandom(32)
    message = message_for_client(client, NODE.pubkey)
    assert message.isascii() and '"' not in message and "\\" not in message
    entry = Recognition.decode(entry_for(NODE, client))
    # Without the ECDH secret the server cannot rebuild the message; with a
    # guessed message, public-key recovery gives some unrelated key.
    assert recover_pubkey("cldcb recognition v1 " + "00" * 32, entry.zbase) != NODE.pubkey


def test_a_signature_by_another_node_is_refused_at_install() -> None:
    client = os.urandom(32)
    zbase = OTHER_NODE.sign_message(message_for_client(client, NODE.pubkey)).zbase
    with pytest.raises(SealError, match="does not verify"):
        make_recognition(client, NODE.pubkey, zbase, os.urandom(32))


def test_a_tampered_sealed_key_is_skipped() -> None:
    client = os.urandom(32)
    raw = bytearray(entry_for(NODE, client))
    raw[-1] ^= 1
    assert find_own([bytes(raw)], NODE) == []
    with pytest.raises(SealError):
        Recognition.decode(bytes(raw[:-1]))
