"""Fairness between sessions: a client streaming big records is held back by its own
SSH window (bounded unanswered bytes per session) and its appends never run on the
event loop thread, so the other sessions' small writes are answered meanwhile."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from store_crash_child import Writer
from test_server_daemon import Writer as DaemonWriter
from test_server_daemon import run, serving
from test_server_hot_path import CID, SERVER_PRIV, Sink, make_store, settle, writer_session

from cldcb.core import wire
from cldcb.core.dataversion import Kind, advance
from cldcb.core.seal import item_hash
from cldcb.core.session import Role
from cldcb.server.handler import BACKLOG, BACKLOG_BYTES, HOT_PATH_BYTES, ServerCore
from cldcb.store import ClientStore
from cldcb.transport.connection import Connection


class PauseSink(Sink):
    """Records the order of pause/resume calls among the writes."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def pause_reading(self) -> None:
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.events.append("resume")


def big_chain(folder: Path, sizes: list[int]) -> list[bytes]:
    """The Write frames of records of these sizes following the snapshot of make_store."""
    w: Writer = make_store(folder)
    frames = []
    for dv, size in enumerate(sizes, start=11):
        link, sealed = w.seal(dv, Kind.NORMAL, size=size)
        w.tip = advance(w.tip, dv, Kind.NORMAL, item_hash(sealed))
        frames.append(wire.encode(wire.Write(dv, 0, link, sealed)))
    w.cs.close()
    return frames


def acked(out: bytes) -> list[int]:
    msgs = wire.FrameDecoder().feed(out)
    assert all(isinstance(m, wire.Ack) for m in msgs), msgs
    return [m.data_version for m in msgs]


def test_a_session_with_many_unanswered_bytes_stops_being_read(tmp_path: Path) -> None:
    """Far fewer than BACKLOG requests, but big ones: reading pauses as soon as the
    unanswered bytes reach BACKLOG_BYTES, resumes once they are answered, and every
    record is acked in order."""
    count = BACKLOG // 2 - 1
    size = BACKLOG_BYTES // (count - 2)
    frames = big_chain(tmp_path / "scratch", [size] * count)
    make_store(tmp_path / "data").cs.close()

    async def body() -> tuple[list[str], list[int], int]:
        core = ServerCore(tmp_path / "data", SERVER_PRIV, threads=2)
        h = await writer_session(core)
        sink = PauseSink()
        h.sink = sink
        lock = core.lock(CID)
        assert lock.try_acquire()          # another session of the client is storing
        paused_at = -1
        for i, frame in enumerate(frames):
            h.data_received(frame)
            if "pause" in sink.events and paused_at < 0:
                paused_at = i
        lock.release()
        out = await settle(h)
        h.connection_lost()
        await asyncio.wait_for(h.done.wait(), 10)
        core.close()
        return sink.events, acked(out), paused_at

    events, dvs, paused_at = asyncio.run(body())
    weights = [len(m.sealed) for f in frames for m in wire.FrameDecoder().feed(f)]
    reached = next(i for i in range(count) if sum(weights[:i + 1]) >= BACKLOG_BYTES)
    assert paused_at == reached < count - 1     # before the last: not at the end anyway
    assert events == ["pause", "resume"]
    assert dvs == list(range(11, 11 + count))


def test_a_big_record_is_never_appended_on_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a quiet server a small record is appended inline (on the loop's thread), a
    record bigger than HOT_PATH_BYTES (that fits the log's zero-filled tail, so the store
    would take it inline) in a worker thread; all are acked, in order."""
    frames = big_chain(tmp_path / "scratch", [200, 200, 3 * HOT_PATH_BYTES])
    make_store(tmp_path / "data").cs.close()
    stored: dict[int, str] = {}                 # data_version → thread that stored it
    append = ClientStore.append

    def spied(self: ClientStore, data_version: int, *args: object, **kw: object) -> object:
        answer = append(self, data_version, *args, **kw)  # type: ignore[arg-type]
        stored[data_version] = threading.current_thread().name
        return answer

    async def body() -> list[int]:
        core = ServerCore(tmp_path / "data", SERVER_PRIV, threads=2)
        h = await writer_session(core)
        out = b""
        for frame in frames:
            core._last = (0, 0.0)          # nobody else asked lately: the server is quiet
            core._last_other.clear()
            h.data_received(frame)
            out += await settle(h)
        h.connection_lost()
        await asyncio.wait_for(h.done.wait(), 10)
        core.close()
        return acked(out)

    monkeypatch.setattr(ClientStore, "append", spied)
    assert asyncio.run(body()) == [11, 12, 13]
    main = threading.current_thread().name      # (11 may grow the new log: a worker's)
    assert stored[12] == main and stored[13].startswith("store-"), stored


def test_a_small_write_is_answered_while_a_heavy_client_streams(tmp_path: Path) -> None:
    """The real daemon: one client pipelines HEAVY records of 1 MiB without waiting; once
    the first is acked another client writes one small record. Its Ack comes while the
    heavy client still has most of its records unanswered, and only a few heavy Acks
    come between the small Write and its Ack: it waited for at most the heavy session's
    call in a worker (and what that one's fsync delays), not behind the heavy session's
    queue (BACKLOG records) or the records in its window."""
    heavy_count = 48
    srv, (heavy_priv, small_priv) = serving(tmp_path, 2)
    heavy, small = DaemonWriter(heavy_priv), DaemonWriter(small_priv)

    async def body() -> tuple[int, int, list[object]]:
        async with await Connection.open(srv.spec, heavy.priv, Role.WRITER) as hconn, \
                await Connection.open(srv.spec, small.priv, Role.WRITER) as sconn:
            await heavy.snapshot(hconn, 5000)
            await small.snapshot(sconn, 5000)
            answers: list[object] = []
            first = asyncio.get_running_loop().create_future()
            all_in = asyncio.get_running_loop().create_future()

            def done(answer: object) -> None:
                answers.append(answer)
                if not first.done():
                    first.set_result(None)
                if len(answers) == heavy_count:
                    all_in.set_result(None)

            link = heavy.link
            for dv in range(heavy.dv + 1, heavy.dv + 1 + heavy_count):
                rec = heavy.sealer.seal_change(dv, Kind.NORMAL, link, ["h" * (1 << 20)], 0)
                hconn.write_nowait(dv, Kind.NORMAL, link, rec, done)
                link = item_hash(rec)
            await first
            before = len(answers)
            reply = await small.write(sconn)
            assert isinstance(reply, wire.Ack)
            meanwhile = len(answers) - before
            await all_in
            return before, meanwhile, answers

    try:
        before, meanwhile, answers = run(body())
        assert all(isinstance(a, wire.Ack) for a in answers)
        assert [a.data_version for a in answers] == list(range(11, 11 + heavy_count))
        assert before < heavy_count - BACKLOG and meanwhile < BACKLOG // 2, (before, meanwhile)
    finally:
        srv.stop()
