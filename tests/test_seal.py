"""Sealing and the record chain: every kind of tampering is detected and named."""

from __future__ import annotations

import os

import coincurve
import pytest

from cldcb.core.dataversion import Kind, Tip, advance, decide
from cldcb.core.seal import (
    ChainVerifier,
    RecordSealer,
    SnapshotOpener,
    SnapshotSealer,
    decode_change,
    encode_change,
    item_hash,
)
from cldcb.errors import ChainError, SealError
from cldcb.node.nodekey import LocalNodeKey

PLAIN32 = "fe77a220dcb864fb843f0161a4a33f2a8844b89c7160476af9ebe196b6e9e0ed"
NODE = LocalNodeKey(bytes.fromhex(PLAIN32))
CLIENT = bytes(range(1, 33))
OTHER_CLIENT = bytes(range(2, 34))
ANCHOR = bytes([7]) * 32


def client_pub(priv: bytes) -> bytes:
    return coincurve.PrivateKey(priv).public_key.format()


def make_stream(calls: list[tuple[int, Kind]], client: bytes = CLIENT,
                snapshot_dv: int = 0) -> list[tuple[int, Kind, bytes, bytes]]:
    """Seal calls as the plugin would: links chosen by decide/advance from an anchor."""
    sealer = RecordSealer(NODE.pubkey, client, os.urandom(32))
    tip = Tip(snapshot_dv, Kind.NORMAL, ANCHOR, bytes(32), is_snapshot=True)
    out = []
    for i, (dv, kind) in enumerate(calls):
        d = decide(tip, dv, kind)
        assert d.link is not None
        sealed = sealer.seal_change(dv, kind, d.link, [f"INSERT INTO t VALUES ({i})"], 1000 + i)
        out.append((dv, kind, d.link, sealed))
        tip = advance(tip, dv, kind, item_hash(sealed), decision=d)
    return out


def verify(stream, client: bytes = CLIENT, snapshot_dv: int = 0) -> list[int]:
    v = ChainVerifier(NODE, client_pub(client), snapshot_dv, ANCHOR)
    return [v.open(*r)[0].data_version for r in stream]


CALLS = [(1, Kind.NORMAL), (1, Kind.PRAGMA), (2, Kind.NORMAL), (2, Kind.PRAGMA),
         (3, Kind.NORMAL), (4, Kind.NORMAL), (4, Kind.NORMAL), (5, Kind.NORMAL),
         (6, Kind.NORMAL)]


def test_chain_verifies_and_contents_round_trip() -> None:
    stream = make_stream(CALLS)
    assert verify(stream) == [dv for dv, _ in CALLS]
    v = ChainVerifier(NODE, client_pub(CLIENT), 0, ANCHOR)
    change, _ = v.open(*stream[0])
    assert change.writes == ("INSERT INTO t VALUES (0)",) and change.time_ms == 1000


def test_change_codec_round_trip_and_malformed() -> None:
    blob = encode_change(["a", "é" * 3, ""], 42)
    assert decode_change(blob) == (42, ("a", "ééé", ""))
    with pytest.raises(SealError):
        decode_change(blob[:-1])
    with pytest.raises(SealError):
        decode_change(blob + b"x")


