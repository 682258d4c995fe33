"""Unit tests of the plugin's parts: wrapper grammar, JSON-RPC framing, record log,
database copy (with the exclusive-lock hazard), chunked upload, status file."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

import cldcb.plugin.snapshot as snapshot_module
from cldcb.core import wire
from cldcb.core.dataversion import Kind, Tip
from cldcb.core.ids import (
    client_id_from_pubkey,
    new_privkey,
    node_id_from_pubkey,
    pubkey_of,
    server_id_from_pubkey,
)
from cldcb.core.seal import SnapshotOpener
from cldcb.errors import AckMismatch, DatabaseBusy, PluginError, ProtocolError
from cldcb.node import jsonrpc
from cldcb.node.nodedb import remove_stale_copies
from cldcb.node.nodekey import LocalNodeKey
from cldcb.plugin.recordlog import RecordLog
from cldcb.plugin.snapshot import (
    LocalCopy,
    copy_database,
    upload_snapshot,
)
from cldcb.plugin.status import StatusWriter, read_status_file
from cldcb.plugin.wrapper import (
    ServerEntry,
    WrapperConfig,
    exposed,
    format_wrapper,
    parse,
    read_wrapper,
    write_wrapper,
)

CLIENT = new_privkey()
NODE = new_privkey()
SERVER1 = server_id_from_pubkey(pubkey_of(new_privkey()))
SERVER2 = server_id_from_pubkey(pubkey_of(new_privkey()))
HOSTKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def config(**kw: object) -> WrapperConfig:
    base: dict[str, object] = dict(
        client_id=client_id_from_pubkey(pubkey_of(CLIENT)), client_priv=CLIENT,
        node_id=node_id_from_pubkey(pubkey_of(NODE)),
        servers=(ServerEntry("203.0.113.5:29735", SERVER1),
                 ServerEntry("ssh://cldcb@backup.example:22", SERVER2, HOSTKEY)),
        quorum=1, outage_limit=300.0, plugin_path="/opt/cldcb venv/bin/cldcb-plugin")
    base.update(kw)
    return WrapperConfig(**base)  # type: ignore[arg-type]


# -- wrapper ------------------------------------------------------------------------------

def test_wrapper_format_is_the_documented_grammar_and_parses_back() -> None:
    cfg = config()
    text = format_wrapper(cfg)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert lines[2] == f"# cid = {cfg.client_id}"
    assert lines[3] == f"# cpk = {CLIENT.hex()}"
    assert f"# server = 203.0.113.5:29735 {SERVER1}" in lines
    assert f"# server = ssh://cldcb@backup.example:22 {SERVER2} {HOSTKEY}" in lines
    assert "# quorum = 1" in lines and "# outage-limit = 300" in lines
    assert lines[-1] == "exec '/opt/cldcb venv/bin/cldcb-plugin' \"$0\""
    assert parse(text) == cfg


def test_wrapper_defaults() -> None:
    text = format_wrapper(config(quorum=None))
    text = "\n".join(x for x in text.splitlines()
                     if not x.startswith(("# database", "# outage-limit")))
    cfg = parse(text)
    assert cfg.quorum is None and cfg.effective_quorum == 2
    assert cfg.outage_limit == 300 and cfg.database == "lightningd.sqlite3"
    assert cfg.database_path(Path("/x/regtest")) == Path("/x/regtest/lightningd.sqlite3")
    assert parse(format_wrapper(config(database="/abs/db.sqlite3"))).database_path(
        Path("/x")) == Path("/abs/db.sqlite3")


def test_wrapper_mirror_option() -> None:
    """On unless ``# mirror = off``; written only when off, so the wrappers written before
    the option existed stay as they are."""
    on = format_wrapper(config())
    assert "mirror" not in on and parse(on).mirror is True
    off = format_wrapper(config(mirror=False))
    assert "# mirror = off" in off.splitlines() and parse(off) == config(mirror=False)
    assert parse(off.replace("# mirror = off", "# mirror = ON")).mirror is True
    with pytest.raises(PluginError) as err:
        parse(off.replace("# mirror = off", "# mirror = no"))
    assert "mirror must be `on` or `off`" in str(err.value)


@pytest.mark.parametrize("edit, complaint", [
    (lambda t: t.replace("#!/bin/sh", "#!/bin/bash"), "first line"),
    (lambda t: t.replace("# quorum = 1", "# quorum = 3"), "quorum 3"),
    (lambda t: t.replace("# quorum = 1", "# qorum = 1"), "unknown setting 'qorum'"),
    (lambda t: t.replace("# outage-limit = 300", "# outage-limit = -1"), "outage-limit"),
    (lambda t: t.replace(f" {HOSTKEY}", ""), "pinned sshd host key"),
    (lambda t: t.replace(f"29735 {SERVER1}", f"29735 {SERVER1} {HOSTKEY}"), "extra words"),
    (lambda t: t.replace(SERVER1, SERVER2), "listed twice"),
    (lambda t: t.replace("203.0.113.5:29735", "203.0.113.5"), "HOST:PORT"),
    (lambda t: t.replace("exec '/opt", "exec 'opt"), "absolute path"),
    (lambda t: t.replace('"$0"', '"$@"'), "exec"),
    (lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("exec")), "exec"),
    (lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("# node")), "node"),
    (lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("# server")),
     "no `server =`"),
    (lambda t: t.replace("# node = 0", "# node = c"), "node"),
])
def test_wrapper_errors_name_the_problem(edit: object, complaint: str) -> None:
    text = edit(format_wrapper(config()))  # type: ignore[operator]
    with pytest.raises(PluginError) as err:
        parse(text)
    assert complaint in str(err.value)


def test_wrapper_errors_never_show_the_secret() -> None:
    text = format_wrapper(config())
    other = new_privkey().hex()
    for bad in (other, CLIENT.hex()[:-1] + "g", CLIENT.hex()[:40], "ff" * 32):
        with pytest.raises(PluginError) as err:
            parse(text.replace(CLIENT.hex(), bad))
        assert bad not in str(err.value) and CLIENT.hex() not in str(err.value)
        assert "cpk" in str(err.value)
    assert CLIENT.hex() not in repr(config())


def test_write_wrapper_is_0700_atomic_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "cldcb-plugin-wrapper"
    path.write_text("old\n")
    os.umask(0o022)
    write_wrapper(path, config())
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert read_wrapper(path) == config()
    assert not exposed(path)
    # no temporary file left; the unreadable old file (it might hold a key) is kept aside
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "cldcb-plugin-wrapper"
    assert names[1].startswith("cldcb-plugin-wrapper.replaced-")
    assert (tmp_path / names[1]).read_text() == "old\n"
    write_wrapper(path, config())                    # the same client: rewritten in place
    assert len(list(tmp_path.iterdir())) == 2
    path.chmod(0o744)
    assert exposed(path)


def test_the_wrapper_runs_the_plugin_with_its_own_path(tmp_path: Path) -> None:
    import subprocess

    fake = tmp_path / "fake-plugin"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    path = tmp_path / "cldcb-plugin-wrapper"
    write_wrapper(path, config(plugin_path=str(fake)))
    out = subprocess.run([str(path)], capture_output=True, text=True, check=True, timeout=10)
    assert out.stdout.strip() == str(path)


# -- JSON-RPC framing -----------------------------------------------------------------------

def test_decoder_handles_any_split_and_blank_line_separators() -> None:
    msgs = [jsonrpc.request("cln:db_write#64", "db_write",
                            {"data_version": 7, "writes": ["INSERT INTO t VALUES ('{é}\n')",
                                                           "x" * 20000]}),
            jsonrpc.notification("shutdown", {}),
            jsonrpc.request(3, "getmanifest", {})]
    data = b"".join(jsonrpc.encode(m) for m in msgs)
    assert data.count(b"\n\n") == 3
    for step in (1, 2, 3, 7, 4096, len(data)):
        d = jsonrpc.MessageDecoder()
        out = []
        for i in range(0, len(data), step):
            out += d.feed(data[i:i + step])
        assert out == msgs, step
        assert d.pending == 0


@pytest.mark.parametrize("request_id", ["cln:db_write#64", 'odd "id" é\n', 7, None])
def test_the_prebuilt_continue_answer_is_the_encoded_response(request_id: object) -> None:
    answer = jsonrpc.encode_continue(request_id)
    assert answer.endswith(b"\n\n")
    assert jsonrpc.MessageDecoder().feed(answer) == [
        jsonrpc.response(request_id, {"result": "continue"})]


def test_the_stdout_writer_writes_whole_messages_through_short_writes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    out = jsonrpc.StdoutWriter(w)
    msg = jsonrpc.encode(jsonrpc.response("cln:db_write#1", {"result": "continue"}))
    out.write(msg)                                            # all at once
    real_write = os.write
    monkeypatch.setattr(jsonrpc.os, "write", lambda fd, data: real_write(fd, data[:7]))
    out.write(msg)                                            # seven bytes at a time
    monkeypatch.undo()
    os.close(w)
    got = b""
    while chunk := os.read(r, 65536):
        got += chunk
    os.close(r)
    assert got == msg + msg


def test_decoder_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        jsonrpc.MessageDecoder().feed(b"[1, 2]\n\n")
    with pytest.raises(ProtocolError):
        jsonrpc.MessageDecoder().feed(b"\xff\xfe{}")
    with pytest.raises(ProtocolError):
        jsonrpc.MessageDecoder(max_message=100).feed(b"{" + b" " * 200)


def test_decoder_does_not_reparse_a_long_message_for_every_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed only once a ``}`` came (how long that takes: bench/deadlines.py)."""
    big = jsonrpc.encode({"id": "x", "params": {"writes": ["a" * 5_000_000]}})
    parses = []
    real = jsonrpc._decoder.raw_decode

    def counted(s: str, idx: int = 0) -> tuple[object, int]:
        parses.append(idx)
        return real(s, idx)

    monkeypatch.setattr(jsonrpc._decoder, "raw_decode", counted)
    d = jsonrpc.MessageDecoder()
    out = []
    for i in range(0, len(big), 4096):
        out += d.feed(big[i:i + 4096])
    assert len(out) == 1 and len(parses) <= 2, len(parses)


