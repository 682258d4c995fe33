"""A fetch is sent in batches: many records per worker call and per write to the
transport (one SSH packet per record would cost the reader more than the record), with
every item in order and the count in FetchEnd; an error met while reading the store comes
after the items read before it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from test_server_daemon import NODE, run, serving
from test_server_daemon import Writer as DaemonWriter
from test_server_hot_path import SERVER_PRIV, Sink, make_store, open_session, settle

from cldcb.core import wire
from cldcb.core.seal import SnapshotSealer
from cldcb.core.session import Received, Role
from cldcb.server.handler import FETCH_BATCH_BYTES, ServerCore
from cldcb.store import ClientStore, Stored
from cldcb.transport.connection import FETCH_QUEUE_BYTES, Connection

RECORDS = 400


class CountingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def stored_chain(folder: Path, n: int) -> None:
    w = make_store(folder)                       # snapshot at 10: 3 chunks
    for dv in range(11, 11 + n):
        assert isinstance(w.change(dv, size=200), Stored)
    w.cs.close()


async def fetch(folder: Path) -> tuple[list[wire.Message], int]:
    """Every message a reader's Fetch gets back, and the sink writes it took."""
    core = ServerCore(folder, SERVER_PRIV, threads=2)
    sink = CountingSink()
    h, client = await open_session(core, Role.READER, sink)
    before = sink.writes
    h.data_received(client.send(wire.Fetch(-1)))
    messages: list[wire.Message] = []
    for _ in range(200):
        got = await settle(h)
        messages += [e.message for e in client.receive_data(got) if isinstance(e, Received)]
        if messages and isinstance(messages[-1], (wire.FetchEnd, wire.Error)):
            break
    writes = sink.writes - before
    h.connection_lost()
    await asyncio.wait_for(h.done.wait(), 10)
    core.close()
    return messages, writes


def test_records_are_sent_many_per_write(tmp_path: Path) -> None:
    stored_chain(tmp_path / "data", RECORDS)
    messages, writes = asyncio.run(fetch(tmp_path / "data"))
    kinds = [type(m).__name__ for m in messages]
    assert kinds == ["FetchSnapshot"] + ["FetchChunk"] * 3 + ["FetchRecord"] * RECORDS + [
        "FetchEnd"]
    assert [m.data_version for m in messages if isinstance(m, wire.FetchRecord)] == list(
        range(11, 11 + RECORDS))
    assert isinstance(messages[-1], wire.FetchEnd) and messages[-1].record_count == RECORDS
    sealed = sum(len(m.sealed) for m in messages if isinstance(m, wire.FetchRecord))
    assert sealed < FETCH_BATCH_BYTES
    assert writes <= 4          # snapshot + chunks, the records, the end (was one each)


def test_a_store_error_comes_after_the_records_read_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored_chain(tmp_path / "data", RECORDS)
    records = ClientStore.fetch

    def failing_after(self: ClientStore, *args: object, **kw: object) -> object:
        plan = records(self, *args, **kw)  # type: ignore[arg-type]
        if plan is None:
            return None
        real = plan.records

        def some_then_fail():  # noqa: ANN202 - a generator
            for i, r in enumerate(real()):
                if i == 5:
                    raise OSError("disk read failed")
                yield r
        plan.records = some_then_fail  # type: ignore[method-assign]
        return plan

    monkeypatch.setattr(ClientStore, "fetch", failing_after)
    messages, _ = asyncio.run(fetch(tmp_path / "data"))
    assert [m.data_version for m in messages if isinstance(m, wire.FetchRecord)] == list(
        range(11, 16))
    assert not any(isinstance(m, wire.FetchEnd) for m in messages)


# -- the reading end: a slow reader holds the server back ------------------------------

def queued_bytes(fetched: object) -> tuple[int, bool]:
    """Sealed bytes received for the fetch ``fetched`` (a running Connection.fetch) and
    not yet taken; whether FetchEnd is among them."""
    waiter = fetched.ag_frame.f_locals["waiter"]  # type: ignore[attr-defined]
    items = list(waiter.items)
    return (sum(len(getattr(m, "sealed", b"")) for m in items),
            any(isinstance(m, wire.FetchEnd) for m in items))


def test_a_slow_fetch_reader_pauses_the_connection(tmp_path: Path) -> None:
    """40 MiB of snapshot chunks: while the reader does not take them, what the
    connection holds stays near FETCH_QUEUE_BYTES (reading paused) instead of the whole
    backup; then every chunk arrives, in order."""
    chunks = 40
    srv, (priv,) = serving(tmp_path, 1)
    try:
        async def body() -> tuple[int, list[int]]:
            w = DaemonWriter(priv)
            s = SnapshotSealer(NODE.pubkey, priv, os.urandom(32), w.dv, w.anchor)
            async with await Connection.open(srv.spec, priv, Role.WRITER) as conn:
                await conn.begin_snapshot(1, w.dv, w.anchor)
                for i in range(chunks):
                    await conn.send_chunk(1, i, s.seal_chunk(os.urandom(1 << 20)))
                await conn.end_snapshot(1, chunks, s.seal_manifest(0))
            async with await Connection.open(srv.spec, priv, Role.READER) as conn:
                fetched = conn.fetch()
                first = await anext(fetched)
                assert isinstance(first, wire.FetchSnapshot)
                most = 0
                for _ in range(1000):                  # the reader is busy elsewhere
                    held, ended = queued_bytes(fetched)
                    most = max(most, held)
                    waiter = fetched.ag_frame.f_locals["waiter"]  # type: ignore[attr-defined]
                    if ended or getattr(waiter, "paused", False):
                        break
                    await asyncio.sleep(0.01)
                held, _ = queued_bytes(fetched)
                most = max(most, held)
                rest = [m async for m in fetched]
            return most, [m.index for m in rest if isinstance(m, wire.FetchChunk)]

        most, indexes = run(body())
    finally:
        srv.stop()
    assert indexes == list(range(chunks))
    assert FETCH_QUEUE_BYTES // 2 < most <= FETCH_QUEUE_BYTES + (2 << 20)
