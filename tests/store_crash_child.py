"""A plugin stand-in for store tests, and the workload the crash tests kill.

Imported by ``tests/test_store*.py`` for :class:`Writer` and :func:`verify`.
Run as ``python tests/store_crash_child.py DATA_DIR`` it drives a store through
every kind of step (registration, recognition entries, records, replacements,
PRAGMA records, fresh and anchored snapshots, pruning, segment rolls, a torn
tail and an abandoned upload repaired at reopen, removal, last-seen) and prints
one JSON line per step **after** the store returned, flushing each: what a
test may then demand to find after a crash.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import coincurve
from helpers.entries import recognition_entry

from cldcb.core.dataversion import Kind, Tip, advance, decide
from cldcb.core.seal import (
    ChainVerifier,
    RecordSealer,
    SnapshotOpener,
    SnapshotSealer,
    item_hash,
)
from cldcb.node.nodekey import LocalNodeKey
from cldcb.store import ClientStore, SnapshotNeeded, Store, Stored

NODE_PRIV = hashlib.sha256(b"cldcb test node").digest()
CLIENT_PRIV = hashlib.sha256(b"cldcb test client").digest()
OTHER_PRIV = hashlib.sha256(b"cldcb test client 2").digest()
NODE = LocalNodeKey(NODE_PRIV)
ZERO = bytes(32)


def client_pub(priv: bytes = CLIENT_PRIV) -> bytes:
    return coincurve.PrivateKey(priv).public_key.format()


def client_id(priv: bytes = CLIENT_PRIV) -> str:
    return "c" + client_pub(priv).hex()[1:]


@dataclass
class Writer:
    """Seals changes and snapshots like the plugin and sends them to one ClientStore."""

    cs: ClientStore
    seed: int = 1
    tip: Tip | None = None
    clock: int = 1_700_000_000_000
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.sealer = RecordSealer(NODE.pubkey, CLIENT_PRIV, self._eph())
        self.tip = self.cs.status().tip

    def _eph(self) -> bytes:
        return hashlib.sha256(self.rng.randbytes(32)).digest()

    def now(self) -> int:
        self.clock += 7
        return self.clock

    def seal(self, dv: int, kind: Kind = Kind.NORMAL, size: int = 60,
             link: bytes | None = None) -> tuple[bytes, bytes]:
        """``(link, sealed)`` of a change at ``dv`` chained onto the writer's tip."""
        if link is None:
            d = decide(self.tip, dv, kind)
            link = d.link if d.link is not None else ZERO
        sql = f"UPDATE t SET v='{'x' * size}' WHERE dv={dv};" if kind == Kind.NORMAL \
            else "PRAGMA foreign_keys = ON;"
        return link, self.sealer.seal_change(dv, kind, link, [sql], self.clock)

    def send(self, dv: int, kind: Kind, link: bytes,
             sealed: bytes) -> Stored | SnapshotNeeded:
        res = self.cs.append(dv, int(kind), link, sealed, self.now())
        if isinstance(res, Stored):
            self.tip = advance(self.tip, dv, kind, item_hash(sealed))
        return res

    def change(self, dv: int, kind: Kind = Kind.NORMAL,
               size: int = 60) -> Stored | SnapshotNeeded:
        return self.send(dv, kind, *self.seal(dv, kind, size))

    def new_anchor(self, dv: int, anchored: bool) -> bytes:
        if anchored:
            assert self.tip is not None and self.tip.data_version == dv
            return self.tip.hash
        return self.rng.randbytes(32)

    def upload(self, dv: int, anchor: bytes, *, anchored: bool, chunks: int = 3,
               chunk_size: int = 200) -> None:
        s = SnapshotSealer(NODE.pubkey, CLIENT_PRIV, self._eph(), dv, anchor)
        up = self.cs.begin_snapshot(dv, anchor, self.now())
        for i in range(chunks):
            up.add_chunk(i, s.seal_chunk(snapshot_bytes(dv, i, chunk_size)))
        up.commit(s.chunk_count, s.seal_manifest(self.clock), self.now())
        if not anchored:
            self.tip = Tip(dv, Kind.NORMAL, anchor, ZERO, is_snapshot=True)

    def snapshot(self, dv: int, *, anchored: bool = False, chunks: int = 3,
                 chunk_size: int = 200) -> bytes:
        """Upload a snapshot of state ``dv``: anchored to the tip, or fresh; its anchor."""
        anchor = self.new_anchor(dv, anchored)
        self.upload(dv, anchor, anchored=anchored, chunks=chunks, chunk_size=chunk_size)
        return anchor


def snapshot_bytes(dv: int, index: int, size: int) -> bytes:
    return (f"db@{dv}#{index}:".encode() * size)[:size]


@dataclass
class Fetched:
    snapshot_dv: int
    anchor: bytes
    records: list[tuple[int, bytes]]      # (data_version, hash) in fetch order
    tip: Tip


