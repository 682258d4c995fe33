"""Kill a real process that uses the store at every named crash point, then reopen.

``tests/store_crash_child.py`` drives the store and prints each step only after
the store returned. For each crash point the child runs with
``CLDCB_CRASHPOINT`` set, dies by SIGKILL there, and this process reopens the
data directory and demands: it opens; the chain fetched from the newest
snapshot verifies (every AEAD tag, every link) and ends at the newest
acknowledged item, or at the one in flight when the process died; the newest
acknowledged snapshot is still fetchable; registrations and recognition
entries are as acknowledged; a further record continues the chain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from store_crash_child import OTHER_PRIV, Writer, client_id, client_pub, verify

from cldcb.store import Store, Stored

CHILD = Path(__file__).parent / "store_crash_child.py"

CRASH_POINTS = [
    "store.before_mkdir", "store.after_mkdir", "store.after_fsync_dir",
    "client.before_mkdir", "client.after_mkdir", "client.after_fsync_dir",
    "settings.before_write", "settings.after_write", "settings.after_fsync",
    "settings.after_rename", "settings.after_fsync_dir",
    "recognition.before_write", "recognition.after_write", "recognition.after_fsync",
    "recognition.after_rename", "recognition.after_fsync_dir",
    "client_dirs.before_mkdir", "client_dirs.after_mkdir", "client_dirs.after_fsync_dir",
    "seen.before_write", "seen.after_write", "seen.after_fsync", "seen.after_rename",
    "seen.after_fsync_dir",
    "snapshot.before_create_temp", "snapshot.after_create_temp",
    "snapshot.before_chunk_write", "snapshot.after_chunk_write",
    "snapshot.before_manifest_write", "snapshot.after_manifest_write", "snapshot.after_fsync",
    "snapshot.before_rename", "snapshot.after_rename", "snapshot.after_fsync_dir",
    "snapshot.after_commit", "snapshot.before_abort_unlink", "snapshot.after_abort_unlink",
    "segment.before_create", "segment.after_create", "segment.after_fsync_dir",
    "segment.before_zero", "segment.after_zero", "segment.before_trim", "segment.after_trim",
    "record.before_write", "record.after_write", "record.after_fsync",
    "prune.before", "prune.before_unlink_snapshot", "prune.after_unlink_snapshot",
    "prune.after_fsync_snapshot_dir", "prune.before_unlink_segment",
    "prune.after_unlink_segment", "prune.after_fsync_log_dir", "prune.done",
    "remove.before_rename", "remove.after_rename", "remove.after_fsync_dirs",
    "remove.after_move_recognition",
    "open.before_discard_temp", "open.after_discard_temp",
    "repair.before_save_tail", "repair.after_save_write", "repair.after_save_fsync",
    "repair.before_truncate", "repair.after_truncate", "repair.after_fsync",
]

# later passes of the same points: mid-chain, the compaction, the gap snapshot, the
# first real pruning, a settings update, a later segment roll, the second reopen
REPEATS = [
    "record.after_write@7", "record.after_fsync@9", "record.before_write@20",
    "snapshot.after_rename@2", "snapshot.after_fsync_dir@3", "snapshot.after_commit@3",
    "snapshot.after_chunk_write@5", "snapshot.after_manifest_write@4",
    "prune.after_unlink_snapshot@2", "prune.after_unlink_segment@2",
    "segment.after_create@3", "settings.after_rename@3", "recognition.after_rename@2",
]


def test_enough_distinct_crash_points() -> None:
    assert len(set(CRASH_POINTS)) == len(CRASH_POINTS) >= 50


@dataclass
class Outcome:
    done: dict[str, list[dict]] = field(default_factory=dict)   # acknowledged steps by kind
    tips: list[str] = field(default_factory=list)               # tip after each acked step
    inflight: dict | None = None                                # the step begun, not done


def parse(stdout: str) -> Outcome:
    out = Outcome()
    for line in stdout.splitlines():
        ev = json.loads(line)
        if ev["ev"] == "begin":
            out.inflight = ev
            continue
        out.done.setdefault(ev["ev"], []).append(ev)
        if ev["ev"] == "record":
            out.tips.append(ev["hash"])
        elif ev["ev"] == "snapshot" and not ev["anchored"]:
            out.tips.append(ev["anchor"])
        if out.inflight is not None and out.inflight["op"] == ev["ev"]:
            out.inflight = None
    return out


def run_child(data: Path, point: str | None, log: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("CLDCB_CRASHPOINT", None)
    if point:
        env["CLDCB_CRASHPOINT"] = point
        env["CLDCB_CRASHPOINT_LOG"] = str(log)
    return subprocess.run([sys.executable, str(CHILD), str(data)], env=env, text=True,
                          capture_output=True, timeout=60)


def point_info(out: Outcome) -> str:
    return f"in flight: {out.inflight}; last tips {out.tips[-2:]}"


def check_after_crash(data: Path, out: Outcome) -> None:
    store = Store.open(data)
    cid, other = client_id(), client_id(OTHER_PRIV)
    added = [e["client"] for e in out.done.get("added", [])]
    removing = out.inflight is not None and out.inflight["op"] == "removed"
    if cid in added:
        assert store.is_registered(cid)
    if other in added and not out.done.get("removed") and not removing:
        assert store.is_registered(other)
    if out.done.get("removed"):
        assert not store.is_registered(other)
        assert list((data / "removed").iterdir()), "removed data must be kept aside"
    if not store.is_registered(cid):
        assert not out.done.get("snapshot")
        store.close()
        return
    entries = store.list_recognitions()
    recs = out.done.get("recognition", [])
    if recs:
        allowed = {bytes.fromhex(recs[-1]["entry"])}
        if out.inflight and out.inflight["op"] == "recognition":
            allowed.add(bytes.fromhex(out.inflight["entry"]))
        mine = [e for e in entries if e[1:34] == client_pub()]
        assert len(mine) == 1 and mine[0] in allowed, entries
    if any(e[1:34] == client_pub(OTHER_PRIV) for e in entries):
        assert store.is_registered(other), "an unregistered client's entry is listed"
    elif out.done.get("recognition_other") and store.is_registered(other):
        raise AssertionError("an acknowledged recognition entry is missing")
    cs = store.client(cid)
    assert not list((data / "clients" / cid / "snapshots").glob("*.part"))
    status = cs.status()
    allowed_tips = set(out.tips[-1:])
    if out.inflight and "tip" in out.inflight:
        allowed_tips.add(out.inflight["tip"])
    snaps = out.done.get("snapshot", [])
    if not snaps:
        if not (out.inflight and out.inflight["op"] == "snapshot"):
            assert status.tip is None
    else:
        assert status.tip is not None and status.tip.hash.hex() in allowed_tips, (
            status, out.tips[-3:], out.inflight)
        fetched = verify(cs)
        assert fetched is not None and fetched.tip.hash == status.tip.hash
        last = snaps[-1]
        at = verify(cs, last["dv"])
        assert at is not None and at.anchor.hex() == last["anchor"]
        # acknowledged records after it: in the chain up to the newest of them (a fresh
        # snapshot committed in flight starts a later chain; fetch(N) gives the one before)
        acked = [e for e in out.done.get("record", []) if e["dv"] > last["dv"]]
        if acked:
            upto = verify(cs, max(e["dv"] for e in acked))
            assert upto is not None
            held = {h.hex() for _, h in upto.records}
            for e in acked:
                assert e["hash"] in held or e["dv"] <= upto.snapshot_dv, (e, point_info(out))
    # a further record (after a snapshot if nothing is held) continues the chain
    w = Writer(cs, seed=99)
    if w.tip is None:
        w.snapshot(5)
    nxt = w.tip.data_version + 1
    res = w.change(nxt)
    assert isinstance(res, Stored), res
    again = verify(cs)
    assert again is not None and again.tip == w.tip
    store.close()
    reopened = Store.open(data)
    assert reopened.client(cid).status().tip.hash == w.tip.hash
    reopened.close()


def test_child_runs_to_the_end(tmp_path: Path) -> None:
    res = run_child(tmp_path, None, tmp_path / "unused")
    assert res.returncode == 0, res.stderr
    out = parse(res.stdout)
    assert "done" in out.done and out.inflight is None
    check_after_crash(tmp_path, out)


@pytest.mark.parametrize("point", CRASH_POINTS + REPEATS)
def test_crash_at(point: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "reached.log"
    res = run_child(data, point, log)
    assert res.returncode == -signal.SIGKILL, (
        f"the child did not die at {point} (rc {res.returncode}): {res.stderr[-2000:]}")
    assert log.read_text().split() == [point.split("@")[0]]
    out = parse(res.stdout)
    assert "done" not in out.done
    check_after_crash(data, out)
