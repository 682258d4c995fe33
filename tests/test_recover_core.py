"""cldcb.node.restore without a server: fetch streams sealed like the plugin seals them.

:func:`sealed_backup` turns a real trace into what a server answers to
``Fetch`` (a snapshot of the database after the first ``split`` calls, then
the remaining calls as records linked by the data_version rules), so the
rebuild, every check and every tampering can be exercised in milliseconds.
The same checks run against real servers in ``test_recover_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from helpers.environment import DATA
from helpers.traces import expected_dump_bytes, load_trace, replay_trace, sqlite_dump_bytes

from cldcb.core import wire
from cldcb.core.dataversion import Kind, advance, classify, decide, snapshot_tip
from cldcb.core.ids import pubkey_of
from cldcb.core.seal import Change, RecordSealer, SnapshotSealer, item_hash
from cldcb.errors import ChainError, RecoveryError, ReplayError, SealError
from cldcb.node import restore
from cldcb.node.nodekey import LocalNodeKey
from cldcb.node.replay_process import AHEAD, ReplayProcess

CHUNK = 64 * 1024
CLIENT_PRIV = bytes.fromhex("11" * 32)


def vector_node_key() -> LocalNodeKey:
    keys = json.loads((DATA / "cln-keys.json").read_text())["hsm_secrets"]
    plain = next(k for k in keys if k["name"] == "plain32")
    return LocalNodeKey.from_hsm_secret_bytes(bytes.fromhex(plain["file_hex"]))


@dataclass
class Backup:
    messages: list[wire.Message]
    node: LocalNodeKey
    client_pub: bytes
    data_version: int

    def records(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if isinstance(m, wire.FetchRecord)]


def sealed_backup(tmp: Path, trace: str = "cln-channels", split: int = 0,
                  node: LocalNodeKey | None = None, seed: int = 1) -> Backup:
    """A fetch answer: snapshot after ``split`` calls of ``trace``, then the rest as records."""
    node = node or vector_node_key()
    calls = load_trace(trace)
    base = tmp / f"base-{trace}-{split}-{seed}.sqlite3"
    base.unlink(missing_ok=True)
    start = replay_trace(trace, base, calls=slice(0, split)) if split else 0
    if not split:
        base.write_bytes(b"")
    anchor = bytes([seed]) * 32
    snap = SnapshotSealer(node.pubkey, CLIENT_PRIV, bytes([seed + 1]) * 32, start, anchor)
    data = base.read_bytes()
    chunks = [wire.FetchChunk(i, snap.seal_chunk(data[o:o + CHUNK]))
              for i, o in enumerate(range(0, len(data), CHUNK))]
    manifest = snap.seal_manifest(1_700_000_000_000)
    msgs: list[wire.Message] = [wire.FetchSnapshot(start, anchor, len(chunks), manifest, 0)]
    msgs += chunks
    sealer = RecordSealer(node.pubkey, CLIENT_PRIV, bytes([seed + 2]) * 32)
    tip = snapshot_tip(start, anchor)
    dv = start
    for n, (dv, writes) in enumerate(calls[split:]):
        kind = classify(writes)
        decision = decide(tip, dv, kind)
        assert decision.link is not None, decision.reason
        sealed = sealer.seal_change(dv, kind, decision.link, writes, 1_700_000_000_000 + n)
        msgs.append(wire.FetchRecord(dv, int(kind), decision.link, sealed, 0))
        tip = advance(tip, dv, kind, item_hash(sealed), decision=decision)
    count = len(msgs) - 1 - len(chunks)
    msgs.append(wire.FetchEnd(count))
    return Backup(msgs, node, pubkey_of(CLIENT_PRIV), dv)


async def _stream(msgs: list[wire.Message]) -> AsyncIterator[wire.Message]:
    for m in msgs:
        yield m


def run_rebuild(backup: Backup, path: Path, messages: list[wire.Message] | None = None,
                at: int = -1, progress: restore.Progress | None = None,
                isolated: bool = False) -> restore.Rebuilt:
    """``isolated=False``: the replay in the rebuild's thread (a unit test starts no
    process); the tests named in markers.E2E_TESTS run it in its child process."""
    class Fake:
        spec = "fake:1"

        def fetch(self, at_data_version: int = -1) -> AsyncIterator[wire.Message]:
            return _stream(messages if messages is not None else backup.messages)

    return asyncio.run(restore.rebuild(Fake(), backup.node, backup.client_pub, path, at=at,
                                       progress=progress, isolated=isolated))


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    return sealed_backup(tmp_path_factory.mktemp("sealed"), split=40)


def test_rebuild_from_empty_snapshot_equals_the_real_node(tmp_path: Path) -> None:
    backup = sealed_backup(tmp_path, split=0)
    seen: list[int] = []
    result = run_rebuild(backup, tmp_path / "out.sqlite3",
                         progress=restore.Progress(replay=seen.append))
    assert sqlite_dump_bytes(result.path) == expected_dump_bytes("cln-channels")
    assert result.data_version == backup.data_version
    assert result.snapshot_data_version == 0 and result.snapshot_bytes == 0
    assert seen[-1] == result.records == len(backup.records())


def test_rebuild_from_a_mid_trace_snapshot(tmp_path: Path, channels: Backup) -> None:
    sizes: list[tuple[int, int]] = []
    result = run_rebuild(channels, tmp_path / "out.sqlite3",
                         progress=restore.Progress(download=lambda d, t: sizes.append((d, t))))
    assert sqlite_dump_bytes(result.path) == expected_dump_bytes("cln-channels")
    assert result.snapshot_data_version > 0
    assert sizes[0][0] == 0 and sizes[-1][0] == sizes[-1][1] == result.snapshot_bytes
    assert result.newest_time_ms == 1_700_000_000_000 + len(channels.records()) - 1


def test_crash_restart_trace_drops_the_uncommitted_batch(tmp_path: Path) -> None:
    backup = sealed_backup(tmp_path, trace="cln-crash-restart", split=5)
    result = run_rebuild(backup, tmp_path / "out.sqlite3")
    assert sqlite_dump_bytes(result.path) == expected_dump_bytes("cln-crash-restart")


def test_rebuild_at_a_data_version(tmp_path: Path, channels: Backup) -> None:
    target = channels.messages[channels.records()[30]].data_version  # type: ignore[attr-defined]
    result = run_rebuild(channels, tmp_path / "out.sqlite3", at=target)
    assert result.data_version == target
    con = sqlite3.connect(result.path)
    assert con.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone() == (
        target,)
    con.close()
    with pytest.raises(RecoveryError, match="behind"):
        run_rebuild(channels, tmp_path / "late.sqlite3", at=channels.data_version + 5)
    assert not (tmp_path / "late.sqlite3").exists()


def _record(backup: Backup, n: int) -> tuple[int, wire.FetchRecord]:
    idx = backup.records()[n]
    msg = backup.messages[idx]
    assert isinstance(msg, wire.FetchRecord)
    return idx, msg


def _expect_failure(backup: Backup, tmp_path: Path, msgs: list[wire.Message],
                    exc: type[Exception], match: str) -> None:
    out = tmp_path / "out.sqlite3"
    with pytest.raises(exc, match=match):
        run_rebuild(backup, out, messages=msgs)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_altered_record_is_named(tmp_path: Path, channels: Backup) -> None:
    idx, rec = _record(channels, 20)
    sealed = bytearray(rec.sealed)
    sealed[60] ^= 1
    msgs = list(channels.messages)
    msgs[idx] = replace(rec, sealed=bytes(sealed))
    _expect_failure(channels, tmp_path, msgs, ChainError,
                    rf"record #20 \(data_version {rec.data_version}\) does not open")


def test_reordered_records_are_named(tmp_path: Path, channels: Backup) -> None:
    i, a = _record(channels, 20)
    j, b = _record(channels, 21)
    msgs = list(channels.messages)
    msgs[i], msgs[j] = b, a
    _expect_failure(channels, tmp_path, msgs, ChainError,
                    rf"record #20 \(data_version {b.data_version}\)")


def test_dropped_middle_record_is_named(tmp_path: Path, channels: Backup) -> None:
    i, _dropped = _record(channels, 20)
    _, nxt = _record(channels, 21)
    msgs = list(channels.messages)
    del msgs[i]
    msgs[-1] = wire.FetchEnd(len(channels.records()) - 1)
    _expect_failure(channels, tmp_path, msgs, ChainError,
                    rf"record #20 \(data_version {nxt.data_version}\)")


def test_records_are_replayed_beside_the_stream(tmp_path: Path, channels: Backup) -> None:
    """The replay runs in a worker thread, in batches, while the event loop receives and
    verifies: the same database, every record applied once, in order."""
    seen: list[tuple[str, int]] = []
    progress = restore.Progress(replay=lambda n: seen.append(
        (threading.current_thread().name, n)))
    result = run_rebuild(channels, tmp_path / "out.sqlite3", progress=progress)
    assert result.data_version == channels.data_version
    assert seen and all(name != threading.main_thread().name for name, _ in seen)
    counts = [n for _, n in seen]
    assert counts == sorted(counts) and counts[-1] == len(channels.records())
    assert len(counts) < len(channels.records())     # in batches, not one call per record


def test_nothing_after_a_bad_record_is_applied(tmp_path: Path, channels: Backup) -> None:
    """An altered record several replay batches in: the batches before it were applied
    (in the worker), nothing from it on, and no file is left."""
    n = 3 * restore.REPLAY_BATCH + 7
    idx, rec = _record(channels, n)
    sealed = bytearray(rec.sealed)
    sealed[60] ^= 1
    msgs = list(channels.messages)
    msgs[idx] = replace(rec, sealed=bytes(sealed))
    applied: list[int] = []
    out = tmp_path / "out.sqlite3"
    with pytest.raises(ChainError, match=rf"record #{n} \(data_version {rec.data_version}\)"):
        run_rebuild(channels, out, messages=msgs,
                    progress=restore.Progress(replay=applied.append))
    assert applied and max(applied) <= n
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_relinked_record_is_named(tmp_path: Path, channels: Backup) -> None:
    # A server that rewrites the clear link to splice: the link is in the AEAD's data.
    i, rec = _record(channels, 20)
    msgs = list(channels.messages)
    msgs[i] = replace(rec, link=bytes(32))
    _expect_failure(channels, tmp_path, msgs, ChainError, r"record #20")


def test_altered_or_missing_chunks(tmp_path: Path, channels: Backup) -> None:
    chunk = channels.messages[2]
    assert isinstance(chunk, wire.FetchChunk)
    bad = bytearray(chunk.sealed)
    bad[-1] ^= 1
    msgs = list(channels.messages)
    msgs[2] = replace(chunk, sealed=bytes(bad))
    _expect_failure(channels, tmp_path, msgs, SealError, r"snapshot chunk 1 .*does not open")
    msgs = list(channels.messages)
    del msgs[2]
    _expect_failure(channels, tmp_path, msgs, SealError, r"chunk 2 arrived where chunk 1")
    first = channels.messages[0]
    assert isinstance(first, wire.FetchSnapshot)
    n = first.chunk_count
    msgs = [replace(first, chunk_count=n - 1)] + channels.messages[1:n] + \
        channels.messages[n + 1:]
    _expect_failure(channels, tmp_path, msgs, SealError, r"announced")


def test_wrong_counts_and_truncated_streams(tmp_path: Path, channels: Backup) -> None:
    msgs = list(channels.messages)
    msgs[-1] = wire.FetchEnd(5)
    _expect_failure(channels, tmp_path, msgs, SealError, r"says it sent 5")
    _expect_failure(channels, tmp_path, channels.messages[:-1], SealError, r"ended early")
    _expect_failure(channels, tmp_path, [], SealError, r"did not start with a snapshot")


def test_other_client_or_node_cannot_open(tmp_path: Path, channels: Backup) -> None:
    other = replace(channels, client_pub=pubkey_of(bytes.fromhex("22" * 32)))
    _expect_failure(other, tmp_path, channels.messages, SealError, r"manifest")


def test_withheld_newest_records_still_rebuild_an_older_state(tmp_path: Path,
                                                             channels: Backup) -> None:
    # One server alone cannot tell it was cut short: that is what several servers are for.
    keep = channels.records()[-5]
    msgs = channels.messages[:keep] + [wire.FetchEnd(len(channels.records()) - 5)]
    result = run_rebuild(channels, tmp_path / "out.sqlite3", messages=msgs)
    assert result.data_version < channels.data_version


def test_failing_statement_names_the_record(tmp_path: Path) -> None:
    node = vector_node_key()
    backup = sealed_backup(tmp_path, split=40, node=node)
    # Seal a record whose SQL cannot run (as a compromised client could), keeping the chain.
    first = backup.messages[0]
    assert isinstance(first, wire.FetchSnapshot)
    start = first.data_version
    sealer = RecordSealer(node.pubkey, CLIENT_PRIV, bytes([9]) * 32)
    tip = snapshot_tip(start, first.anchor)
    decision = decide(tip, start + 1, classify(["UPDATE nope SET x=1"]))
    assert decision.link is not None
    sealed = sealer.seal_change(start + 1, classify(["UPDATE nope"]), decision.link,
                                ["UPDATE nope SET x = 1"], 0)
    n = first.chunk_count
    msgs = backup.messages[:n + 1] + [
        wire.FetchRecord(start + 1, 0, decision.link, sealed, 0), wire.FetchEnd(1)]
    with pytest.raises(ReplayError, match=r"fake:1: record 0 \(data_version"):
        run_rebuild(backup, tmp_path / "out.sqlite3", messages=msgs)
    assert not (tmp_path / "out.sqlite3").exists()


def test_install_never_overwrites(tmp_path: Path, channels: Backup) -> None:
    dest = tmp_path / "lightningd.sqlite3"
    tmp = restore.temp_path(dest)
    assert tmp.parent == tmp_path and tmp.name.startswith(".")
    result = run_rebuild(channels, tmp)
    dest.write_bytes(b"precious")
    with pytest.raises(RecoveryError, match="already exists"):
        restore.install(result.path, dest)
    assert dest.read_bytes() == b"precious"
    dest.unlink()
    (tmp_path / "lightningd.sqlite3-journal").write_bytes(b"hot journal")
    with pytest.raises(RecoveryError, match="journal already exists"):
        restore.install(result.path, dest)
    (tmp_path / "lightningd.sqlite3-journal").unlink()
    restore.install(result.path, dest)
    assert not tmp.exists()
    assert sqlite_dump_bytes(dest) == expected_dump_bytes("cln-channels")
    assert (dest.stat().st_mode & 0o777) == 0o600


def test_stale_scratch_files_of_killed_runs_are_removed(tmp_path: Path) -> None:
    dest = tmp_path / "lightningd.sqlite3"
    mine = restore.temp_path(dest, "recover")
    mine.write_bytes(b"in use")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".lightningd.sqlite3.cldcb-{dead.pid}-0-recover.tmp"
    stale.write_bytes(b"left over")
    Path(f"{stale}-journal").write_bytes(b"left over")
    other = tmp_path / ".something-else.tmp"
    other.write_bytes(b"not ours")
    removed = restore.remove_stale_scratch(dest)
    assert sorted(removed) == sorted([stale, Path(f"{stale}-journal")])
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, other.name])


@pytest.mark.parametrize("module", ["cldcb.client.recover", "cldcb.client.status",
                                    "cldcb.client.verify", "cldcb.node.restore",
                                    "cldcb.client.install", "cldcb.client.install_ssh",
                                    "cldcb.client.app"])
def test_modules_import_first_without_cycles(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {module}; "
                           "from cldcb.client.app import main; "
                           "assert {'recover', 'status', 'verify', 'install', 'installplugin',"
                           " 'uninstallplugin', 'sshkey', 'newclient', 'nodeid'}"
                           " <= set(main.commands)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- the replay in a process of its own (e2e: markers.E2E_TESTS names these) ----------


@pytest.mark.parametrize("split", [0, 40])
def test_isolated_rebuild_gives_the_same_database(tmp_path: Path, split: int) -> None:
    backup = sealed_backup(tmp_path, split=split)
    seen: list[int] = []
    result = run_rebuild(backup, tmp_path / "out.sqlite3", isolated=True,
                         progress=restore.Progress(replay=seen.append))
    assert sqlite_dump_bytes(result.path) == expected_dump_bytes("cln-channels")
    assert result.data_version == backup.data_version
    assert seen == sorted(seen) and seen[-1] == result.records == len(backup.records())


def test_isolated_replay_fails_as_the_replayer_does(tmp_path: Path) -> None:
    calls = load_trace("cln-crash-restart")
    db = tmp_path / "out.sqlite3"
    replay_trace("cln-crash-restart", db, calls=slice(0, 5))
    bump = "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 5"
    bad = "INSERT INTO no_such_table VALUES (0, x'" + "ab" * 40 + "')"
    changes = [Change(dv, classify(w), tuple(w), 0) for dv, w in calls[5:7]]
    changes.append(Change(6, Kind.NORMAL, (bump, bad), 0))
    child = ReplayProcess(db)
    try:
        assert child.open() == 3
        with pytest.raises(ReplayError) as caught:
            child.apply(changes, None)
            child.finish()
        assert str(caught.value).startswith("record 2 (data_version 6): statement 2 of 2 "
                                            "failed: no such table: no_such_table")
        assert "ab" * 40 not in str(caught.value)
    finally:
        child.close()
    assert child._proc.returncode == 1
    # the child closed the database: 5 kept (6's decision kept it before 6 ran), 6 undone
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT intval FROM vars WHERE name = 'data_version'"
                           ).fetchone() == (5,)
    finally:
        con.close()


def test_a_replay_process_that_dies_fails_the_rebuild(tmp_path: Path) -> None:
    db = tmp_path / "out.sqlite3"
    replay_trace("cln-crash-restart", db, calls=slice(0, 5))
    change = Change(3, Kind.NORMAL, tuple(load_trace("cln-crash-restart")[5][1]), 0)
    child = ReplayProcess(db)
    try:
        assert child.open() == 3
        child._proc.kill()
        child._proc.wait()
        with pytest.raises(RecoveryError, match=r"the replay process ended unexpectedly "
                           r"\(exit status -9\)"):
            for _ in range(AHEAD + 2):
                child.apply([change], None)
    finally:
        child.close()


def test_a_replay_process_that_cannot_start_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-python"
    monkeypatch.setattr(sys, "executable", str(missing))
    with pytest.raises(RecoveryError, match=r"cannot start the replay process \(.*"
                       r"no-such-python: No such file or directory\)"):
        ReplayProcess(tmp_path / "out.sqlite3")


def test_the_replay_process_ignores_a_cldcb_in_the_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # recover runs from wherever the operator is (the README: cd ~/.lightning): a cldcb
    # package there must not be what the child imports (python -P: no cwd on sys.path)
    planted = tmp_path / "planted"
    (planted / "cldcb").mkdir(parents=True)
    marker = tmp_path / "ran"
    (planted / "cldcb" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n")
    db = tmp_path / "out.sqlite3"
    replay_trace("cln-crash-restart", db, calls=slice(0, 5))
    monkeypatch.chdir(planted)
    child = ReplayProcess(db)
    try:
        assert child.open() == 3
        assert child.finish() == 3
    finally:
        child.close()
    assert not marker.exists()
