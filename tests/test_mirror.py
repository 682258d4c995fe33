"""The plugin's local mirror (``cldcb.plugin.mirror``) end to end.

Real processes: the simulated lightningd runs the real plugin through its
wrapper against ``cldcb-server serve`` on 127.0.0.1; the mirror is compared
with the node's database by the ``sqlite3`` program's ``.dump``, and what the
servers hold is fetched, unsealed, verified and rebuilt. Waits are bounded
and wait for a state the plugin reports (its status file, its log), never
for time to pass.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.plugin_harness import (
    Keys,
    Target,
    assert_no_stray_copies,
    logs_matching,
    make_node,
    new_keys,
    plugin_status,
    restored_dump,
    server_status,
    wait_until,
)
from helpers.realcln import RealCln, data_version, dump, wait_for
from helpers.simlightningd import SimLightningd
from helpers.traces import TRACES, expected_dump, load_trace, sqlite_dump
from test_plugin_e2e import play
from test_plugin_faults import normal_call_at_or_after
from test_realcln import daemon_for_client, daemon_server

from cldcb.core.dataversion import Kind
from cldcb.plugin.mirror import MIRROR_NAME, Mirror, MirrorUnusable
from cldcb.plugin.snapshot import LocalCopy

WORKLOAD = "cln-workload"
THROWN_AWAY = "the mirror is thrown away"
Daemons = Callable[[int], list[Target]]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """``daemons(n)`` starts n ``cldcb-server serve`` (stopped at the end)."""
    started: list[Target] = []

    def start(n: int) -> list[Target]:
        new = [Target.new_daemon(tmp_path / f"server-{len(started) + i}") for i in range(n)]
        started.extend(new)
        return new

    yield start
    for t in started:
        t.stop()


def mirror_of(node: SimLightningd) -> Path:
    return node.network_dir / MIRROR_NAME


def wait_mirror_in_step(node: SimLightningd, timeout: float = 60) -> None:
    """Until the status file shows the mirror holding what lightningd committed (the
    plugin applies the last change once the live database shows it committed)."""
    want = node.committed_data_version()

    def in_step() -> bool:
        m = plugin_status(node).get("mirror", {})
        return m.get("state") == "in-step" and m.get("data_version") == want

    wait_until(in_step, timeout, f"the mirror to hold data_version {want}")


def wait_connected(node: SimLightningd, target: Target) -> None:
    name = target.entry.address
    wait_until(lambda: any(x["address"] == name and x["connected"]
                           for x in plugin_status(node)["servers"]), 30,
               f"the plugin to reconnect to {name}")


def play_with_b_returning(node: SimLightningd, keys: Keys, daemon_b: Target,
                          also: Callable[[int, SimLightningd], None] | None = None) -> None:
    """Play the workload with server B (quorum 1) stopped from call 250 to call 450, until
    B holds the newest change again (a catch-up snapshot)."""
    trace = load_trace(WORKLOAD)
    k1 = normal_call_at_or_after(trace, 250)
    k2 = normal_call_at_or_after(trace, 450)

    def before(i: int, node: SimLightningd) -> None:
        if also is not None:
            also(i, node)
        if i == k1:
            daemon_b.kill()
        elif i == k2:
            daemon_b.restart()
            wait_connected(node, daemon_b)

    node.start()
    try:
        node.run_trace(trace, before_call=before)
        wait_until(lambda: server_status(daemon_b, keys).tip_data_version == trace[-1][0], 60,
                   "server B to be caught up", step=0.5)
    finally:
        node.close()


@pytest.mark.parametrize("name", TRACES)
def test_mirror_equals_the_database_after_each_trace(name: str, daemons: Daemons,
                                                     tmp_path: Path) -> None:
    """Crash and restart (a batch sent twice, the plugin restarted), channels, PRAGMA-only
    calls, repeated data_version: the mirror ends byte-for-byte like the node."""
    node = make_node(tmp_path, new_keys(), daemons(1))
    play(node, name)
    want = expected_dump(name)
    assert sqlite_dump(node.db_path) == want, "the simulated node itself diverged"
    mirror = mirror_of(node)
    assert sqlite_dump(mirror) == want
    assert mirror.stat().st_mode & 0o777 == 0o600
    assert not logs_matching(node, THROWN_AWAY), node.log_messages()
    assert logs_matching(node, "mirror rebuilt at data_version")   # from the first snapshot
    assert plugin_status(node)["mirror"]["state"] == "in-step"
    assert_no_stray_copies(node)


def test_mirror_off_copies_the_database_as_before(daemons: Daemons, tmp_path: Path) -> None:
    keys = new_keys()
    (daemon,) = daemons(1)
    node = make_node(tmp_path, keys, [daemon], mirror=False)
    name = "cln-crash-restart"
    play(node, name)
    assert restored_dump(daemon, keys, tmp_path / "restored.sqlite3") == expected_dump(name)
    assert not mirror_of(node).exists()
    assert plugin_status(node)["mirror"] == {"state": "off"}
    assert not logs_matching(node, "mirror")


def test_mirror_survives_a_plugin_sigkill_and_restart(daemons: Daemons,
                                                     tmp_path: Path) -> None:
    trace = load_trace(WORKLOAD)
    k = normal_call_at_or_after(trace, 300)
    node = make_node(tmp_path, new_keys(), daemons(1))
    node.start()
    try:
        node.run_trace(trace, stop=k)
        wait_mirror_in_step(node)
        node.kill_plugin()                           # SIGKILL
    finally:
        node.crash()
    play(node, WORKLOAD, start=k, init_after=k + 1)     # lightningd and the plugin again
    assert logs_matching(node, f"mirror at data_version {trace[k - 1][0]}"), \
        node.log_messages()
    assert not logs_matching(node, THROWN_AWAY), node.log_messages()
    assert sqlite_dump(mirror_of(node)) == sqlite_dump(node.db_path) == expected_dump(WORKLOAD)


def test_a_mirror_behind_the_database_at_start_is_thrown_away(daemons: Daemons,
                                                             tmp_path: Path) -> None:
    """A mirror that lost committed changes (here: its data_version set back by hand) is
    thrown away at start, never used; the next snapshot copies the database."""
    trace = load_trace(WORKLOAD)
    k = normal_call_at_or_after(trace, 200)
    node = make_node(tmp_path, new_keys(), daemons(1))
    play(node, WORKLOAD, stop=k)
    mirror = mirror_of(node)
    with sqlite3.connect(mirror) as con:
        con.execute("UPDATE vars SET intval = intval - 1 WHERE name = 'data_version'")
    con.close()
    play(node, WORKLOAD, start=k, stop=k + 5, init_after=k + 1)
    logs = node.log_messages()
    thrown = [i for i, m in enumerate(logs) if THROWN_AWAY in m]
    # seen at start (the mirror's data_version against the database's), or, when the
    # database was locked at that moment, at the first change (which cannot follow it)
    at_start = f"but the database {trace[k - 1][0]}"
    at_first_change = f"change {trace[k][0]} cannot follow it"
    assert len(thrown) == 1, logs
    assert at_start in logs[thrown[0]] or at_first_change in logs[thrown[0]], logs
    after = logs[thrown[0]:]
    assert not [m for m in after if "snapshot of the mirror at" in m], after
    # if a snapshot was taken meanwhile (a compaction: the server's log outgrew the first,
    # empty snapshot; or a catch-up the quorum waited for), it was copied from the
    # database, and that copy rebuilt the mirror
    rebuilt = [m for m in after if "mirror rebuilt at data_version" in m]
    assert mirror.exists() == bool(rebuilt), after
    if rebuilt:
        assert [m for m in after if "copied the database at data_version" in m], after
        assert sqlite_dump(mirror) == sqlite_dump(node.db_path)


def test_catch_up_from_the_mirror_recovers_byte_identical(daemons: Daemons,
                                                          tmp_path: Path) -> None:
    """Two servers, quorum 1: B is stopped, comes back and is caught up by a snapshot
    copied from the mirror (no hook call copies the database); both servers' backups
    rebuild byte-identical to the node."""
    keys = new_keys()
    daemon, daemon_b = daemons(2)
    node = make_node(tmp_path, keys, [daemon, daemon_b], quorum=1)
    play_with_b_returning(node, keys, daemon_b)
    from_mirror = logs_matching(node, "snapshot of the mirror at data_version")
    assert from_mirror, node.log_messages()
    assert len(logs_matching(node, "copied the database at data_version")) == 1, \
        "only the first-contact snapshot may copy the database"
    assert len(logs_matching(node, "blocking snapshot")) == 1      # the first contact
    # B's newest snapshot (its catch-up, or a compaction after it) was copied from the mirror
    mirror_dvs = {int(m.split("data_version ")[1].split()[0]) for m in from_mirror}
    assert server_status(daemon_b, keys).snapshot_data_version in mirror_dvs, from_mirror
    want = expected_dump(WORKLOAD)
    assert sqlite_dump(node.db_path) == want
    for i, t in enumerate([daemon, daemon_b]):
        assert restored_dump(t, keys, tmp_path / f"restored-{i}.sqlite3") == want, i
    assert sqlite_dump(mirror_of(node)) == want
    assert_no_stray_copies(node)


def test_a_corrupted_mirror_is_detected_and_the_next_snapshot_copies_the_database(
        daemons: Daemons, tmp_path: Path) -> None:
    k0 = normal_call_at_or_after(load_trace(WORKLOAD), 150)
    keys = new_keys()
    daemon, daemon_b = daemons(2)
    node = make_node(tmp_path, keys, [daemon, daemon_b], quorum=1)

    def corrupt(i: int, node: SimLightningd) -> None:
        if i == k0:
            wait_mirror_in_step(node)
            with sqlite3.connect(mirror_of(node), timeout=30) as con:
                con.execute("INSERT INTO vars (name, val) VALUES ('cldcb-test', 'corrupt')")
            con.close()
            wait_until(lambda: plugin_status(node)["mirror"]["state"] == "discarded", 120,
                       "the check to find the difference")

    play_with_b_returning(node, keys, daemon_b, corrupt)
    logs = node.log_messages()

    def where(text: str) -> list[int]:
        return [i for i, m in enumerate(logs) if text in m]

    thrown = where(THROWN_AWAY)
    assert len(thrown) == 1 and "table vars differs" in logs[thrown[0]], logs
    # the next snapshot (a compaction, or B's catch-up at the latest) is copied from the
    # database in a hook call, and rebuilds the mirror; later ones come from the mirror
    copied = [i for i in where("mirror is not usable: copying the database") if i > thrown[0]]
    rebuilt = [i for i in where("mirror rebuilt at data_version") if i > thrown[0]]
    assert copied and rebuilt and copied[0] < rebuilt[0], logs
    assert not [i for i in where("snapshot of the mirror at") if thrown[0] < i < rebuilt[0]], logs
    want = expected_dump(WORKLOAD)
    for i, t in enumerate([daemon, daemon_b]):
        assert restored_dump(t, keys, tmp_path / f"restored-{i}.sqlite3") == want, i
    assert sqlite_dump(mirror_of(node)) == want
    assert_no_stray_copies(node)


@pytest.mark.realcln
@pytest.mark.slow
def test_mirror_on_a_real_lightningd(realcln: RealCln, tmp_path: Path) -> None:
    """installplugin on a running node, a real workload: the mirror follows it, its check
    finds it equal while lightningd runs, and after a stop (and a restart with more work)
    it is byte-identical to lightningd's database."""
    server, client = daemon_for_client(tmp_path)
    try:
        node = realcln.node("m").start()
        client.installplugin(node, [daemon_server(server)])
        mirror = node.network_dir / MIRROR_NAME
        status = node.network_dir / "cldcb-status.json"

        def checked_in_step() -> bool:
            m = json.loads(status.read_text()).get("mirror", {})
            return (m.get("state") == "in-step" and m.get("checked_rounds", 0) >= 1
                    and m.get("data_version") == data_version(node.database))

        for round_ in range(2):
            node.workload(f"w{round_}")
            node.newaddr()
            wait_for("the mirror to be checked and in step", checked_in_step, timeout=120,
                     every=0.5)
            assert node.stop() == 0
            assert mirror.stat().st_mode & 0o777 == 0o600
            assert dump(mirror) == dump(node.database)
            if round_ == 0:
                node.start()
        log = node.log_path.read_text(errors="replace")
        assert THROWN_AWAY not in log
        assert log.count("mirror rebuilt at data_version") == 1, "built once, then kept"
    finally:
        server.stop()


