"""The daemon end to end: quota, SIGTERM while clients stream, restart, admin commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers.servers import CldcbServer, run_server_cmd

from cldcb.core import wire
from cldcb.core.dataversion import Kind
from cldcb.core.ids import client_id_from_pubkey, pubkey_of
from cldcb.core.seal import ChainVerifier, RecordSealer, SnapshotOpener, SnapshotSealer, item_hash
from cldcb.core.session import Role
from cldcb.errors import RemoteError, TransportError
from cldcb.node.nodekey import LocalNodeKey
from cldcb.transport.connection import Connection

NODE = LocalNodeKey(bytes([0x22]) * 32)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 120))


class Writer:
    """A client that streams a chain of records, remembering what was acked."""

    def __init__(self, priv: bytes) -> None:
        self.priv = priv
        self.sealer = RecordSealer(NODE.pubkey, priv, os.urandom(32))
        self.anchor = os.urandom(32)
        self.link = self.anchor
        self.dv = 10
        self.acked: list[int] = []

    async def snapshot(self, conn: Connection, size: int) -> None:
        s = SnapshotSealer(NODE.pubkey, self.priv, os.urandom(32), self.dv, self.anchor)
        await conn.begin_snapshot(1, self.dv, self.anchor)
        await conn.send_chunk(1, 0, s.seal_chunk(os.urandom(size)))
        await conn.end_snapshot(1, 1, s.seal_manifest(0))

    async def write(self, conn: Connection, size: int = 2000) -> wire.Message:
        dv = self.dv + 1
        rec = self.sealer.seal_change(dv, Kind.NORMAL, self.link, ["x" * size], 0)
        reply = await conn.write(dv, Kind.NORMAL, self.link, rec)
        if isinstance(reply, wire.Ack):
            assert reply.data_version == dv
            self.dv, self.link = dv, item_hash(rec)
            self.acked.append(dv)
        return reply


async def fetched_data_versions(srv: CldcbServer, priv: bytes) -> list[int]:
    async with await Connection.open(srv.spec, priv, Role.READER) as conn:
        msgs = [m async for m in conn.fetch()]
    snap = msgs[0]
    assert isinstance(snap, wire.FetchSnapshot)
    opener = SnapshotOpener(NODE, pubkey_of(priv), snap.data_version, snap.manifest)
    for m in msgs:
        if isinstance(m, wire.FetchChunk):
            opener.open_chunk(m.index, m.sealed)
    opener.finish()
    v = ChainVerifier(NODE, pubkey_of(priv), snap.data_version, opener.manifest.anchor)
    return [v.open(m.data_version, Kind(m.kind), m.link, m.sealed)[0].data_version
            for m in msgs if isinstance(m, wire.FetchRecord)]


def serving(tmp_path: Path, clients: int = 1, *add_args: str) -> tuple[CldcbServer, list[bytes]]:
    """A started daemon with ``clients`` new clients registered (``add_args`` for each)."""
    srv = CldcbServer(tmp_path / "data").init()
    privs = [os.urandom(32) for _ in range(clients)]
    for p in privs:
        srv.add(client_id_from_pubkey(pubkey_of(p)), *add_args)
    return srv.start(), privs


def test_quota_exceeded_is_a_clear_error_and_keeps_the_data(tmp_path: Path) -> None:
    srv, (priv,) = serving(tmp_path, 1, "--quota", "60KiB")
    cid = client_id_from_pubkey(pubkey_of(priv))
    try:
        w = Writer(priv)

        async def body() -> None:
            async with await Connection.open(srv.spec, priv, Role.WRITER) as conn:
                await w.snapshot(conn, 20_000)
                with pytest.raises(RemoteError) as err:
                    for _ in range(100):
                        await w.write(conn, 3000)
                assert err.value.code == wire.ErrorCode.QUOTA
                assert "quota" in str(err.value).lower()
                # the session stays usable and the server holds exactly what it acked
                st = await conn.status()
                assert st.tip_data_version == w.dv and st.quota == 60 * 1024
                assert st.bytes_used <= st.quota

        run(body())
        assert 5 <= len(w.acked) < 100
        assert run(fetched_data_versions(srv, priv)) == w.acked
        listed = json.loads(run_server_cmd(srv.data_dir, "list", "--json").stdout)
        assert listed[0]["client_id"] == cid and listed[0]["newest_data_version"] == w.dv
    finally:
        srv.stop()


def test_admin_changes_reach_a_streaming_writer_at_its_next_record(tmp_path: Path) -> None:
    """`set --quota` and `remove` run in other processes while a writer streams: the
    writer's very next record sees them (its store skips re-reading the settings
    only while the lock file's settings epoch is unchanged)."""
    srv, (priv,) = serving(tmp_path)
    cid = client_id_from_pubkey(pubkey_of(priv))
    try:
        w = Writer(priv)

        async def body() -> None:
            async with await Connection.open(srv.spec, priv, Role.WRITER) as conn:
                await w.snapshot(conn, 20_000)
                for _ in range(20):
                    assert isinstance(await w.write(conn, 3000), wire.Ack)
                used = (await conn.status()).bytes_used
                run_server_cmd(srv.data_dir, "set", cid, "--quota", str(used + 1000))
                with pytest.raises(RemoteError) as err:
                    await w.write(conn, 3000)
                assert err.value.code == wire.ErrorCode.QUOTA
                run_server_cmd(srv.data_dir, "set", cid, "--quota", "0")  # no quota
                assert isinstance(await w.write(conn, 3000), wire.Ack)
                held = w.dv
                run_server_cmd(srv.data_dir, "remove", cid)
                with pytest.raises(RemoteError) as err:
                    await w.write(conn, 3000)
                assert "not registered" in str(err.value)
                assert w.dv == held

        run(body())
        assert len(w.acked) == 21
        removed = list((srv.data_dir / "removed").iterdir())
        assert len(removed) == 1 and not (srv.data_dir / "clients" / cid).exists()
    finally:
        srv.stop()


