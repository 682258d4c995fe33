"""A streaming writer's records take the server's quick path: a read that is exactly one
Write frame is recognised with one struct (``ServerSession.write_in``) and its Ack written
in one piece (``ServerSession.ack``), without the frame decoder and the message objects.
Whatever the requests, that path must give the same answers, and leave the same files,
as the general one (``receive_data`` and the request queue), inline or in a worker.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import itertools
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from store_crash_child import CLIENT_PRIV, Writer, client_id

from cldcb.core import wire
from cldcb.core.dataversion import Kind, advance
from cldcb.core.ids import pubkey_of, server_id_from_pubkey
from cldcb.core.seal import item_hash
from cldcb.core.session import ClientSession, Role
from cldcb.server import handler as handler_mod
from cldcb.server.handler import ServerCore, SessionHandler
from cldcb.store import Store, Stored
from cldcb.store.locks import Lease, lock_path

SERVER_PRIV = hashlib.sha256(b"cldcb test server").digest()
CID = client_id()


class Sink:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def make_store(folder: Path) -> Writer:
    """A data directory with the client registered and a snapshot at data_version 10;
    the writer that put it there (its tip is the anchor). Deterministic: two calls make
    the same bytes."""
    folder.mkdir()
    store = Store.open(folder)
    store.add_client(CID)
    w = Writer(store.client(CID))
    w.snapshot(10)
    return w


def requests(folder: Path, seed: int) -> list[bytes]:
    """What a client sends, read by read: mostly the chain's next records, with resends,
    replacements, PRAGMA records, gaps, wrong links and kinds, status requests, a record
    split over two reads and two in one read; last, a malformed frame (which ends the
    session). The records are sealed and chained on a scratch store of their own."""
    rng = random.Random(seed)
    w = make_store(folder)
    reads: list[bytes] = []
    dv = 10
    last: bytes | None = None
    for _ in range(100):
        op = rng.choices(["next", "resend", "replace", "pragma", "gap", "badlink", "badkind",
                          "status", "split", "two"], [60, 4, 4, 4, 2, 2, 2, 3, 4, 4])[0]
        if op == "status":
            reads.append(wire.encode(wire.StatusRequest()))
            continue
        if op == "resend" and last is not None:
            reads.append(last)
            continue
        frames = []
        for _ in range(2 if op == "two" else 1):
            target = {"replace": dv, "pragma": dv, "gap": dv + 2}.get(op, dv + 1)
            kind = Kind.PRAGMA if op == "pragma" else Kind.NORMAL
            link, sealed = w.seal(target, kind, size=rng.randrange(20, 3000))
            if op == "badlink":
                link = bytes(32)
            res = w.cs.append(target, 7 if op == "badkind" else int(kind), link, sealed, 0) \
                if op != "badkind" else None
            if isinstance(res, Stored):
                w.tip = advance(w.tip, target, kind, item_hash(sealed))
                dv = target
            frames.append(wire.encode(wire.Write(target, 7 if op == "badkind" else int(kind),
                                                 link, sealed)))
        last = frames[-1]
        if op == "split":
            cut = rng.randrange(1, len(frames[0]))
            reads += [frames[0][:cut], frames[0][cut:]]
        else:
            reads.append(b"".join(frames))
    w.cs.close()
    bad = bytearray(wire.encode(wire.Write(dv + 1, 0, bytes(32), b"x" * 40)))
    bad[-41] ^= 1                                   # the inner length no longer fits
    return reads + [bytes(bad)]


async def settle(h: SessionHandler) -> bytes:
    """Let the handler answer everything it was given (bounded); what it wrote."""
    for i in range(3000):
        await asyncio.sleep(0 if i < 3 else 0.001)
        if h._idle and h._queue.empty() and h._held is None and h.core.inflight == 0:
            break
    assert isinstance(h.sink, Sink)
    return h.sink.take()


async def open_session(core: ServerCore, role: Role,
                       sink: Sink | None = None) -> tuple[SessionHandler, ClientSession]:
    """A handler and the client's end of its session, through the hello in ``role``."""
    h = SessionHandler(core, sink or Sink())
    h.start()
    client = ClientSession(server_id_from_pubkey(pubkey_of(SERVER_PRIV)), CLIENT_PRIV,
                           role, bytes(32))
    h.data_received(client.start())
    client.receive_data(await settle(h))
    h.data_received(client.data_to_send())
    assert client.receive_data(await settle(h)) and h.client_id == CID
    return h, client


async def writer_session(core: ServerCore) -> SessionHandler:
    """A handler whose session has been through the hello as the client's writer."""
    return (await open_session(core, Role.WRITER))[0]


async def serve(folder: Path, reads: list[bytes], *, quick: bool, inline: bool,
                monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], int]:
    """Feed ``reads`` to a handler over the store in ``folder``; the bytes written back
    after each read, and how many reads took the quick path."""
    clock = itertools.count(1_700_000_000_000)
    monkeypatch.setattr(handler_mod, "now_ms", lambda: next(clock))
    # the same server nonce in both runs: the same session key, so the same MACs
    monkeypatch.setattr(handler_mod.os, "urandom", lambda n: bytes(range(n)))
    core = ServerCore(folder, SERVER_PRIV, threads=2)
    if not inline:
        monkeypatch.setattr(core, "quiet", lambda session: False)
    h = await writer_session(core)
    taken = 0
    write_in = h.session.write_in

    def counted(data: bytes) -> wire.Write | None:
        nonlocal taken
        msg = write_in(data) if quick else None
        taken += msg is not None
        return msg

    monkeypatch.setattr(h.session, "write_in", counted)
    if not quick:                                 # and the Ack as any other answer
        def ack(data_version: int, kind: int, link: bytes, want_snapshot: bool) -> bytes:
            h.session.send(wire.Ack(data_version, kind, link, want_snapshot))
            return h.session.data_to_send()
        monkeypatch.setattr(h.session, "ack", ack)
    answers = []
    for data in reads:
        if h.session.closed:
            break
        h.data_received(data)
        answers.append(await settle(h))
    h.connection_lost()
    await asyncio.wait_for(h.done.wait(), 10)
    core.close()
    return answers, taken


