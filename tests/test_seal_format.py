"""Record format 2: padded plaintext, ``replaces`` bound in the associated data; format 1
backups stay recoverable; tips compared across servers by hash (cldcb.client.tips)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.environment import DATA
from helpers.traces import expected_dump_bytes, sqlite_dump_bytes
from test_recover_core import CLIENT_PRIV, vector_node_key
from test_seal import ANCHOR, CLIENT, NODE, client_pub

from cldcb.client.tips import compare, unconfirmed
from cldcb.core import wire
from cldcb.core.dataversion import Action, Kind, Tip, advance, decide
from cldcb.core.ids import pubkey_of
from cldcb.core.seal import (
    MAX_PADDED,
    PAD_STEP,
    RECORD_OVERHEAD,
    ChainVerifier,
    RecordSealer,
    item_hash,
    replaced_hash,
)
from cldcb.errors import ChainError
from cldcb.node import restore


def body_size(sealed: bytes) -> int:
    """The size of a sealed record's ciphertext body (its padded plaintext)."""
    return len(sealed) - RECORD_OVERHEAD


def is_class(n: int) -> bool:
    """The size classes of the sealed docstring: powers of two from 256 up to 1 MiB,
    then multiples of 1 MiB up to 15 MiB."""
    if n <= PAD_STEP:
        return n >= 256 and n & (n - 1) == 0
    return n % PAD_STEP == 0 and n <= MAX_PADDED


def test_sealed_record_sizes_fall_in_the_padding_classes() -> None:
    sealer = RecordSealer(NODE.pubkey, CLIENT, os.urandom(32))
    seen: dict[int, set[int]] = {}
    for n in [0, 1, 100, 240, 241, 496, 497, 1013, 1024, 5000, 70_000, PAD_STEP - 20,
              PAD_STEP + 1, 3 * PAD_STEP + 7]:
        sealed = sealer.seal_change(7, Kind.NORMAL, bytes(32), ["x" * n], 1)
        assert is_class(body_size(sealed)), (n, body_size(sealed))
        assert body_size(sealed) >= n + 12 + 4
        seen.setdefault(body_size(sealed), set()).add(n)
    # different statements of sizes in one class are sealed to the same size
    assert seen[256] == {0, 1, 100, 240} and seen[512] == {241, 496} and seen[1024] == {497}
    assert seen[2048] == {1013, 1024}


def test_padding_never_passes_the_frame_limit() -> None:
    sealer = RecordSealer(NODE.pubkey, CLIENT, os.urandom(32))
    big = sealer.seal_change(7, Kind.NORMAL, bytes(32), ["y" * (MAX_PADDED - 100)], 1)
    assert body_size(big) == MAX_PADDED
    assert len(wire.write_frame(7, 0, bytes(32), big)) < wire.MAX_FRAME


def test_padding_is_authenticated_and_only_zero_bytes() -> None:
    sealer = RecordSealer(NODE.pubkey, CLIENT, os.urandom(32))
    tip = Tip(0, Kind.NORMAL, ANCHOR, bytes(32), is_snapshot=True)
    sealed = sealer.seal_change(1, Kind.NORMAL, ANCHOR, ["INSERT INTO t VALUES (1)"], 9)
    bad = bytearray(sealed)
    bad[-17] ^= 1                       # the last byte of the padding (before the tag)
    with pytest.raises(ChainError):
        ChainVerifier(NODE, client_pub(CLIENT), 0, ANCHOR).open(1, Kind.NORMAL, ANCHOR,
                                                                bytes(bad))
    change, decision = ChainVerifier(NODE, client_pub(CLIENT), 0, ANCHOR).open(
        1, Kind.NORMAL, ANCHOR, sealed)
    assert change.writes == ("INSERT INTO t VALUES (1)",) and decision.link == tip.hash


# --- replaces ------------------------------------------------------------------------------

@dataclass
class Chain:
    """A chain ... 2, X(3), Y(3) replacing X, sealed as the plugin does."""

    records: list[tuple[int, Kind, bytes, bytes]] = field(default_factory=list)

    @classmethod
    def make(cls) -> Chain:
        sealer = RecordSealer(NODE.pubkey, CLIENT, os.urandom(32))
        tip: Tip | None = Tip(0, Kind.NORMAL, ANCHOR, bytes(32), is_snapshot=True)
        chain = cls()
        for i, dv in enumerate([1, 2, 3, 3]):
            d = decide(tip, dv, Kind.NORMAL)
            assert d.link is not None
            sealed = sealer.seal_change(dv, Kind.NORMAL, d.link, [f"INSERT {i}"], i,
                                        replaced_hash(tip, d))
            chain.records.append((dv, Kind.NORMAL, d.link, sealed))
            tip = advance(tip, dv, Kind.NORMAL, item_hash(sealed), decision=d)
        assert d.action is Action.REPLACE
        return chain

    def verify(self, records: list[tuple[int, Kind, bytes, bytes]]) -> ChainVerifier:
        v = ChainVerifier(NODE, client_pub(CLIENT), 0, ANCHOR)
        for r in records:
            v.open(*r)
        return v

    @property
    def batch(self) -> bytes:
        return item_hash(self.records[2][3])