def test_sigterm_while_clients_stream_loses_no_acknowledged_record(tmp_path: Path) -> None:
    srv, privs = serving(tmp_path, 4)
    writers = [Writer(p) for p in privs]

    async def stream(w: Writer, stop: asyncio.Event) -> str:
        async with await Connection.open(srv.spec, w.priv, Role.WRITER) as conn:
            await w.snapshot(conn, 5000)
            try:
                while True:
                    await w.write(conn)
                    if stop.is_set() and len(w.acked) > 5:
                        pass
            except (RemoteError, TransportError) as exc:
                return type(exc).__name__

    async def body() -> list[str]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(stream(w, stop)) for w in writers]
        deadline = time.monotonic() + 30
        while min(len(w.acked) for w in writers) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGTERM)
        stop.set()
        return await asyncio.gather(*tasks)

    outcomes = run(body())
    assert all(o in ("RemoteError", "TransportError") for o in outcomes)
    assert srv.proc is not None and srv.proc.wait(30) == 0
    assert "stopped" in srv.log()
    srv.start()
    try:
        for w in writers:
            got = run(fetched_data_versions(srv, w.priv))
            # every acknowledged record is there; at most the one in flight at SIGTERM
            # (durable, but its ack lost with the connection) follows
            assert got[:len(w.acked)] == w.acked
            assert len(got) <= len(w.acked) + 1
    finally:
        srv.stop()


def test_pipelined_writes_of_busy_clients_are_answered_in_order(tmp_path: Path) -> None:
    """Several clients at once (the server is busy, so appends go to worker threads and
    are answered from callbacks), each sending 40 writes without waiting for the acks:
    every write gets its own Ack, in order, and the server holds exactly those records;
    a status pipelined behind them reports the last one."""
    srv, privs = serving(tmp_path, 6)
    writers = [Writer(p) for p in privs]

    async def burst(w: Writer) -> None:
        async with await Connection.open(srv.spec, w.priv, Role.WRITER) as conn:
            await w.snapshot(conn, 5000)
            for _ in range(3):
                sent = []
                for _ in range(40):
                    dv = w.dv + 1 + len(sent)
                    link = item_hash(sent[-1][2]) if sent else w.link
                    rec = w.sealer.seal_change(dv, Kind.NORMAL, link, ["y" * 1500], 0)
                    sent.append((dv, link, rec))
                replies = await asyncio.gather(*(conn.write(dv, Kind.NORMAL, link, rec)
                                                 for dv, link, rec in sent), conn.status())
                assert [r.data_version for r in replies[:-1]] == [d for d, _, _ in sent]
                assert all(isinstance(r, wire.Ack) for r in replies[:-1])
                w.acked += [d for d, _, _ in sent]
                w.dv, w.link = sent[-1][0], item_hash(sent[-1][2])
                assert replies[-1].tip_data_version == w.dv

    async def all_bursts() -> None:
        await asyncio.gather(*(burst(w) for w in writers))

    try:
        run(all_bursts())
        for w in writers:
            assert run(fetched_data_versions(srv, w.priv)) == w.acked == list(range(11, 131))
    finally:
        srv.stop()