# -- record log ----------------------------------------------------------------------------

def tip(dv: int, n: int) -> Tip:
    return Tip(dv, Kind.NORMAL, bytes([n]) * 32, bytes([n - 1]) * 32)


def test_record_log_positions_trim_and_reset() -> None:
    log = RecordLog(tip(10, 1), seq=5)
    assert log.position(tip(10, 1).hash) == 5 and log.holds(5)
    for i in range(2, 6):
        log.append(9 + i, Kind.NORMAL, tip(8 + i, i - 1).hash, b"s" * 100, tip(9 + i, i))
    assert log.head == tip(14, 5) and log.head_seq == 9
    assert [e.seq for e in log.after(5)] == [6, 7, 8, 9]
    assert [e.seq for e in log.after(7, limit=1)] == [8]
    log.trim(7, max_bytes=1 << 20)
    assert log.base_seq == 7 and log.base == tip(12, 3) and not log.holds(6)
    assert log.position(tip(11, 2).hash) is None and log.position(tip(12, 3).hash) == 7
    assert log.size_bytes == 200
    log.trim(0, max_bytes=100)             # memory bound: only the newest stays
    assert log.base_seq == 8 and len(log) == 1
    seq = log.reset(Tip(20, Kind.NORMAL, b"\xaa" * 32, bytes(32), is_snapshot=True))
    assert seq == 10 and log.holds(10) and not log.holds(9) and log.after(10) == []