def test_a_replacement_names_the_batch_it_replaces() -> None:
    chain = Chain.make()
    full = chain.verify(chain.records)
    assert full.replaced == {chain.batch}
    # a server that holds the replacement but never got the batch: the replacement
    # follows record 2 as an append, and still names the batch
    without = chain.verify(chain.records[:2] + chain.records[3:])
    assert without.tip.hash == item_hash(chain.records[3][3])
    assert without.replaced == {chain.batch}
    # the chain that ends on the batch replaces nothing
    assert chain.verify(chain.records[:3]).replaced == set()


def test_replaces_cannot_be_altered_or_removed() -> None:
    chain = Chain.make()
    dv, kind, link, sealed = chain.records[3]
    for bad in (sealed[:42] + bytes(32) + sealed[74:],
                sealed[:42] + bytes([sealed[42] ^ 1]) + sealed[43:]):
        with pytest.raises(ChainError) as err:
            chain.verify(chain.records[:3] + [(dv, kind, link, bad)])
        assert err.value.position == 3


# --- format 1 ------------------------------------------------------------------------------

def v1_messages() -> list[wire.Message]:
    raw = json.loads((DATA / "cln-crash-restart.sealed-v1.json").read_text())["messages"]
    out: list[wire.Message] = []
    for m in raw:
        cls = getattr(wire, m.pop("type"))
        out.append(cls(**{k: bytes.fromhex(v) if isinstance(v, str) else v
                          for k, v in m.items()}))
    return out


async def _stream(msgs: list[wire.Message]) -> AsyncIterator[wire.Message]:
    for m in msgs:
        yield m


def test_a_backup_sealed_in_format_1_still_verifies_and_recovers(tmp_path: Path) -> None:
    msgs = v1_messages()
    records = [m for m in msgs if isinstance(m, wire.FetchRecord)]
    assert {r.sealed[0] for r in records} == {1}
    node = vector_node_key()
    result = asyncio.run(restore.rebuild_from(_stream(msgs), node, pubkey_of(CLIENT_PRIV),
                                              tmp_path / "out.sqlite3"))
    assert sqlite_dump_bytes(result.path) == expected_dump_bytes("cln-crash-restart")
    # format 1 has no replaces field, but the chain itself shows what its REPLACE dropped
    batch = next(r for i, r in enumerate(records) if r.data_version == 13
                 and records[i + 1].data_version == 13)
    assert result.replaced == {item_hash(batch.sealed)}
    bad = [m if m is not records[4] else wire.FetchRecord(
        m.data_version, m.kind, m.link, m.sealed[:-1] + bytes([m.sealed[-1] ^ 1]), m.time)
        for m in msgs]
    with pytest.raises(ChainError, match="record #4"):
        asyncio.run(restore.rebuild_from(_stream(bad), node, pubkey_of(CLIENT_PRIV),
                                         tmp_path / "bad.sqlite3"))


# --- tips compared across servers -----------------------------------------------------------

@dataclass(frozen=True)
class Ends:
    data_version: int
    tip: Tip | None
    replaced: frozenset[bytes] = frozenset()


def ends(dv: int, h: int, replaced: tuple[int, ...] = (), kind: Kind = Kind.NORMAL) -> Ends:
    return Ends(dv, Tip(dv, kind, bytes([h]) * 32, bytes(32)),
                frozenset(bytes([r]) * 32 for r in replaced))


def test_a_tip_that_another_servers_chain_replaced_never_wins() -> None:
    batch, replacement = ends(13, 1), ends(13, 2, replaced=(1,))
    for states in ([batch, replacement], [replacement, batch]):
        v = compare(states)
        assert [states[i] for i in v.winners] == [replacement] and not v.disagree
        assert [states[i] for i in v.superseded] == [batch]
    # it loses even when it is further ahead (a later record on top of a replaced batch)
    ahead = ends(14, 3)
    v = compare([ends(12, 4, replaced=(3,)), ahead])
    assert v.winners == [0] and v.superseded == {1: 0}


def test_same_data_version_different_tips_disagree_same_tip_agrees() -> None:
    v = compare([ends(13, 1), ends(13, 2), ends(12, 5)])
    assert v.disagree and v.winners == [0, 1]
    v = compare([ends(13, 1), ends(13, 1), ends(12, 5)])
    assert v.winners == [0] and v.same == {1: 0}
    v = compare([ends(13, 1), ends(14, 2)])
    assert v.winners == [1] and not v.disagree


def test_which_tips_cannot_be_known_committed() -> None:
    assert unconfirmed(ends(13, 1), [])
    assert unconfirmed(ends(13, 1), [ends(12, 5)])
    assert not unconfirmed(ends(13, 1), [ends(13, 1)])
    assert not unconfirmed(ends(13, 1, kind=Kind.PRAGMA), [])     # issued after a COMMIT
    snap = Ends(13, Tip(13, Kind.NORMAL, bytes(32), bytes(32), is_snapshot=True))
    assert not unconfirmed(snap, [])