def test_a_client_that_never_waits_is_held_back_not_buffered(tmp_path: Path) -> None:
    """A client sends 400 chunks of 1 MiB without waiting for a single answer: the
    server stops reading it while its backlog is full (the SSH window then holds the
    client back), so its memory stays bounded, and every chunk is still answered, in
    order, and the snapshot completes."""
    from helpers.plugin_harness import vm_hwm_mb

    srv, (priv,) = serving(tmp_path)
    try:
        async def flood() -> tuple[list[int], int]:
            async with await Connection.open(srv.spec, priv, Role.WRITER) as conn:
                anchor = os.urandom(32)
                s = SnapshotSealer(NODE.pubkey, priv, os.urandom(32), 10, anchor)
                await conn.begin_snapshot(7, 10, anchor)
                chunk = os.urandom(1 << 20)
                acks = await asyncio.gather(*(conn.send_chunk(7, i, s.seal_chunk(chunk))
                                              for i in range(400)))
                end = await conn.end_snapshot(7, s.chunk_count, s.seal_manifest(0))
                return [a.index for a in acks], end.data_version

        indexes, dv = run(flood())
        assert indexes == list(range(400)) and dv == 10
        assert srv.proc is not None
        assert vm_hwm_mb(srv.proc.pid) < 160      # not 400 MiB of queued chunks
    finally:
        srv.stop()


def test_admin_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = run_server_cmd(data, "id", check=False)
    assert r.returncode != 0 and "cldcb-server init" in r.stderr
    server_id = run_server_cmd(data, "init", "--public-address", "backup.example:29735").stdout
    assert server_id.strip().startswith(("52", "53"))
    priv = os.urandom(32)
    cid = client_id_from_pubkey(pubkey_of(priv))
    out = json.loads(run_server_cmd(data, "add", cid, "--quota", "2GiB", "--append-only",
                                    "--json").stdout)
    assert out["server_id"] == server_id.strip()
    assert out["public_address"] == "backup.example:29735" and out["ssh"].startswith("ssh://")
    listed = json.loads(run_server_cmd(data, "list", "--json").stdout)
    assert listed[0]["quota"] == 2 * 1024**3 and listed[0]["append_only"] is True
    bad = run_server_cmd(data, "add", "53" + cid[2:], check=False)
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and "client id" in bad.stderr
    assert run_server_cmd(data, "add", cid, "--quota", "lots", check=False).returncode != 0
    run_server_cmd(data, "remove", cid)
    assert json.loads(run_server_cmd(data, "list", "--json").stdout) == []
    again = run_server_cmd(data, "remove", cid, check=False)
    assert again.returncode != 0 and "not registered" in again.stderr
    assert "Traceback" not in again.stderr


def test_a_client_locked_by_another_process_does_not_stall_the_others(tmp_path: Path) -> None:
    """Another process (a `stdio` session on the same data dir) holding one client's
    lock delays that client's write until it lets go, and nobody else's."""
    import fcntl

    srv = CldcbServer(tmp_path / "data").init()
    a, b = Writer(os.urandom(32)), Writer(os.urandom(32))
    for w in (a, b):
        srv.add(client_id_from_pubkey(pubkey_of(w.priv)))
    srv.start()
    try:
        async def body() -> tuple[float, float]:
            ca = await Connection.open(srv.spec, a.priv, Role.WRITER)
            cb = await Connection.open(srv.spec, b.priv, Role.WRITER)
            await a.snapshot(ca, 1000)
            await b.snapshot(cb, 1000)
            lock_path = srv.data_dir / "locks" / f"{client_id_from_pubkey(pubkey_of(a.priv))}.lock"
            fd = os.open(lock_path, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            t0 = time.monotonic()
            held = asyncio.create_task(a.write(ca))
            await asyncio.sleep(0.3)
            await b.write(cb)                      # the other client is not stalled:
            assert not held.done()                 # answered while a's write waits for the lock
            await asyncio.sleep(0.7)
            released = time.monotonic() - t0
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            assert isinstance(await held, wire.Ack)
            a_done = time.monotonic() - t0
            await ca.close()
            await cb.close()
            return released, a_done

        released, a_done = run(body())
        assert a_done >= released
        assert a.acked == [11] and b.acked == [11]
    finally:
        srv.stop()
