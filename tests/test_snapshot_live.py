"""The blocking snapshot reads lightningd's database in place; at most one local copy.

While the first contact's hook call is pending, lightningd cannot commit and the
SHARED lock the snapshot holds keeps the file's bytes still, so the upload reads the
database file itself. A local copy is written only for what outlives the call (the
mirror, a server beyond the quorum still uploading), and the mirror takes that copy's
file (a rename), never copies it again.

In process, against the engine's fake servers (tests/test_plugin_engine.py), on real
SQLite files; every snapshot a fake server receives is unsealed and compared with the
database's bytes at the snapshot's data_version.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from helpers.traces import sqlite_dump
from test_plugin_engine import CLIENT, NODE, FakeConn, FakeServer, Node, make_engine

import cldcb.plugin.mirror as mirror_module
from cldcb.core import wire
from cldcb.core.ids import pubkey_of
from cldcb.core.seal import SnapshotOpener
from cldcb.node.nodedb import COPY_PREFIX
from cldcb.node.nodekey import LocalNodeKey
from cldcb.plugin.engine import Engine
from cldcb.plugin.mirror import MIRROR_NAME

PATIENCE = 30.0
CHUNK = 4096


class Recording:
    """What the fake servers receive of each snapshot (chunks by server name), what the
    node's folder holds whenever a chunk is sent, and a gate per server."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.chunks: dict[str, dict[int, bytes]] = {}
        self.ends: dict[str, tuple[int, bytes]] = {}
        self.seen: set[str] = set()
        self.gates: dict[str, asyncio.Event] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        send, end = FakeConn.send_chunk, FakeConn.end_snapshot
        rec = self

        async def send_chunk(conn: FakeConn, snapshot_id: int, index: int,
                             sealed: bytes) -> wire.ChunkAck:
            gate = rec.gates.get(conn.s.name)
            if gate is not None:
                await gate.wait()
            rec.seen.update(os.listdir(rec.folder))
            rec.chunks.setdefault(conn.s.name, {})[index] = bytes(sealed)
            return await send(conn, snapshot_id, index, sealed)

        async def end_snapshot(conn: FakeConn, snapshot_id: int, count: int,
                               manifest: bytes) -> wire.SnapshotAck:
            rec.ends[conn.s.name] = (count, manifest)
            return await end(conn, snapshot_id, count, manifest)

        monkeypatch.setattr(FakeConn, "send_chunk", send_chunk)
        monkeypatch.setattr(FakeConn, "end_snapshot", end_snapshot)

    def snapshot_bytes(self, name: str, data_version: int) -> bytes:
        count, manifest = self.ends[name]
        opener = SnapshotOpener(LocalNodeKey(NODE), pubkey_of(CLIENT), data_version, manifest)
        got = b"".join(opener.open_chunk(i, self.chunks[name][i]) for i in range(count))
        opener.finish()
        return got

    def copies_seen(self) -> list[str]:
        return sorted(n for n in self.seen if n.startswith(COPY_PREFIX))


def big_node(path: Path, rows: int = 200) -> Node:
    node = Node(path)
    node.con.execute("CREATE TABLE t (x BLOB)")
    node.con.execute("BEGIN")
    for _ in range(rows):
        node.con.execute("INSERT INTO t VALUES (?)", (os.urandom(1000),))
    node.con.execute("COMMIT")
    return node


def insert(node: Node, size: int) -> tuple[int, list[str]]:
    """The node's next batch: a row of ``size`` random bytes, then the data_version."""
    row = f"INSERT INTO t VALUES (x'{os.urandom(size).hex()}')"
    dv, writes = node.change(row)
    node.con.execute(row)                       # (Node.change runs only the update)
    return dv, writes


async def committed(eng: Engine, node: Node, size: int) -> None:
    """One call of the node (a row of ``size`` bytes), answered ``continue``, committed."""
    dv, writes = insert(node, size)
    result = await asyncio.wait_for(eng.db_write(dv, writes), PATIENCE)
    assert result.ok, result.message
    node.commit()


async def mirror_follows(eng: Engine, node: Node) -> None:
    mirror = eng.mirror
    assert mirror is not None
    await until(lambda: mirror.data_version == node.dv, "the mirror to follow the node")


def copies_left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(COPY_PREFIX))


