"""The backup engine against in-memory fake servers (unit tests only: the must-show
tests in test_plugin_e2e.py / test_plugin_faults.py use the real server).

The fake keeps a chain the way the real store does: a write that does not continue
it is answered NeedSnapshot; a snapshot anchored at a record it holds leaves the tip
alone, any other anchor becomes the tip.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cldcb.core import wire
from cldcb.core.dataversion import Action, Kind, Tip, decide
from cldcb.core.ids import client_id_from_pubkey, new_privkey, node_id_from_pubkey, pubkey_of
from cldcb.core.ids import server_id_from_pubkey as sid
from cldcb.core.seal import ZERO_HASH, item_hash
from cldcb.errors import TransportError
from cldcb.plugin import links
from cldcb.plugin.engine import Engine
from cldcb.plugin.wrapper import ServerEntry, WrapperConfig

CLIENT = new_privkey()
NODE = new_privkey()


class FakeServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tip: Tip | None = None
        self.hashes: set[bytes] = set()
        self.records: list[tuple[int, Kind, bytes]] = []
        self.snapshots: list[tuple[int, bytes]] = []
        self.up = True
        self.want_snapshot = False
        self.conns: list[FakeConn] = []
        self.write_delay = 0.0
        self.lie_chunk_index = False      # answer each chunk with the next one's index
        self.chunk_times: list[float] = []
        self.uploads = 0

    def drop(self) -> None:
        for c in self.conns:
            c.closed = True
        self.conns.clear()


class FakeConn:
    def __init__(self, server: FakeServer) -> None:
        self.s = server
        self.closed = False
        self._snap: tuple[int, bytes] | None = None
        self._pending: asyncio.Future[None] | None = None

    @property
    def is_closed(self) -> bool:
        return self.closed

    def _check(self) -> None:
        if self.closed or not self.s.up:
            self.closed = True
            raise TransportError(f"{self.s.name}: connection lost")

    async def status(self) -> wire.Status:
        self._check()
        t = self.s.tip
        return wire.Status(t is not None, t.data_version if t else 0, int(t.kind) if t else 0,
                           t.hash if t else ZERO_HASH,
                           (ZERO_HASH if t.is_snapshot else t.link) if t else ZERO_HASH,
                           0, -1, 0, 0, 0, False, self.s.want_snapshot, 2)

    async def write(self, dv: int, kind: int, link: bytes,
                    sealed: bytes) -> wire.Ack | wire.NeedSnapshot:
        self._check()
        if self.s.write_delay:
            await asyncio.sleep(self.s.write_delay)
            self._check()
        d = decide(self.s.tip, dv, Kind(kind))
        if d.action is Action.SNAPSHOT or d.link != link:
            return wire.NeedSnapshot(dv, d.reason)
        h = item_hash(sealed)
        self.s.tip = Tip(dv, Kind(kind), h, link)
        self.s.hashes.add(h)
        self.s.records.append((dv, Kind(kind), h))
        return wire.Ack(dv, kind, link, self.s.want_snapshot)

    def write_nowait(self, dv: int, kind: int, link: bytes, sealed: bytes,
                     done: Callable[[object], None]) -> None:
        """The callback form: answers come later, in order, like the real connection's."""
        self._check()
        prev = self._pending

        async def answer() -> None:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            try:
                res: object = await self.write(dv, kind, link, sealed)
            except TransportError as exc:
                res = exc
            done(res)

        self._pending = asyncio.ensure_future(answer())

    async def begin_snapshot(self, snapshot_id: int, dv: int, anchor: bytes) -> None:
        self._check()
        self._snap = (dv, anchor)
        self.s.uploads += 1

    async def send_chunk(self, snapshot_id: int, index: int, sealed: bytes) -> wire.ChunkAck:
        self._check()
        self.s.chunk_times.append(time.monotonic())
        return wire.ChunkAck(snapshot_id, index + self.s.lie_chunk_index)

    async def send_chunk_frame(self, frame: bytearray) -> wire.ChunkAck:
        """A chunk sealed into its frame: taken apart, then as ``send_chunk``."""
        (msg,) = wire.FrameDecoder().feed(bytes(frame))
        assert isinstance(msg, wire.SnapshotChunk)
        return await self.send_chunk(msg.snapshot_id, msg.index, msg.sealed)

    async def end_snapshot(self, snapshot_id: int, count: int,
                           manifest: bytes) -> wire.SnapshotAck:
        self._check()
        assert self._snap is not None
        dv, anchor = self._snap
        self.s.snapshots.append((dv, anchor))
        self.s.want_snapshot = False
        if anchor not in self.s.hashes:
            self.s.tip = Tip(dv, Kind.NORMAL, anchor, ZERO_HASH, is_snapshot=True)
        return wire.SnapshotAck(snapshot_id, dv)

    def abort(self, exc: Exception) -> None:
        self.closed = True

    async def close(self) -> None:
        self.closed = True