@pytest.mark.parametrize("position", range(9))
def test_flipping_any_byte_is_detected_and_named(position: int) -> None:
    stream = make_stream(CALLS)
    dv, kind, link, sealed = stream[position]
    for offset in (0, 1, 20, 40, 45, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[offset] ^= 0x01
        tampered = list(stream)
        tampered[position] = (dv, kind, link, bytes(bad))
        with pytest.raises(ChainError) as err:
            verify(tampered)
        assert err.value.position == position
        assert f"record #{position}" in str(err.value)


def test_changing_the_clear_data_version_kind_or_link_is_detected() -> None:
    stream = make_stream(CALLS)
    dv, kind, link, sealed = stream[5]
    for bad in [(dv + 1, kind, link, sealed), (dv, Kind.PRAGMA, link, sealed),
                (dv, kind, bytes(32), sealed)]:
        with pytest.raises(ChainError) as err:
            verify(stream[:5] + [bad] + stream[6:])
        assert err.value.position == 5


def test_reordering_two_records_is_detected() -> None:
    stream = make_stream(CALLS)
    swapped = stream[:4] + [stream[5], stream[4]] + stream[6:]
    with pytest.raises(ChainError) as err:
        verify(swapped)
    assert err.value.position == 4


def test_dropping_a_middle_record_is_detected() -> None:
    stream = make_stream(CALLS)
    with pytest.raises(ChainError) as err:
        verify(stream[:4] + stream[5:])
    assert err.value.position == 4 and err.value.data_version == 4


def test_keeping_an_uncommitted_batch_while_dropping_its_replacement_is_detected() -> None:
    stream = make_stream(CALLS)
    # records 5 and 6 both carry data_version 4: 5 was never committed, 6 replaced it.
    assert stream[5][0] == stream[6][0] == 4
    with pytest.raises(ChainError) as err:
        verify(stream[:6] + stream[7:])
    assert err.value.position == 6 and err.value.data_version == 5


def test_moving_a_record_to_another_clients_stream_is_detected() -> None:
    mine = make_stream(CALLS)
    theirs = make_stream(CALLS, client=OTHER_CLIENT)
    spliced = mine[:3] + [theirs[3]] + mine[4:]
    with pytest.raises(ChainError) as err:
        verify(spliced)
    assert err.value.position == 3
    with pytest.raises(ChainError):
        verify(mine, client=OTHER_CLIENT)


def test_a_record_does_not_open_for_another_node() -> None:
    stream = make_stream(CALLS)
    other = LocalNodeKey(bytes([9]) * 32)
    v = ChainVerifier(other, client_pub(CLIENT), 0, ANCHOR)
    with pytest.raises(ChainError):
        v.open(*stream[0])


def test_a_record_not_continuing_the_snapshot_is_detected() -> None:
    stream = make_stream(CALLS)
    with pytest.raises(ChainError) as err:
        verify(stream[2:])  # starts at data_version 2 on a snapshot at 0
    assert err.value.position == 0


def test_snapshot_round_trip_and_tampering() -> None:
    data = [os.urandom(1000), os.urandom(10), b""]
    s = SnapshotSealer(NODE.pubkey, CLIENT, os.urandom(32), 41, ANCHOR)
    chunks = [s.seal_chunk(c) for c in data]
    manifest = s.seal_manifest(5)
    o = SnapshotOpener(NODE, client_pub(CLIENT), 41, manifest)
    assert o.manifest.anchor == ANCHOR and o.manifest.chunk_count == 3
    assert [o.open_chunk(i, c) for i, c in enumerate(chunks)] == data
    o.finish()
    # a missing last chunk
    o = SnapshotOpener(NODE, client_pub(CLIENT), 41, manifest)
    o.open_chunk(0, chunks[0])
    o.open_chunk(1, chunks[1])
    with pytest.raises(SealError, match="incomplete"):
        o.finish()
    # chunks swapped
    o = SnapshotOpener(NODE, client_pub(CLIENT), 41, manifest)
    with pytest.raises(SealError):
        o.open_chunk(0, chunks[1])
    # the manifest presented for another data_version
    with pytest.raises(SealError):
        SnapshotOpener(NODE, client_pub(CLIENT), 42, manifest)
    # a flipped byte in a chunk
    bad = bytearray(chunks[0])
    bad[-3] ^= 1
    o = SnapshotOpener(NODE, client_pub(CLIENT), 41, manifest)
    with pytest.raises(SealError, match="chunk 0"):
        o.open_chunk(0, bytes(bad))


def test_a_chunk_from_another_snapshot_of_the_same_state_is_refused() -> None:
    a = SnapshotSealer(NODE.pubkey, CLIENT, os.urandom(32), 41, ANCHOR)
    b = SnapshotSealer(NODE.pubkey, CLIENT, os.urandom(32), 41, ANCHOR)
    a_chunk, b_chunk = a.seal_chunk(b"A" * 10), b.seal_chunk(b"B" * 10)
    assert a_chunk != b_chunk
    o = SnapshotOpener(NODE, client_pub(CLIENT), 41, a.seal_manifest(1))
    with pytest.raises(SealError, match="another snapshot"):
        o.open_chunk(0, b_chunk)


def test_a_chunk_sealed_into_a_buffer_is_the_chunk_sealed() -> None:
    """``seal_chunk_into`` (the upload seals into the frame it sends) gives the bytes of
    ``seal_chunk`` under the same key and counter, and the manifest counts it."""
    import os

    from cldcb.core.ids import new_privkey, pubkey_of
    from cldcb.core.seal import OVERHEAD, SnapshotSealer

    node, client, eph = new_privkey(), new_privkey(), new_privkey()
    a = SnapshotSealer(pubkey_of(node), client, eph, 9, bytes(32))
    b = SnapshotSealer(pubkey_of(node), client, eph, 9, bytes(32))
    for data in (b"", os.urandom(1000), os.urandom(70000)):
        out = bytearray(3 + OVERHEAD + len(data))
        b.seal_chunk_into(memoryview(bytearray(data)), memoryview(out)[3:])
        assert bytes(out[3:]) == a.seal_chunk(data) and out[:3] == bytes(3)
    assert a.chunk_count == b.chunk_count == 3
    assert a.seal_manifest(5) == b.seal_manifest(5)
