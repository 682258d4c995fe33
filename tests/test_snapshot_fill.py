"""A blocking snapshot's copy is filled while it is uploaded (cldcb.plugin.snapshot.start_copy).

What must hold: the upload starts before the copy is whole; the copy's bytes are the
database's at the data_version read first, because the copy keeps lightningd's database
still (SHARED lock) until its last byte; a fill that fails fails its readers and lets go
of the database.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from pathlib import Path

import pytest
from test_plugin_units import CLIENT, NODE, FakeTarget, make_db

import cldcb.plugin.snapshot as snapshot_module
from cldcb.core import wire
from cldcb.core.ids import pubkey_of
from cldcb.core.seal import SnapshotOpener
from cldcb.errors import PluginError
from cldcb.node.nodekey import LocalNodeKey
from cldcb.plugin.snapshot import start_copy, upload_snapshot

PATIENCE = 20.0


def pending_call(db: Path, dv: int, rows: int = 100) -> sqlite3.Connection:
    """A database at ``dv`` and lightningd's open transaction of the next call."""
    con = make_db(db, dv, rows)
    con.execute("PRAGMA busy_timeout = 0")
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (x'00')")
    con.execute(f"UPDATE vars SET intval = {dv + 1}")
    return con


def test_a_filling_copy_holds_the_database_still_until_it_is_whole(tmp_path: Path) -> None:
    db = tmp_path / "lightningd.sqlite3"
    con = pending_call(db, 41)
    copy = start_copy(db, tmp_path)
    assert copy.filling is not None and copy.data_version == 41
    assert copy.size == db.stat().st_size
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        con.execute("COMMIT")            # lightningd cannot commit under the copy
    copy.fill()
    copy.wait_ready()
    con.execute("COMMIT")                # the fill let go of the database
    c = sqlite3.connect(copy.path)
    assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 100
    assert c.execute("SELECT intval FROM vars").fetchone()[0] == 41
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c.close()
    copy.hook_done()
    assert not copy.path.exists()


class GatedTarget(FakeTarget):
    """Records whether the copy was whole when chunk 0 went out, and lets the fill go on."""

    def __init__(self, sent_first: threading.Event, whole: threading.Event) -> None:
        super().__init__()
        self.sent_first, self.whole = sent_first, whole
        self.whole_at_first: bool | None = None

    async def send_chunk(self, snapshot_id: int, index: int, sealed: bytes) -> wire.ChunkAck:
        if index == 0:
            self.whole_at_first = self.whole.is_set()
            self.sent_first.set()
        return await super().send_chunk(snapshot_id, index, sealed)


def test_the_upload_of_a_filling_copy_starts_before_the_copy_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fill stops after its first piece until chunk 0 was sent: an upload that waited
    for the whole copy would never send it (the fill then gives up after PATIENCE)."""
    monkeypatch.setattr(snapshot_module, "FILL_PIECE", 16384)
    db = tmp_path / "lightningd.sqlite3"
    con = pending_call(db, 41, rows=300)
    copy = start_copy(db, tmp_path)
    assert copy.filling is not None and copy.size > 4 * 16384
    sent_first, whole = threading.Event(), threading.Event()
    advance = copy.filling._advance

    def gated(copied: int) -> None:
        advance(copied)
        if not sent_first.wait(PATIENCE):
            raise OSError(errno.ETIMEDOUT, "chunk 0 was not sent while the copy was filling")

    copy.filling._advance = gated  # type: ignore[method-assign]
    target = GatedTarget(sent_first, whole)

    def fill() -> None:
        copy.fill()
        whole.set()

    filler = threading.Thread(target=fill)
    filler.start()
    try:
        asyncio.run(upload_snapshot(target, copy, node_pub=pubkey_of(NODE),
                                    client_priv=CLIENT, chunk_size=4096, window=3))
    finally:
        sent_first.set()
        filler.join(PATIENCE)
    assert target.whole_at_first is False and whole.is_set()
    assert target.end is not None
    opener = SnapshotOpener(LocalNodeKey(NODE), pubkey_of(CLIENT), 41, target.end[2])
    got = b"".join(opener.open_chunk(i, target.chunks[i]) for i in range(target.end[1]))
    opener.finish()
    assert got == copy.path.read_bytes()
    con.execute("ROLLBACK")
    c = sqlite3.connect(copy.path)
    assert c.execute("SELECT count(*), max(intval) FROM t, vars").fetchone() == (300, 41)
    c.close()


@pytest.mark.parametrize("broken", ["copy_file_range", "both"])
def test_a_fill_falls_back_to_plain_reads_or_fails_its_readers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """Where copy_file_range does not work the same bytes are copied by hand; if that fails
    too, the fill and every reader raise PluginError, and the database is let go."""
    db = tmp_path / "lightningd.sqlite3"
    con = pending_call(db, 7)
    copy = start_copy(db, tmp_path)

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device copy refused")

    def eio(*args: object) -> bytes:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(snapshot_module.os, "copy_file_range", refuse)
    if broken == "both":
        monkeypatch.setattr(snapshot_module.os, "pread", eio)
        with pytest.raises(PluginError, match="input/output error"):
            copy.fill()
        with pytest.raises(PluginError, match="copying the database failed"):
            copy.wait_ready(1)
    else:
        copy.fill()
        copy.wait_ready()
        monkeypatch.undo()
        c = sqlite3.connect(copy.path)
        assert c.execute("SELECT intval FROM vars").fetchone()[0] == 7
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        c.close()
    con.execute("COMMIT")                 # let go either way


def test_a_fill_that_fails_fails_the_blocking_call(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The first contact's copy cannot be read (neither copied nor read in place): the
    call is answered with a failure (so lightningd stops without committing), no snapshot
    is complete anywhere, and the database is let go."""
    from test_plugin_engine import FakeServer, Node, make_engine

    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device copy refused")

    def eio(*args: object) -> bytes:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(snapshot_module.os, "copy_file_range", refuse)
    monkeypatch.setattr(snapshot_module.os, "pread", eio)
    monkeypatch.setattr(snapshot_module.os, "preadv", eio)

    async def go() -> None:
        eng = make_engine(tmp_path, [s], outage=60)
        eng.start()
        dv, writes = node.change()
        result = await asyncio.wait_for(eng.db_write(dv, writes), PATIENCE)
        assert not result.ok and "input/output error" in result.message
        node.commit()                       # the copy let go of the database
        await eng.close()

    asyncio.run(go())
    assert s.tip is None and not s.snapshots
