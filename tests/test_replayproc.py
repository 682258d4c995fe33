"""The rebuild's replay in a child process (cldcb.replayproc): the same database as the
Replayer in this process, its errors raised here with their message, a child that dies
named, nothing left running or on disk."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest
from test_recover_core import Backup, run_rebuild, sealed_backup
from traces import load_trace, replay_trace, sqlite_dump_bytes

from cldcb import replayproc, restore
from cldcb.dataversion import classify
from cldcb.errors import ReplayError
from cldcb.seal import Change


def _changes(trace: str) -> list[Change]:
    return [Change(dv, classify(w), tuple(w), 0) for dv, w in load_trace(trace)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("trace", ["cln-channels", "cln-crash-restart"])
def test_the_child_rebuilds_the_same_database(tmp_path: Path, trace: str) -> None:
    """Batches applied in the child give the .dump the Replayer gives in this process (the
    crash-restart trace: the uncommitted batch dropped), and the child ends on close."""
    ref = tmp_path / "ref.sqlite3"
    replay_trace(trace, ref)
    out = tmp_path / "out.sqlite3"
    proc = replayproc.ReplayProcess(out)
    pid = proc.pid
    assert pid is not None and pid != os.getpid()
    counts: list[int] = []
    try:
        assert proc.open() == 0
        changes = _changes(trace)
        for i in range(0, len(changes), 7):
            proc.apply(changes[i:i + 7], counts.append)
        assert proc.finish() == changes[-1].data_version
    finally:
        proc.close()
    assert _gone(pid)
    assert counts[-1] == len(_changes(trace))
    assert sqlite_dump_bytes(out) == sqlite_dump_bytes(ref)


def test_an_error_in_the_child_is_raised_with_its_message(tmp_path: Path) -> None:
    out = tmp_path / "out.sqlite3"
    proc = replayproc.ReplayProcess(out)
    try:
        proc.open()
        with pytest.raises(ReplayError, match=r"record 0 \(data_version 1\): statement 1 of 1 "
                           r"failed: no such table: nope"):
            proc.apply([Change(1, classify(["UPDATE nope SET x = 1"]),
                               ("UPDATE nope SET x = 1",), 0)], None)
    finally:
        proc.close()


def test_a_killed_child_is_named_and_the_rebuild_leaves_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """The child killed in the middle of a rebuild: the rebuild raises a ReplayError saying
    the replay process ended, and no file is left."""
    backup: Backup = sealed_backup(tmp_path, split=40)
    made: list[replayproc.ReplayProcess] = []

    class Killed(replayproc.ReplayProcess):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            made.append(self)

        def apply(self, changes: list[Change], done: object) -> None:
            assert self.pid is not None
            os.kill(self.pid, signal.SIGKILL)
            super().apply(changes, None)

    monkeypatch.setattr(restore, "ReplayProcess", Killed)
    out = tmp_path / "out.sqlite3"
    with pytest.raises(ReplayError, match=r"fake:1: the replay process ended unexpectedly "
                       r"\(killed by signal 9\)"):
        run_rebuild(backup, out)
    assert made and made[0].pid is None
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_the_child_ends_when_its_parent_goes(tmp_path: Path) -> None:
    """End of input (the parent died) : the child closes its database, keeping what was
    applied, and ends."""
    out = tmp_path / "out.sqlite3"
    proc = replayproc.ReplayProcess(out)
    changes = _changes("cln-channels")
    proc.open()
    proc.apply(changes[:5], None)
    child = proc._proc
    assert child is not None and child.stdin is not None
    child.stdin.close()
    assert child.wait(60) == 0
    proc.close()
    con = sqlite3.connect(out)
    try:
        (dv,) = con.execute("SELECT intval FROM vars WHERE name = 'data_version'").fetchone()
    finally:
        con.close()
    assert dv == max(c.data_version for c in changes[:4])