def _tiny_node(folder: Path) -> tuple[Path, Path]:
    """A live database at data_version 1 and a copy of it to build a mirror from."""
    live = folder / "lightningd.sqlite3"
    with sqlite3.connect(live) as con:
        con.execute("CREATE TABLE vars (name TEXT PRIMARY KEY, intval INTEGER)")
        con.execute("INSERT INTO vars VALUES ('data_version', 1)")
    con.close()
    base = folder / "base.sqlite3"
    shutil.copyfile(live, base)
    return live, base


def test_the_mirror_copies_only_the_state_asked_for_and_follows_the_live_database(
        tmp_path: Path) -> None:
    """In process: a change is held until the live database shows it committed; a snapshot
    is given only at the data_version the mirror holds (anything else is refused, and the
    mirror stays usable)."""
    live, base = _tiny_node(tmp_path)
    said: list[str] = []
    released = threading.Event()
    mirror = Mirror(tmp_path / MIRROR_NAME, live, notify=lambda lvl, msg: said.append(msg))
    mirror.start()
    try:
        mirror.rebuild(base, 1, 0, released.set)
        bump = ["UPDATE vars SET intval = 2 WHERE name = 'data_version'"]
        mirror.feed(0, 2, Kind.NORMAL, bump)
        with pytest.raises(MirrorUnusable, match="holds data_version 1, not 2"):
            mirror.snapshot(2, tmp_path).result(30)
        copy = mirror.snapshot(1, tmp_path).result(30)
        assert released.is_set() and mirror.usable and copy.data_version == 1
        assert _bytes_of(copy, 20)[18:20] == b"\x01\x01"      # rollback-journal mode
        copy.hook_done()
        assert not copy.alive
        with sqlite3.connect(live) as con:          # lightningd commits change 2
            con.execute(bump[0])
        con.close()
        wait_until(lambda: mirror.data_version == 2, 30, "the mirror to apply change 2")
    finally:
        mirror.close()
    assert not [m for m in said if THROWN_AWAY in m], said
    assert sqlite_dump(tmp_path / MIRROR_NAME) == sqlite_dump(live)