def verify(cs: ClientStore, at: int = -1) -> Fetched | None:
    """Fetch and check everything: snapshot chunks open and match, the chain verifies."""
    plan = cs.fetch(at)
    if plan is None:
        return None
    snap = plan.snapshot
    opener = SnapshotOpener(NODE, client_pub(), snap.data_version, snap.manifest)
    assert opener.manifest.anchor == snap.anchor
    for c in plan.chunks():
        data = opener.open_chunk(c.index, c.sealed)
        assert data == snapshot_bytes(snap.data_version, c.index, len(data))
    opener.finish()
    chain = ChainVerifier(NODE, client_pub(), snap.data_version, snap.anchor)
    records = []
    for r in plan.records():
        chain.open(r.data_version, Kind(r.kind), r.link, r.sealed)
        records.append((r.data_version, item_hash(r.sealed)))
    plan.close()
    return Fetched(snap.data_version, snap.anchor, records, chain.tip)


# --- the crash workload -------------------------------------------------------------

def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def ack(w: Writer, dv: int, kind: Kind = Kind.NORMAL, size: int = 60) -> None:
    link, sealed = w.seal(dv, kind, size)
    emit(ev="begin", op="record", tip=item_hash(sealed).hex())
    res = w.send(dv, kind, link, sealed)
    assert isinstance(res, Stored), res
    emit(ev="record", dv=dv, hash=item_hash(sealed).hex())


def snap(w: Writer, dv: int, anchored: bool) -> None:
    anchor = w.new_anchor(dv, anchored)
    assert w.tip is not None or not anchored
    emit(ev="begin", op="snapshot", tip=(w.tip.hash if anchored and w.tip else anchor).hex())
    w.upload(dv, anchor, anchored=anchored)
    emit(ev="snapshot", dv=dv, anchor=anchor.hex(), anchored=anchored)


def step(op: str, **info: object) -> None:
    emit(ev="begin", op=op, **info)


def workload(data_dir: Path) -> None:
    store = Store.open(data_dir, segment_bytes=1500)
    cid, other = client_id(), client_id(OTHER_PRIV)
    step("added", client=cid)
    store.add_client(cid, generations=2)
    emit(ev="added", client=cid)
    first = recognition_entry(NODE, CLIENT_PRIV).hex()
    step("recognition", entry=first)
    store.put_recognition(cid, bytes.fromhex(first))
    emit(ev="recognition", entry=first)
    w = Writer(store.client(cid))
    w.cs.touch(w.now())
    emit(ev="touch")
    snap(w, 10, anchored=False)                         # first contact
    for dv in range(11, 16):
        ack(w, dv)
    ack(w, 15, Kind.PRAGMA)                             # PRAGMA-only at the same dv
    ack(w, 16)
    ack(w, 16)                                          # replacement of an uncommitted batch
    snap(w, 16, anchored=True)                          # compaction: prunes nothing yet
    for dv in range(17, 24):
        ack(w, dv, size=150)                            # rolls segments
    snap(w, 40, anchored=False)                         # a gap: fresh, prunes generation 1
    for dv in range(41, 45):
        ack(w, dv)
    second = recognition_entry(NODE, CLIENT_PRIV).hex()
    step("recognition", entry=second)
    store.put_recognition(cid, bytes.fromhex(second))
    emit(ev="recognition", entry=second)
    step("added", client=other)
    store.add_client(other, quota=10_000)
    emit(ev="added", client=other)
    step("settings", client=other)
    store.change_settings(other, quota=20_000)
    emit(ev="settings", client=other)
    store.put_recognition(other, recognition_entry(NODE, OTHER_PRIV))
    emit(ev="recognition_other")
    step("removed", client=other)
    store.remove_client(other)
    emit(ev="removed", client=other)
    up = w.cs.begin_snapshot(44, w.tip.hash if w.tip else ZERO, w.now())
    up.add_chunk(0, b"abandoned chunk")
    up.abort()
    emit(ev="aborted")
    # leave debris for the reopen to clean: an abandoned upload and a torn tail
    store.close()
    (data_dir / "clients" / cid / "snapshots" / "upload-debris.part").write_bytes(b"junk")
    newest = max((data_dir / "clients" / cid / "log").glob("*.log"))
    with open(newest, "ab") as f:
        f.write(b"cbR1\x00\x00\x01\x00torn")
    emit(ev="debris")
    store = Store.open(data_dir, segment_bytes=1500)
    w = Writer(store.client(cid), seed=2)
    emit(ev="reopened")
    for dv in range(45, 48):
        ack(w, dv)
    snap(w, 47, anchored=True)                          # prunes generation 2
    ack(w, 48)
    emit(ev="done")


if __name__ == "__main__":
    workload(Path(sys.argv[1]))