# -- copying the database -------------------------------------------------------------------

def make_db(path: Path, dv: int, rows: int = 100) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE TABLE vars (name TEXT PRIMARY KEY, intval INTEGER)")
    con.execute("INSERT INTO vars VALUES ('data_version', ?)", (dv,))
    con.execute("CREATE TABLE t (x BLOB)")
    con.execute("BEGIN")
    for _ in range(rows):
        con.execute("INSERT INTO t VALUES (?)", (os.urandom(1000),))
    con.execute("COMMIT")
    return con


def test_copy_sees_the_committed_state_while_a_transaction_is_open(tmp_path: Path) -> None:
    db = tmp_path / "lightningd.sqlite3"
    con = make_db(db, 41)
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (x'00')")
    con.execute("UPDATE vars SET intval = 42")
    copy = copy_database(db, tmp_path)
    assert copy.data_version == 41 and copy.path.parent == tmp_path
    c = sqlite3.connect(copy.path)
    assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 100
    c.close()
    con.execute("COMMIT")
    copy.hook_done()
    assert not copy.path.exists()


def test_copy_of_an_empty_database_is_state_zero(tmp_path: Path) -> None:
    db = tmp_path / "lightningd.sqlite3"
    sqlite3.connect(db).close()
    assert copy_database(db, tmp_path).data_version == 0
    with pytest.raises(PluginError, match="does not exist"):
        copy_database(tmp_path / "nope.sqlite3", tmp_path)