def test_the_mirror_thread_runs_at_the_plugins_cpu_priority(tmp_path: Path) -> None:
    """The mirror's thread shares the GIL with the hook path: made nicer, it is scheduled
    less often while it holds the GIL, and the hook path waits for it (priority inversion;
    ``bench/gil_priority.py``: the main thread's wake-ups late by p50 20 ms, max 158-366 ms
    at nice 10, against p50 5-7 ms, max 36-207 ms at nice 0, two hogs on two cores). It
    runs at the plugin's own priority."""
    import os

    live = tmp_path / "lightningd.sqlite3"
    sqlite3.connect(live).close()
    mirror = Mirror(tmp_path / MIRROR_NAME, live, notify=lambda lvl, msg: None)
    mirror.start()
    try:
        mirror.snapshot(1, tmp_path).exception(30)         # the thread has started
        tid = mirror._thread.native_id                      # type: ignore[union-attr]
        stat = Path(f"/proc/{os.getpid()}/task/{tid}/stat").read_text()
        nice = int(stat.rsplit(")", 1)[1].split()[16])
    finally:
        mirror.close()
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)


def test_the_mirror_applies_the_changes_waiting_in_one_transaction(tmp_path: Path) -> None:
    """In process: changes that are waiting when the thread comes to them (here all 200,
    queued before it starts) are applied in one transaction, not one each: the mirror's
    WAL holds a few frames, not a few per change (one transaction each wrote about 600
    frames here), and the mirror still equals the live database, .dump for .dump."""
    live = tmp_path / "lightningd.sqlite3"
    con = sqlite3.connect(live, isolation_level=None)
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("CREATE TABLE vars (name TEXT PRIMARY KEY, intval INTEGER)")
    con.execute("CREATE TABLE peers (id INTEGER PRIMARY KEY, note TEXT)")
    con.execute("CREATE TABLE chans (id INTEGER PRIMARY KEY, "
                "peer INTEGER REFERENCES peers(id) ON DELETE CASCADE)")
    con.execute("INSERT INTO vars VALUES ('data_version', 1)")
    base = tmp_path / "base.sqlite3"
    shutil.copyfile(live, base)
    changes = []
    for dv in range(2, 202):
        writes = [f"INSERT INTO peers (note) VALUES ('peer {dv}')",
                  f"INSERT INTO chans (peer) VALUES ({dv - 1})",
                  f"UPDATE vars SET intval = {dv} WHERE name = 'data_version'"]
        if dv % 7 == 0:           # a cascade, as lightningd's deletes do
            writes.insert(0, f"DELETE FROM peers WHERE id = {dv - 3}")
        changes.append((dv, writes))
        con.execute("BEGIN")
        for w in writes:
            con.execute(w)
        con.execute("COMMIT")                  # lightningd committed every change
    con.close()
    said: list[str] = []
    mirror = Mirror(tmp_path / MIRROR_NAME, live, notify=lambda lvl, msg: said.append(msg))
    mirror.rebuild(base, 1, 0, threading.Event().set)
    for seq, (dv, writes) in enumerate(changes):
        mirror.feed(seq, dv, Kind.NORMAL, writes)
    mirror.start()
    try:
        wait_until(lambda: mirror.data_version == 201, 60, "the mirror to apply change 201")
        wal = Path(f"{tmp_path / MIRROR_NAME}-wal").stat().st_size
    finally:
        mirror.close()
    assert not [m for m in said if THROWN_AWAY in m], said
    assert sqlite_dump(tmp_path / MIRROR_NAME) == sqlite_dump(live)
    frames = (wal - 32) // (4096 + 24)
    assert frames < 60, f"{frames} WAL frames for 200 changes"