async def until(cond: object, what: str) -> None:
    """Wait (bounded) for ``cond()`` to hold: a state the engine reaches on its own."""
    async with asyncio.timeout(PATIENCE):
        while not cond():                       # type: ignore[operator]
            await asyncio.sleep(0.01)
    assert cond(), what                         # type: ignore[operator]


def test_the_blocking_snapshot_with_the_mirror_off_writes_no_local_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One server, quorum 1, no mirror: nothing outlives the call, so no copy file ever
    exists in the node's folder; the snapshot is exactly the database's bytes at its
    data_version, and the database is let go before the call is answered."""
    rec = Recording(tmp_path)
    rec.install(monkeypatch)
    node = big_node(tmp_path / "lightningd.sqlite3")
    before = node.path.read_bytes()             # the state the pending call leaves on disk
    s = FakeServer("a")

    async def go() -> None:
        eng = make_engine(tmp_path, [s], chunk_size=CHUNK)
        eng.start()
        dv, writes = node.change()
        result = await asyncio.wait_for(eng.db_write(dv, writes), PATIENCE)
        assert result.ok, result.message
        node.commit()                           # (raises if the lock were still held)
        await eng.close()

    asyncio.run(go())
    assert rec.chunks["a"], "the snapshot was sent"
    assert rec.copies_seen() == [] and copies_left(tmp_path) == []
    assert rec.snapshot_bytes("a", 0) == before


def test_the_mirror_takes_the_blocking_snapshots_copy_without_copying_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mirror on: the one copy written under the lock becomes the mirror's file (renamed,
    not copied), and the mirror then equals the live database (``sqlite3 .dump``)."""
    rec = Recording(tmp_path)
    rec.install(monkeypatch)
    copied: list[str] = []
    real_copyfile = mirror_module.shutil.copyfile

    def copyfile(src: object, dst: object) -> object:
        copied.append(str(src))
        return real_copyfile(src, dst)           # type: ignore[arg-type]

    monkeypatch.setattr(mirror_module.shutil, "copyfile", copyfile)
    node = big_node(tmp_path / "lightningd.sqlite3")
    before = node.path.read_bytes()
    s = FakeServer("a")
    mirror_path = tmp_path / MIRROR_NAME

    async def go() -> None:
        eng = make_engine(tmp_path, [s], chunk_size=CHUNK, mirror_path=mirror_path)
        eng.start()
        for _ in range(3):
            await committed(eng, node, 8)
        await mirror_follows(eng, node)
        await eng.close()

    asyncio.run(go())
    assert rec.snapshot_bytes("a", 0) == before
    assert copied == [], "the mirror copied the snapshot's copy again"
    assert len(rec.copies_seen()) <= 1 and copies_left(tmp_path) == []
    assert sqlite_dump(mirror_path) == sqlite_dump(node.path)


@pytest.mark.parametrize("mirror", [False, True])
def test_a_server_beyond_the_quorum_still_gets_the_exact_snapshot_after_the_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: bool) -> None:
    """Two servers, quorum 1; server b sends nothing until the call was answered and
    lightningd committed more changes: b's snapshot is still exactly the database at the
    snapshot's data_version (read from the copy that outlives the call), and with the
    mirror on, the mirror takes that copy only once b is done with it."""
    rec = Recording(tmp_path)
    rec.install(monkeypatch)
    node = big_node(tmp_path / "lightningd.sqlite3")
    before = node.path.read_bytes()
    a, b = FakeServer("a"), FakeServer("b")
    mirror_path = tmp_path / MIRROR_NAME if mirror else None

    async def go() -> None:
        gate = rec.gates["b"] = asyncio.Event()
        eng = make_engine(tmp_path, [a, b], quorum=1, chunk_size=CHUNK,
                          mirror_path=mirror_path)
        eng.start()
        for i in range(3):
            await committed(eng, node, 900)
            if i == 0:
                assert not b.snapshots and "b" not in rec.chunks
        gate.set()
        await until(lambda: bool(b.snapshots), "server b's snapshot")
        if eng.mirror is not None:
            await mirror_follows(eng, node)
        await eng.close()

    asyncio.run(go())
    assert b.snapshots[0][0] == 0
    assert rec.snapshot_bytes("b", 0) == before == rec.snapshot_bytes("a", 0)
    assert copies_left(tmp_path) == []
    assert len(rec.copies_seen()) == 1
    if mirror_path is not None:
        assert sqlite_dump(mirror_path) == sqlite_dump(node.path)
