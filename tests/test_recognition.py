"""Recognition entries: the node finds its own among many; the server learns nothing."""

from __future__ import annotations

import os
import struct

import pytest
from helpers.entries import recognition_entry

from cldcb.core.ids import pubkey_of
from cldcb.core.recognition import Recognition, find_own, make_recognition, message_for_client
from cldcb.core.signmessage import SIGNATURE_ZBASE_LEN, recover_pubkey, zbase32_encode
from cldcb.errors import SealError
from cldcb.node.nodekey import LocalNodeKey

PLAIN32 = "fe77a220dcb864fb843f0161a4a33f2a8844b89c7160476af9ebe196b6e9e0ed"
NODE = LocalNodeKey(bytes.fromhex(PLAIN32))
OTHER_NODE = LocalNodeKey(bytes([3]) * 32)


entry_for = recognition_entry


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
    # the message is made from ECDH(client, node): another client's message differs
    assert message != message_for_client(os.urandom(32), NODE.pubkey)


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


def signatures_in(raw: bytes) -> set[str]:
    """Every signature a reader of ``raw`` could try: each run of 104 ASCII characters
    (a zbase32 signature in clear) and each run of 65 bytes (a compact one)."""
    found = {raw[i:i + SIGNATURE_ZBASE_LEN].decode("ascii", "replace")
             for i in range(len(raw) - SIGNATURE_ZBASE_LEN + 1)}
    return found | {zbase32_encode(raw[i:i + 65]) for i in range(len(raw) - 64)}


def test_an_entry_with_its_message_known_does_not_reveal_the_node_id() -> None:
    """The message passes through lightningd's signmessage (logged at debug levels):
    even with it, no signature in the entry recovers to the node id."""
    client = os.urandom(32)
    message = message_for_client(client, NODE.pubkey)
    raw = entry_for(NODE, client)
    zbase = NODE.sign_message(message).zbase
    recovered = set()
    for candidate in signatures_in(raw):
        try:
            recovered.add(recover_pubkey(message, candidate))
        except Exception:  # noqa: BLE001 - not a signature at all
            continue
    assert NODE.pubkey not in recovered
    assert zbase not in raw.decode("latin-1")
    assert [p for _, p in find_own([raw], NODE)] == [client]


def test_an_old_format_entry_still_recovers() -> None:
    """Entries stored before the signature was sealed (version 1: the zbase signature
    in clear) are still found and opened, so existing backups recover."""
    client = os.urandom(32)
    new = Recognition.decode(entry_for(NODE, client))
    zbase = NODE.sign_message(message_for_client(client, NODE.pubkey)).zbase.encode()
    old = (b"\x01" + new.client_pub + struct.pack(">H", len(zbase)) + zbase
           + new.sealed_key)
    found = find_own([old, entry_for(OTHER_NODE, os.urandom(32))], NODE)
    assert [(e.client_pub, p) for e, p in found] == [(pubkey_of(client), client)]
    assert find_own([old], OTHER_NODE) == []


def test_a_signature_sealed_for_another_client_is_skipped() -> None:
    """The sealed signature is bound to its entry: moved into another client's entry
    (whose sealed key is intact) it does not open, so that entry is not ours."""
    a, b = (Recognition.decode(entry_for(NODE, os.urandom(32))) for _ in range(2))
    spliced = Recognition(b.client_pub, b.sealed_key, a.signature, a.version).encode()
    assert find_own([spliced], NODE) == []