class Node:
    """A database the way lightningd holds it during a hook call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute("CREATE TABLE vars (name TEXT PRIMARY KEY, intval INTEGER)")
        self.con.execute("INSERT INTO vars VALUES ('data_version', 0)")
        self.dv = 0

    def change(self, extra: str = "") -> tuple[int, list[str]]:
        """Open the next batch (left pending until commit())."""
        self.con.execute("BEGIN")
        w = [f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' "
             f"AND intval = {self.dv}"]
        for s in w:
            self.con.execute(s)
        return self.dv + 1, ([extra] if extra else []) + w

    def commit(self) -> None:
        self.con.execute("COMMIT")
        self.dv += 1

    def rollback(self) -> None:
        self.con.execute("ROLLBACK")


def make_engine(tmp: Path, servers: list[FakeServer], quorum: int | None = None,
                outage: float = 5.0, **kw: object) -> Engine:
    entries = tuple(ServerEntry(f"127.0.0.{i + 1}:29735", sid(pubkey_of(new_privkey())))
                    for i in range(len(servers)))
    by_addr = dict(zip((e.address for e in entries), servers, strict=True))
    cfg = WrapperConfig(client_id=client_id_from_pubkey(pubkey_of(CLIENT)), client_priv=CLIENT,
                        node_id=node_id_from_pubkey(pubkey_of(NODE)), servers=entries,
                        quorum=quorum, outage_limit=outage, plugin_path="/x/cldcb-plugin")

    async def connect(entry: ServerEntry) -> FakeConn:
        s = by_addr[entry.address]
        if not s.up:
            raise TransportError(f"{s.name}: connection refused")
        c = FakeConn(s)
        s.conns.append(c)
        return c

    return Engine(cfg, tmp, connect, startup_grace=0.2, **kw)  # type: ignore[arg-type]


async def step(engine: Engine, node: Node, commit: bool = True) -> bool:
    dv, writes = node.change()
    result = await asyncio.wait_for(engine.db_write(dv, writes), 30)
    if result.ok and commit:
        node.commit()
    else:
        node.rollback()
    return result.ok


def test_first_contact_snapshots_then_appends_and_a_restart_continues(tmp_path: Path) -> None:
    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")

    async def first() -> None:
        eng = make_engine(tmp_path, [s])
        eng.start()
        for _ in range(5):
            assert await step(eng, node)
        await eng.close()

    asyncio.run(first())
    assert s.snapshots[0][0] == 0 and s.tip is not None and s.tip.data_version == 5
    assert [r[0] for r in s.records] == [1, 2, 3, 4, 5]

    async def second() -> None:
        eng = make_engine(tmp_path, [s])
        eng.start()
        assert await step(eng, node)
        await eng.close()

    asyncio.run(second())
    assert len(s.snapshots) == 1 and s.tip is not None and s.tip.data_version == 6
    assert not list(tmp_path.glob(".cldcb-snapshot-*"))


def test_an_uncommitted_batch_is_replaced(tmp_path: Path) -> None:
    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")

    async def go() -> None:
        eng = make_engine(tmp_path, [s])
        eng.start()
        assert await step(eng, node)
        assert await step(eng, node, commit=False)     # lightningd died before COMMIT
        await eng.close()
        eng = make_engine(tmp_path, [s])
        eng.start()
        assert await step(eng, node)                   # the same data_version again
        await eng.close()

    asyncio.run(go())
    assert [r[0] for r in s.records] == [1, 2, 2] and len(s.snapshots) == 1


def test_quorum_all_waits_and_fails_after_the_outage_limit(tmp_path: Path) -> None:
    a, b = FakeServer("a"), FakeServer("b")
    node = Node(tmp_path / "lightningd.sqlite3")

    async def go() -> None:
        eng = make_engine(tmp_path, [a, b], outage=0.5)
        eng.start()
        assert await step(eng, node)
        b.up = False
        b.drop()
        result = await eng.db_write(*node.change())
        node.rollback()
        assert not result.ok and "not held by 2 server(s)" in result.message
        b.up = True
        assert await step(eng, node)
        await eng.close()

    asyncio.run(go())
    assert a.tip == b.tip and a.tip is not None and a.tip.data_version == 2


def test_a_silent_server_fails_a_hot_call_at_the_outage_limit(tmp_path: Path) -> None:
    """A server that takes a record and never answers: the hot-path call is handed to the
    general path after HOT_PATIENCE and fails at the outage limit, counted from its start
    (also after a run of calls that kept the one patience timer re-arming)."""
    a = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")
    hot_calls = 0

    async def go() -> float:
        nonlocal hot_calls
        eng = make_engine(tmp_path, [a], outage=1.5)
        real_now = eng.db_write_now

        def counting(*args: object, **kw: object) -> bool:
            nonlocal hot_calls
            taken = real_now(*args, **kw)  # type: ignore[arg-type]
            hot_calls += taken
            return taken

        eng.db_write_now = counting  # type: ignore[method-assign]
        eng.start()
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.3                  # past the patience timer's first round
        while loop.time() < until:
            assert await step(eng, node)
            await asyncio.sleep(0.01)
        a.write_delay = 3600
        started = loop.time()
        result = await asyncio.wait_for(eng.db_write(*node.change()), 30)
        took = loop.time() - started
        node.rollback()
        assert not result.ok and "not held by 1 server(s)" in result.message, result
        a.write_delay = 0
        a.drop()
        await eng.close()
        return took

    took = asyncio.run(go())
    assert hot_calls > 20
    assert took >= 1.4, took          # it waited for the outage limit (how soon after it
                                      # fails: bench/deadlines.py)


def test_quorum_one_goes_on_and_catches_up_a_lagging_server(tmp_path: Path) -> None:
    a, b = FakeServer("a"), FakeServer("b")
    node = Node(tmp_path / "lightningd.sqlite3")

    async def go() -> None:
        eng = make_engine(tmp_path, [a, b], quorum=1, outage=2.0)
        eng.start()
        assert await step(eng, node)
        b.up = False
        b.drop()
        for _ in range(10):
            assert await step(eng, node)
        b.up = True
        for _ in range(400):                # bounded: about 10 s
            assert await step(eng, node)
            await asyncio.sleep(0.02)
            if b.tip == a.tip:
                break
        await eng.close()

    asyncio.run(go())
    assert a.tip is not None and b.tip == a.tip
    assert b.snapshots and b.snapshots[-1][1] in a.hashes     # anchored at a record


def test_need_snapshot_is_a_blocking_catch_up_when_quorum_needs_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also the hot path: once the server is in step and idle, a call is handled by
    db_write_now (sealed, sent and answered from callbacks); the one that meets
    NeedSnapshot is handed to the general path, which takes a copy, catches the server
    up and still answers ``continue``."""
    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")
    hot: list[bool] = []
    handed: list[int] = []

    async def go() -> None:
        eng = make_engine(tmp_path, [s])
        real_now, real_trouble = eng.db_write_now, eng.hot_trouble

        def now(dv: int, writes: list[str], done: Callable[[object], None]) -> bool:
            hot.append(real_now(dv, writes, done))
            return hot[-1]

        def trouble() -> None:
            handed.append(eng.last_hook_dv or 0)
            real_trouble()

        monkeypatch.setattr(eng, "db_write_now", now)
        monkeypatch.setattr(eng, "hot_trouble", trouble)
        eng.start()
        assert await step(eng, node)
        assert await step(eng, node)
        s.tip = None               # the server lost this client's chain
        s.hashes.clear()
        assert await step(eng, node)
        await eng.close()

    asyncio.run(go())
    assert len(s.snapshots) == 2 and s.snapshots[1][0] == 2
    assert s.tip is not None and s.tip.data_version == 3
    assert hot == [False, True, True]             # the first contact is no hot call
    assert handed == [3]                          # the call that met NeedSnapshot