def files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the settings history (it holds the wall time of ``add``)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "settings.history"}


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker"])
@pytest.mark.parametrize("seed", [1, 2])
def test_the_quick_path_answers_and_stores_as_the_general_path(
        tmp_path: Path, seed: int, inline: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = requests(tmp_path / "scratch", seed)
    runs: dict[bool, Any] = {}
    for quick in (True, False):
        folder = tmp_path / ("quick" if quick else "general")
        make_store(folder).cs.close()
        runs[quick] = asyncio.run(serve(folder, reads, quick=quick, inline=inline,
                                        monkeypatch=monkeypatch))
        runs[quick] += (files(folder),)
    (q_answers, q_taken, q_files), (g_answers, g_taken, g_files) = runs[True], runs[False]
    assert g_taken == 0 and q_taken > 60          # the quick path did take most records
    assert len(q_answers) == len(reads)           # the malformed frame came last
    assert q_answers == g_answers
    kinds = [type(m).__name__ for a in g_answers for m in wire.FrameDecoder().feed(a)]
    assert {"Ack", "NeedSnapshot", "Status", "Error"} <= set(kinds)
    assert q_files == g_files


def chain(folder: Path, n: int) -> list[bytes]:
    """The Write frames of ``n`` records that follow the snapshot of make_store."""
    w = make_store(folder)
    frames = []
    for dv in range(11, 11 + n):
        link, sealed = w.seal(dv, Kind.NORMAL, size=200)
        w.tip = advance(w.tip, dv, Kind.NORMAL, item_hash(sealed))
        frames.append(wire.encode(wire.Write(dv, 0, link, sealed)))
    w.cs.close()
    return frames


def test_a_lease_holds_the_lock_until_released(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.write_bytes((3).to_bytes(8, "big") + (5).to_bytes(8, "big"))
    fd, other = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    lease = Lease(fd)
    assert lease.due(0.0) == 0.0                                    # not held
    assert lease.hold(10.0) == (3, 5)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path.write_bytes(bytes(16))                                     # (nobody else could)
    assert lease.hold(10.004) == (3, 5)                             # kept, not read again
    assert lease.due(10.004) == pytest.approx(Lease.HOLD - 0.004)   # from when it was taken
    assert lease.due(10.0 + Lease.HOLD) == 0.0
    lease.release()
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)                # free again
    assert lease.hold(11.0) is None                                 # another holds it now
    assert lease.counters is None
    os.close(fd)
    os.close(other)


def test_a_streaming_writer_keeps_the_lock_only_for_a_while(tmp_path: Path) -> None:
    """On the quick path the writer keeps its client's lock from one record to the next,
    for Lease.HOLD at most: once its records stop the lock is free again, and while they
    go on another process (here a thread with a lock file of its own) gets it within
    that time, holds up the records meanwhile, and every record is still answered, in
    order."""
    frames = chain(tmp_path / "scratch", 400)
    make_store(tmp_path / "data").cs.close()

    def try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True

    async def body() -> None:
        core = ServerCore(tmp_path / "data", SERVER_PRIV, threads=2)
        h = await writer_session(core)
        other = os.open(lock_path(tmp_path / "data", CID), os.O_RDWR)
        acks = []
        for frame in frames[:2]:           # the first grows the log: in a worker, unkept
            h.data_received(frame)
            acks += wire.FrameDecoder().feed(await settle(h))
        assert [type(a) for a in acks] == [wire.Ack, wire.Ack]
        assert not try_lock(other)                          # kept after the record
        await asyncio.sleep(Lease.HOLD * 2)
        assert try_lock(other)                              # let go after a while
        got: list[float] = []

        def take() -> None:                                 # another process's wait
            t0 = time.monotonic()
            fcntl.flock(other, fcntl.LOCK_EX)
            got.append(time.monotonic() - t0)
            time.sleep(0.02)
            fcntl.flock(other, fcntl.LOCK_UN)

        waiter = None
        for i, frame in enumerate(frames[2:]):              # a record every millisecond
            h.data_received(frame)
            await asyncio.sleep(0.001)
            if i == 20:
                waiter = asyncio.get_running_loop().run_in_executor(None, take)
        assert waiter is not None
        await waiter
        acks = wire.FrameDecoder().feed(await settle(h))
        assert [(type(a), a.data_version) for a in acks] == \
            [(wire.Ack, dv) for dv in range(13, 11 + len(frames))]
        assert got and got[0] < Lease.HOLD + 0.2
        h.connection_lost()
        await asyncio.wait_for(h.done.wait(), 10)
        assert try_lock(other)                              # and gone with the session
        os.close(other)
        core.close()

    asyncio.run(body())