def test_copy_gives_up_quickly_on_a_spilled_transaction(tmp_path: Path) -> None:
    db = tmp_path / "lightningd.sqlite3"
    con = make_db(db, 5)
    con.execute("PRAGMA cache_size = 10")
    con.execute("BEGIN")
    for _ in range(300):
        con.execute("INSERT INTO t VALUES (?)", (os.urandom(1000),))
    with pytest.raises(DatabaseBusy, match="exclusively locked"):       # how soon:
        copy_database(db, tmp_path, busy_timeout=0.5)                   # bench/deadlines.py
    assert not list(tmp_path.glob(".cldcb-snapshot-*"))
    con.execute("COMMIT")
    assert copy_database(db, tmp_path).data_version == 5


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_both_copy_paths_give_the_committed_state(tmp_path: Path, journal_mode: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollback-journal mode copies the file's bytes under a SHARED lock; WAL mode (whose
    committed pages may sit in the -wal file) goes through the backup API."""
    db = tmp_path / "lightningd.sqlite3"
    con = make_db(db, 7)
    con.execute(f"PRAGMA journal_mode = {journal_mode}")
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (x'01')")
    con.execute("UPDATE vars SET intval = 8")
    con.execute("COMMIT")
    con.execute("BEGIN")                       # the pending hook call's transaction
    con.execute("UPDATE vars SET intval = 9")
    used: list[bool] = []
    real = snapshot_module._copy_file_locked

    def spy(*args: object) -> bool:
        used.append(real(*args))  # type: ignore[arg-type]
        return used[-1]

    monkeypatch.setattr(snapshot_module, "_copy_file_locked", spy)
    copy = copy_database(db, tmp_path)
    assert used == [journal_mode == "delete"]
    c = sqlite3.connect(copy.path)
    assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 101
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c.close()
    assert copy.data_version == 8
    con.execute("ROLLBACK")


def test_stale_copies_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".cldcb-snapshot-abc.tmp").write_bytes(b"x")
    (tmp_path / "lightningd.sqlite3").write_bytes(b"x")
    assert remove_stale_copies(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["lightningd.sqlite3"]


# -- upload ------------------------------------------------------------------------------------

class FakeTarget:
    def __init__(self, delay: float = 0.0, lie: str = "") -> None:
        self.lie = lie
        self.chunks: dict[int, bytes] = {}
        self.begin: tuple[int, int, bytes] | None = None
        self.end: tuple[int, int, bytes] | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = delay

    async def begin_snapshot(self, snapshot_id: int, data_version: int, anchor: bytes) -> None:
        self.begin = (snapshot_id, data_version, anchor)

    async def send_chunk(self, snapshot_id: int, index: int, sealed: bytes) -> wire.ChunkAck:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.delay)
        self.chunks[index] = sealed
        self.in_flight -= 1
        return wire.ChunkAck(snapshot_id, index + (self.lie == "index" and index == 2))

    async def send_chunk_frame(self, frame: bytearray) -> wire.ChunkAck:
        """A chunk sealed into its frame: taken apart, then as ``send_chunk``."""
        (msg,) = wire.FrameDecoder().feed(bytes(frame))
        assert isinstance(msg, wire.SnapshotChunk)
        return await self.send_chunk(msg.snapshot_id, msg.index, msg.sealed)

    async def end_snapshot(self, snapshot_id: int, chunk_count: int,
                           manifest: bytes) -> wire.SnapshotAck:
        self.end = (snapshot_id, chunk_count, manifest)
        assert self.begin is not None
        return wire.SnapshotAck(snapshot_id ^ (self.lie == "id"),
                                self.begin[1] - (self.lie == "data_version"))


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 3, 4096 * 3 + 5])
def test_upload_seals_chunks_with_a_bounded_window(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "copy"
    path.write_bytes(data)
    copy = LocalCopy(path, 77, size, anchor=b"\x01" * 32)
    target = FakeTarget(delay=0.001)
    asyncio.run(upload_snapshot(target, copy, node_pub=pubkey_of(NODE), client_priv=CLIENT,
                                chunk_size=4096, window=3))
    assert target.begin is not None and target.begin[1:] == (77, b"\x01" * 32)
    assert target.end is not None
    count = target.end[1]
    assert count == max(1, -(-size // 4096)) == len(target.chunks)
    assert target.max_in_flight <= 3
    opener = SnapshotOpener(LocalNodeKey(NODE), pubkey_of(CLIENT), 77, target.end[2])
    got = b"".join(opener.open_chunk(i, target.chunks[i]) for i in range(count))
    opener.finish()
    assert got == data and opener.manifest.anchor == b"\x01" * 32


@pytest.mark.parametrize("lie, named", [
    ("index", "ChunkAck(snapshot {id}, index 3)"),
    ("id", "SnapshotAck(snapshot {id1}, data_version 77)"),
    ("data_version", "SnapshotAck(snapshot {id}, data_version 76)")])
def test_an_upload_answered_for_another_chunk_or_snapshot_fails(
        tmp_path: Path, lie: str, named: str) -> None:
    """A ChunkAck must name its chunk, the SnapshotAck this snapshot's id and
    data_version: else AckMismatch, naming what was sent and what came back."""
    path = tmp_path / "copy"
    path.write_bytes(os.urandom(4096 * 5))
    target = FakeTarget(lie=lie)
    with pytest.raises(AckMismatch, match="protocol violation") as err:
        asyncio.run(upload_snapshot(target, LocalCopy(path, 77, 4096 * 5, anchor=bytes(32)),
                                    node_pub=pubkey_of(NODE), client_priv=CLIENT,
                                    chunk_size=4096, window=2))
    assert target.begin is not None
    sid = target.begin[0]
    assert named.format(id=sid, id1=sid ^ 1) in str(err.value)
    assert (target.end is None) is (lie == "index")      # no SnapshotEnd after a bad ChunkAck


# -- status file ------------------------------------------------------------------------------

def test_status_writer_is_atomic_and_rate_limited(tmp_path: Path) -> None:
    w = StatusWriter(tmp_path / "cldcb-status.json", interval=1.0)
    assert w.due(now=100.0)
    assert w.write({"pid": 1, "servers": []}, now=100.0)
    assert not w.due(now=100.5)
    w.dirty = True
    assert not w.due(now=100.5) and w.due(now=101.0)
    data = read_status_file(tmp_path / "cldcb-status.json")
    assert data == {"version": 1, "pid": 1, "servers": []}
    assert [p.name for p in tmp_path.iterdir()] == ["cldcb-status.json"]
    json.loads((tmp_path / "cldcb-status.json").read_text())


def test_a_copy_is_deleted_off_the_event_loop(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy is a whole database: unlinking it takes ext4 tens of ms per GiB, a stall of
    every hook call waiting on the event loop when an upload ends. Inside the loop it is
    deleted by a worker thread (gone once the loop has shut down); outside, at once."""
    import threading

    unlinked_in: list[str] = []
    real_unlink = os.unlink

    def spy(path: object, *args: object, **kw: object) -> None:
        unlinked_in.append(threading.current_thread().name)
        real_unlink(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", spy)
    paths = [tmp_path / "a.tmp", tmp_path / "b.tmp"]
    for p in paths:
        p.write_bytes(b"x" * 4096)

    async def go() -> None:
        copy = LocalCopy(paths[0], 7, 4096)
        copy.acquire()
        copy.hook_done()
        assert copy.alive
        copy.release()
        assert not copy.alive             # (being deleted: never handed out again)

    asyncio.run(go())
    assert not paths[0].exists()
    assert unlinked_in and unlinked_in[0] != threading.main_thread().name
    outside = LocalCopy(paths[1], 7, 4096)
    outside.hook_done()
    assert not paths[1].exists() and unlinked_in[1] == threading.main_thread().name


def _plugin_imports() -> dict[str, set[str]]:
    """Module → the plugin modules it imports (every import statement, also those under
    ``if TYPE_CHECKING:`` and inside functions), read from the source."""
    import ast

    import cldcb.plugin

    package = Path(cldcb.plugin.__file__).parent
    names = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                if node.module == "cldcb.plugin":
                    found.update(a.name for a in node.names if a.name in names)
                elif node.module.startswith("cldcb.plugin."):
                    found.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[2] for a in node.names
                             if a.name.startswith("cldcb.plugin."))
        graph[path.stem] = found - {path.stem}
    return graph


def test_plugin_modules_import_each_other_without_cycles() -> None:
    """The plugin's modules form layers: a link talks to its host (the engine) through
    the LinkHost protocol, never by importing it; no import cycle, also none hidden
    under TYPE_CHECKING."""
    graph = _plugin_imports()
    assert "engine" in graph and "links" in graph and "links" in graph["engine"]

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, path + [nxt])
                if found is not None:
                    return found
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, [m])) is not None]
    assert not cycles, f"import cycles in cldcb.plugin: {cycles}"