def _bytes_of(copy: LocalCopy, n: int | None = None) -> bytes:
    """The first ``n`` bytes of ``copy`` (all of them), read as an upload reads them."""
    buf = memoryview(bytearray(copy.size if n is None else min(n, copy.size)))
    got = 0
    while got < len(buf):
        step = copy.read_into(got, buf[got:], None)
        if step == 0:
            break
        got += step
    return bytes(buf[:got])


def _old_way_copy(mirror_file: Path, dest: Path) -> bytes:
    """What a snapshot of the mirror was before it was read in place: the checkpointed
    file copied, then set to ``journal_mode = DELETE`` (the bytes every restore got)."""
    shutil.copyfile(mirror_file, dest)
    con = sqlite3.connect(dest, isolation_level=None)
    con.execute("PRAGMA synchronous = OFF")
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()
    return dest.read_bytes()


def test_a_snapshot_of_the_mirror_is_read_in_place_and_stays_at_its_data_version(
        tmp_path: Path) -> None:
    """In process: a snapshot of the mirror writes no copy of it (1 GiB into new page cache
    cost 2.7 s of CPU here, and its writeback held the servers' fsyncs); its bytes are read
    from the mirror's own file while a read transaction keeps them still. Changes applied
    meanwhile (more than a WAL autocheckpoint's worth) do not reach what it reads: the
    bytes are exactly those the old copy had at that data_version (rollback-journal
    header included), and once it is let go the mirror checkpoints and serves the next."""
    live = tmp_path / "node" / "lightningd.sqlite3"
    live.parent.mkdir()
    con = sqlite3.connect(live, isolation_level=None)
    con.execute("CREATE TABLE vars (name TEXT PRIMARY KEY, intval INTEGER)")
    con.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB)")
    con.execute("INSERT INTO vars VALUES ('data_version', 1)")
    base = tmp_path / "base.sqlite3"
    shutil.copyfile(live, base)

    def change(dv: int) -> list[str]:
        return [f"INSERT INTO filler (data) VALUES (CAST(printf('%0{20000 + dv}d', {dv}) AS "
                "BLOB))",
                f"UPDATE filler SET data = CAST(printf('%03000d', {dv}) AS BLOB) "
                f"WHERE id = {max(1, dv - 40)}",
                f"UPDATE vars SET intval = {dv} WHERE name = 'data_version'"]

    def commit(dv: int) -> None:                     # lightningd commits change dv
        con.execute("BEGIN")
        for w in change(dv):
            con.execute(w)
        con.execute("COMMIT")

    said: list[str] = []
    folder = live.parent
    mirror = Mirror(folder / MIRROR_NAME, live, notify=lambda lvl, msg: said.append(msg))
    mirror.start()
    try:
        mirror.rebuild(base, 1, 0, threading.Event().set)
        for dv in range(2, 101):
            commit(dv)
            mirror.feed(dv, dv, Kind.NORMAL, change(dv))
        mirror.feed(101, 101, Kind.NORMAL, change(101))   # holds change 100 committed
        before = sorted(p.name for p in folder.iterdir())
        snap = mirror.snapshot(100, folder).result(60)
        assert snap.data_version == 100
        assert sorted(p.name for p in folder.iterdir()) == before, "a file was written"
        expected = _old_way_copy(folder / MIRROR_NAME, tmp_path / "old-way.sqlite3")
        for dv in range(101, 401):                   # ~9 MB of changes: autocheckpoints due
            commit(dv)
            if dv > 101:
                mirror.feed(dv, dv, Kind.NORMAL, change(dv))
        mirror.feed(401, 401, Kind.NORMAL, change(401))
        wait_until(lambda: mirror.data_version == 400, 60, "the mirror to apply change 400")
        wal_frames = (Path(f"{folder / MIRROR_NAME}-wal").stat().st_size - 32) // (4096 + 24)
        assert wal_frames > 1000, wal_frames       # (automatic checkpoints were due)
        got = _bytes_of(snap)
        assert snap.size == len(expected)
        assert got == expected, "the snapshot's bytes moved under it"
        restored = tmp_path / "restored.sqlite3"
        restored.write_bytes(got)
        rcon = sqlite3.connect(restored)
        assert rcon.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert rcon.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert rcon.execute("SELECT intval FROM vars").fetchone() == (100,)
        rcon.close()
        snap.hook_done()                             # let go: the mirror checkpoints again
        assert (folder / MIRROR_NAME).exists()
        commit(401)
        mirror.feed(402, 402, Kind.NORMAL, change(402))
        wait_until(lambda: mirror.data_version == 401, 60, "the mirror to apply change 401")
        nxt = mirror.snapshot(401, folder).result(60)
        assert _bytes_of(nxt) == _old_way_copy(folder / MIRROR_NAME, tmp_path / "next.sqlite3")
        nxt.hook_done()
    finally:
        mirror.close()
        con.close()
    assert not [m for m in said if THROWN_AWAY in m], said


def test_a_snapshot_of_the_mirror_being_read_is_revoked_when_the_mirror_closes(
        tmp_path: Path) -> None:
    """In process: the mirror's connection closes (the mirror is thrown away, rebuilt, or
    the plugin stops) while a snapshot of it is still read: the snapshot is revoked first
    (else its reader, the file's last connection, would checkpoint the WAL into the file
    it reads and delete the WAL by name); reading it then fails, and it is no longer
    offered for a catch-up (not alive)."""
    from cldcb.errors import PluginError

    live, base = _tiny_node(tmp_path)
    mirror = Mirror(tmp_path / MIRROR_NAME, live, notify=lambda lvl, msg: None)
    mirror.start()
    try:
        mirror.rebuild(base, 1, 0, threading.Event().set)
        snap = mirror.snapshot(1, tmp_path).result(30)
        assert _bytes_of(snap, 100)[18:20] == b"\x01\x01"
        assert snap.alive
    finally:
        mirror.close()
    assert not snap.alive
    with pytest.raises(PluginError, match="revoked"):
        _bytes_of(snap, 100)
    snap.hook_done()                                 # (letting go of it again is harmless)