def test_compaction_is_uploaded_in_the_background(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(links, "COMPACTION_MIN_INTERVAL", 0.0)
    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")

    async def go() -> None:
        eng = make_engine(tmp_path, [s], chunk_delay=0.2)
        eng.start()
        assert await step(eng, node)
        s.want_snapshot = True
        for _ in range(5):
            assert await step(eng, node)
        while eng.links[0].compacting:
            await asyncio.sleep(0.05)
        await eng.close()

    asyncio.run(go())
    assert len(s.snapshots) == 2 and s.snapshots[1][1] in s.hashes
    assert s.tip is not None and s.tip.data_version == 6


def test_a_background_upload_pauses_after_each_chunk_while_hook_calls_come(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction is no call's business: while calls come, its upload leaves
    ``BACKGROUND_PAUSE`` after each chunk, so that on a machine of few cores its reading,
    sealing and sending (and the server's storing) leave CPU to the hook path; a call
    never waits for it. (A chunk's CPU in the plugin and the server was about 13 ms per
    MiB here: at full speed one upload kept both cores of the test machine busy.)"""
    monkeypatch.setattr(links, "COMPACTION_MIN_INTERVAL", 0.0)
    monkeypatch.setattr(links, "BACKGROUND_PAUSE", 0.05)
    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")
    node.con.execute("CREATE TABLE filler (data BLOB)")
    node.con.execute("INSERT INTO filler VALUES (zeroblob(40000))")
    durations: list[float] = []

    async def go() -> None:
        eng = make_engine(tmp_path, [s], chunk_size=4096)
        eng.start()
        assert await step(eng, node)
        s.chunk_times.clear()
        s.want_snapshot = True
        for _ in range(2000):
            started = time.monotonic()
            assert await step(eng, node)
            durations.append(time.monotonic() - started)
            if len(s.snapshots) == 2:
                break
            await asyncio.sleep(0.001)
        await eng.close()

    asyncio.run(go())
    assert len(s.snapshots) == 2
    gaps = [b - a for a, b in zip(s.chunk_times, s.chunk_times[1:], strict=False)]
    assert len(gaps) >= 8
    assert sorted(gaps)[len(gaps) // 2] >= 0.05, gaps     # (each chunk's send is a task:
    # one that starts late makes its gap longer and the next one shorter)


def test_compactions_take_turns_while_the_others_hold_the_quorum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers, quorum 1, both ask for a compaction at once: records queue behind a
    compaction's chunks on its connection, so while one server uploads the other keeps
    answering the changes alone; the second compaction starts after the first. (Both
    ask only once both hold the first snapshot: the slower one's first-contact upload goes
    on after the first call, and a server that just took a snapshot asks for none.)"""
    monkeypatch.setattr(links, "COMPACTION_MIN_INTERVAL", 0.0)
    servers = [FakeServer("a"), FakeServer("b")]
    node = Node(tmp_path / "lightningd.sqlite3")
    overlapped: list[int] = []

    async def go() -> None:
        eng = make_engine(tmp_path, servers, quorum=1, chunk_delay=0.2)
        eng.start()
        for _ in range(500):
            assert await step(eng, node)
            if all(len(s.snapshots) == 1 for s in servers) and \
                    all(link.in_step() for link in eng.links):
                break
            await asyncio.sleep(0.01)
        assert all(len(s.snapshots) == 1 for s in servers)
        for s in servers:
            s.want_snapshot = True
        for _ in range(200):
            assert await step(eng, node)
            running = [link for link in eng.links if link.compacting]
            if len(running) > 1:
                overlapped.append(node.dv)
            if all(len(s.snapshots) == 2 for s in servers):
                break
            await asyncio.sleep(0.02)
        await eng.close()

    asyncio.run(go())
    assert all(len(s.snapshots) == 2 for s in servers), [s.snapshots for s in servers]
    assert not overlapped


class EmptyWantsSnapshot(FakeServer):
    """Wants a snapshot while it holds none, as the real store says (Status and Ack)."""

    @property  # type: ignore[override]
    def want_snapshot(self) -> bool:
        return not self.snapshots

    @want_snapshot.setter
    def want_snapshot(self, value: bool) -> None:
        pass


def test_the_first_snapshot_answers_the_servers_wish_for_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that held nothing asks for a snapshot in its status; the first-contact
    snapshot is that snapshot: no compaction follows it."""
    monkeypatch.setattr(links, "COMPACTION_MIN_INTERVAL", 0.0)
    s = EmptyWantsSnapshot("a")
    node = Node(tmp_path / "lightningd.sqlite3")

    async def go() -> None:
        eng = make_engine(tmp_path, [s])
        eng.start()
        for _ in range(5):
            assert await step(eng, node)
        assert not eng.links[0].compacting and not eng.links[0].compaction_due()
        await eng.close()

    asyncio.run(go())
    assert len(s.snapshots) == 1
    assert s.tip is not None and s.tip.data_version == 5


def test_a_busy_database_fails_a_blocking_snapshot_at_once(tmp_path: Path) -> None:
    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")
    node.con.execute("CREATE TABLE t (x BLOB)")
    node.con.execute("PRAGMA cache_size = 10")

    async def go() -> None:
        eng = make_engine(tmp_path, [s], outage=60, busy_timeout=0.2)
        eng.start()
        node.con.execute("BEGIN")
        for _ in range(300):
            node.con.execute("INSERT INTO t VALUES (?)", (os.urandom(1000),))
        node.con.execute("UPDATE vars SET intval = 1")
        result = await asyncio.wait_for(eng.db_write(1, ["INSERT INTO t VALUES (1)",
                                                         "UPDATE vars SET intval = 1"]), 10)
        node.con.execute("ROLLBACK")
        assert not result.ok and "exclusively locked" in result.message
        await eng.close()

    asyncio.run(go())
    assert s.tip is None and not s.snapshots


@pytest.mark.parametrize("kind_first", [Kind.PRAGMA, Kind.NORMAL])
def test_a_gap_takes_a_fresh_snapshot(tmp_path: Path, kind_first: Kind) -> None:
    s = FakeServer("a")
    node = Node(tmp_path / "lightningd.sqlite3")

    async def go() -> None:
        eng = make_engine(tmp_path, [s])
        eng.start()
        assert await step(eng, node)
        await eng.close()
        for _ in range(3):                 # committed with no plugin
            node.change()
            node.commit()
        eng = make_engine(tmp_path, [s])
        eng.start()
        if kind_first is Kind.PRAGMA:
            r = await eng.db_write(node.dv, ["PRAGMA foreign_keys = ON;"])
            assert r.ok
        assert await step(eng, node)
        await eng.close()

    asyncio.run(go())
    assert len(s.snapshots) == 2 and s.snapshots[1][0] == 4
    assert s.snapshots[1][1] not in s.hashes        # a fresh anchor


def test_an_upload_begun_again_puts_the_outage_limit_off_no_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first contact's blocking snapshot to a server that answers each chunk with
    another index (a protocol violation: the link drops the connection, reconnects and
    uploads again, over and over): the call fails at the outage limit. Only an upload
    that gets further than before is progress that puts the limit off."""
    monkeypatch.setattr(links, "RECONNECT_MAX", 0.05)
    monkeypatch.setattr(links, "CATCHUP_BACKOFF_MAX", 0.05)
    s = FakeServer("a")
    s.lie_chunk_index = True
    node = Node(tmp_path / "lightningd.sqlite3")

    async def go() -> None:
        eng = make_engine(tmp_path, [s], outage=1.0)
        eng.start()
        dv, writes = node.change()
        result = await asyncio.wait_for(eng.db_write(dv, writes), 20)
        node.rollback()
        assert not result.ok and "not held by 1 server(s)" in result.message, result
        assert "protocol violation" in result.message and "ChunkAck" in result.message
        await eng.close()

    asyncio.run(go())
    assert s.uploads >= 3 and s.tip is None and not s.snapshots


def test_a_link_stopped_as_its_wait_ends_stops(tmp_path: Path) -> None:
    """A link parked until a deadline (``_wait``) is cancelled (the plugin stops) in the
    same turn of the event loop as its wake-up: it must end, cancelled. (Python 3.11's
    ``wait_for`` then returns instead, the link goes on, and ``stop`` waits for it
    forever.)"""
    async def go() -> bool:
        eng = make_engine(tmp_path, [FakeServer("a")])
        link = eng.links[0]
        task = asyncio.ensure_future(link._wait(time.monotonic() + 60))
        for _ in range(3):
            await asyncio.sleep(0)                 # parked in wake.wait()
        link.wake.set()
        task.cancel()
        await asyncio.wait([task], timeout=5)
        return task.cancelled()

    assert asyncio.run(go())
