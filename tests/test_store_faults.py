"""What a killed process cannot show: the order of writes and fsyncs, and failing I/O.

A SIGKILL leaves the page cache intact, so the crash tests cannot tell an Ack
sent before fsync from one sent after. Here a recording :class:`FileLayer`
proves the order, and a faulty one makes fsync, write, truncate and rename fail.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.entries import recognition_entry
from store_crash_child import CLIENT_PRIV, NODE, Writer, client_id, snapshot_bytes, verify

from cldcb.core.seal import SnapshotSealer
from cldcb.errors import StoreError
from cldcb.store import OsFileLayer, Store, Stored
from cldcb.store.snapshots import WRITEBACK_AHEAD

CID = client_id()
Fault = Callable[[str, Path], "OSError | None"]


class Recorder(OsFileLayer):
    """Records every operation as ``(op, name)``; ``fault`` may make one fail."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []
        self.paths: dict[int, Path] = {}
        self.fault: Fault | None = None
        self.max_write: int | None = None
        self.writebacks: list[tuple[int, int, bool]] = []      # (offset, length, wait)

    def _op(self, op: str, path: Path, name: str | None = None) -> None:
        self.ops.append((op, name or path.name))
        exc = self.fault(op, path) if self.fault else None
        if exc is not None:
            raise exc

    def open_write(self, path: Path, *, create: bool = False, exclusive: bool = False,
                   truncate: bool = False) -> int:
        self._op("create" if create else "open", path)
        fd = super().open_write(path, create=create, exclusive=exclusive, truncate=truncate)
        self.paths[fd] = path
        return fd

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        self._op("write", self.paths[fd])
        if self.max_write is not None:
            data = data[:self.max_write]
        return super().pwrite(fd, data, offset)

    def pwrite_durable(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """As a write then its fsync (recorded, and failing, as those two)."""
        n = self.pwrite(fd, data, offset)
        self.fsync(fd, data_only=True)
        return n

    def fsync(self, fd: int, *, data_only: bool = False) -> None:
        self._op("fsync", self.paths[fd])
        super().fsync(fd, data_only=data_only)

    def truncate(self, fd: int, size: int) -> None:
        self._op("truncate", self.paths[fd])
        super().truncate(fd, size)

    def close(self, fd: int) -> None:
        self.paths.pop(fd, None)
        super().close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self._op("rename", src, f"{src.name}->{dst.name}")
        super().rename(src, dst)

    def unlink(self, path: Path) -> None:
        self._op("unlink", path)
        super().unlink(path)

    def mkdir(self, path: Path) -> None:
        self._op("mkdir", path)
        super().mkdir(path)

    def fsync_dir(self, path: Path) -> None:
        self._op("fsync_dir", path)
        super().fsync_dir(path)

    def writeback(self, fd: int, offset: int, length: int, *, wait: bool) -> None:
        self.writebacks.append((offset, length, wait))
        super().writeback(fd, offset, length, wait=wait)


def once(op: str, match: str, err: int) -> Fault:
    """Fail the first ``op`` on a path whose name contains ``match``."""
    fired = []

    def fault(o: str, path: Path) -> OSError | None:
        if o == op and match in path.name and not fired:
            fired.append(1)
            return OSError(err, f"injected {errno.errorcode[err]}")
        return None
    return fault


def always(op: str, match: str, err: int) -> Fault:
    def fault(o: str, path: Path) -> OSError | None:
        return OSError(err, "injected") if o == op and match in path.name else None
    return fault


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def w(tmp_path: Path, rec: Recorder) -> Writer:
    # about six records a segment (records are padded to 256 bytes of plaintext and more)
    store = Store.open(tmp_path, fs=rec, segment_bytes=2500)
    store.add_client(CID)
    w = Writer(store.client(CID))
    w.snapshot(10)
    for dv in range(11, 14):
        w.change(dv)
    return w


def fresh(tmp_path: Path) -> Writer:
    """The same data directory through the real file system, opened anew."""
    return Writer(Store.open(tmp_path).client(CID), seed=7)


def test_append_acks_only_after_the_record_is_fsynced(w: Writer, rec: Recorder) -> None:
    for dv in range(14, 30):
        mark = len(rec.ops)
        res = w.change(dv, size=120)
        assert isinstance(res, Stored)
        ops = rec.ops[mark:]
        seg = ops[-1][1]
        assert ops[-1] == ("fsync", seg) and seg.endswith(".log"), ops
        writes = [i for i, op in enumerate(ops) if op == ("write", seg)]
        assert writes and max(writes) < len(ops) - 1
        if ("create", seg) in ops:                             # a rolled segment:
            assert ops.index(("create", seg)) < ops.index(("fsync_dir", "log")) < writes[0]


def test_commit_returns_only_after_rename_and_folder_fsync(w: Writer, rec: Recorder) -> None:
    visible_at_fsync_dir: list[int] = []

    def spy(op: str, path: Path) -> None:
        if op == "fsync_dir" and path.name == "snapshots":
            visible_at_fsync_dir.append(len(w.cs.snapshots))

    rec.fault = spy  # type: ignore[assignment]
    before = len(w.cs.snapshots)
    for anchored in (True, False, True):
        dv = w.tip.data_version + (0 if anchored else 5)        # type: ignore[union-attr]
        mark = len(rec.ops)
        w.snapshot(dv, anchored=anchored)
        ops = rec.ops[mark:]
        part = next(name for op, name in ops if op == "create" and name.endswith(".part"))
        rename = next(i for i, (op, name) in enumerate(ops) if op == "rename"
                      and name.startswith(part))
        fsync_part = max(i for i, op in enumerate(ops) if op == ("fsync", part))
        last_write = max(i for i, op in enumerate(ops) if op == ("write", part))
        dir_sync = ops.index(("fsync_dir", "snapshots"), rename)
        assert last_write < fsync_part < rename < dir_sync
        assert ops[rename][1].endswith(".snap")
        assert not [op for op in ops[:dir_sync] if op[0] == "unlink"]  # pruning only after
        assert all(op[0] in ("unlink", "fsync_dir") for op in ops[dir_sync + 1:]), ops
    # the store counted each snapshot only after its folder was fsynced
    assert visible_at_fsync_dir[:2] == [before, before + 1]


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_fsync_means_no_ack_and_nothing_kept(w: Writer, rec: Recorder, tmp_path: Path,
                                                    err: int) -> None:
    tip = w.tip
    seg = max((w.cs.folder / "log").glob("*.log"))
    held = seg.read_bytes().rstrip(b"\0")        # the records (not the zero-filled tail)
    rec.fault = once("fsync", ".log", err)
    with pytest.raises(StoreError, match="disk is full" if err == errno.ENOSPC
                       else "I/O error") as exc:
        w.change(14)
    assert "nothing was stored" in str(exc.value)
    assert w.tip == tip and seg.read_bytes().rstrip(b"\0") == held      # cut back
    assert ("truncate", seg.name) in rec.ops
    assert isinstance(w.change(14), Stored)                    # the same instance goes on
    again = fresh(tmp_path)
    f = verify(again.cs)
    assert f is not None and [dv for dv, _ in f.records] == [11, 12, 13, 14]


def test_a_short_or_failed_write_is_cut_back(w: Writer, rec: Recorder, tmp_path: Path) -> None:
    written: list[int] = []

    def half_then_enospc(op: str, path: Path) -> OSError | None:
        if op == "write" and path.name.endswith(".log"):
            written.append(1)
            if len(written) == 2:
                return OSError(errno.ENOSPC, "injected")
        return None

    rec.fault = half_then_enospc
    rec.max_write = 40                                           # first write is short
    seg = max((w.cs.folder / "log").glob("*.log"))
    held = seg.read_bytes().rstrip(b"\0")
    with pytest.raises(StoreError, match="disk is full"):
        w.change(14)
    assert seg.read_bytes().rstrip(b"\0") == held
    rec.fault = None
    for dv in range(14, 20):                                     # short writes all along
        assert isinstance(w.change(dv, size=100), Stored)
    f = verify(fresh(tmp_path).cs)
    assert f is not None and [dv for dv, _ in f.records] == list(range(11, 20))


def test_writes_are_refused_until_a_failed_append_is_cut_back(w: Writer, rec: Recorder,
                                                              tmp_path: Path) -> None:
    broken = [always("fsync", ".log", errno.EIO), always("truncate", ".log", errno.EIO)]
    rec.fault = lambda op, path: next((e for f in broken if (e := f(op, path))), None)
    with pytest.raises(StoreError, match="I/O error"):
        w.change(14)
    with pytest.raises(StoreError, match="refuses writes"):
        w.change(14)
    with pytest.raises(StoreError, match="refuses writes"):
        w.cs.status()
    rec.fault = None
    st = w.cs.status()
    assert st.tip.data_version == 13
    assert isinstance(w.change(14), Stored)
    f = verify(fresh(tmp_path).cs)
    assert f is not None and [dv for dv, _ in f.records] == [11, 12, 13, 14]


def test_open_makes_what_a_crashed_process_left_durable(w: Writer, tmp_path: Path) -> None:
    """Bytes a killed process wrote but never fsynced are synced at open before the tip
    (and a resent record matching it) is trusted."""
    rec2 = Recorder()
    store = Store.open(tmp_path, fs=rec2)
    store.client(CID)
    seg = max((tmp_path / "clients" / CID / "log").glob("*.log")).name
    assert ("fsync", seg) in rec2.ops and ("fsync_dir", "log") in rec2.ops


@pytest.mark.parametrize("op,match", [("fsync", ".part"), ("write", ".part"),
                                      ("rename", ".part"), ("fsync_dir", "snapshots")])
def test_failed_snapshot_commit_is_not_visible(w: Writer, rec: Recorder, tmp_path: Path,
                                              op: str, match: str) -> None:
    tip = w.tip
    assert tip is not None
    s = SnapshotSealer(NODE.pubkey, CLIENT_PRIV, b"\x77" * 32, 13, tip.hash)
    up = w.cs.begin_snapshot(13, tip.hash, w.now())
    up.add_chunk(0, s.seal_chunk(snapshot_bytes(13, 0, 100)))
    rec.fault = always(op, match, errno.EIO)
    with pytest.raises(StoreError, match="not acknowledged"):
        up.commit(1, s.seal_manifest(0), w.now())
    rec.fault = None
    assert w.cs.status().snapshot_data_version == 10
    snaps = w.cs.folder / "snapshots"
    assert not list(snaps.glob("*.part")) and len(list(snaps.glob("*.snap"))) == 1
    assert isinstance(w.change(14), Stored)
    again = fresh(tmp_path)
    assert again.cs.status().snapshot_data_version == 10
    assert [dv for dv, _ in verify(again.cs).records] == [11, 12, 13, 14]  # type: ignore


def test_an_upload_is_written_back_as_it_arrives(w: Writer, rec: Recorder) -> None:
    """A snapshot's chunks are put on their way to the disk as they come, and the upload
    waits for the bytes more than WRITEBACK_AHEAD behind, so that the commit's fsync
    (and every record fsync meanwhile) never waits behind a whole database of dirty
    pages (a stall of hundreds of ms per GiB here)."""
    up = w.cs.begin_snapshot(20, bytes(32), w.now())
    chunk = b"x" * (1 << 20)
    done = 0
    for i in range(WRITEBACK_AHEAD // len(chunk) * 3):
        up.add_chunk(i, chunk)
        started = [(o, n) for o, n, wait in rec.writebacks if not wait]
        waited = [(o, n) for o, n, wait in rec.writebacks if wait]
        assert started and started[-1][0] + started[-1][1] == up.temp.size
        done = 0
        for o, n in waited:                                   # in order, no gap
            assert o == done
            done += n
        assert up.temp.size - done <= WRITEBACK_AHEAD + len(chunk) + 64
    assert done > 0
    up.abort()


def test_failed_chunk_write_aborts_the_upload(w: Writer, rec: Recorder) -> None:
    up = w.cs.begin_snapshot(20, bytes(32), w.now())
    rec.fault = once("write", ".part", errno.ENOSPC)
    with pytest.raises(StoreError, match="disk is full"):
        up.add_chunk(0, b"x" * 100)
    assert not list((w.cs.folder / "snapshots").glob("*.part"))
    with pytest.raises(StoreError, match="aborted"):
        up.add_chunk(0, b"x")


def test_failed_segment_creation(w: Writer, rec: Recorder, tmp_path: Path) -> None:
    rec.fault = always("fsync_dir", "log", errno.EIO)
    with pytest.raises(StoreError):
        for dv in range(14, 40):
            assert isinstance(w.change(dv, size=150), Stored)
    rec.fault = None
    acked = w.tip.data_version                                   # type: ignore[union-attr]
    assert isinstance(w.change(acked + 1), Stored)
    f = verify(fresh(tmp_path).cs)
    assert f is not None and [dv for dv, _ in f.records] == list(range(11, acked + 2))


def test_failed_recognition_write_keeps_the_old_entry(tmp_path: Path, rec: Recorder) -> None:
    store = Store.open(tmp_path, fs=rec)
    store.add_client(CID)
    old, new = recognition_entry(NODE, CLIENT_PRIV), recognition_entry(NODE, CLIENT_PRIV)
    store.put_recognition(CID, old)
    rec.fault = once("fsync", ".tmp", errno.EIO)
    with pytest.raises(StoreError, match="recognition entry"):
        store.put_recognition(CID, new)
    assert store.list_recognitions() == [old]
    mark = len(rec.ops)
    store.put_recognition(CID, new)
    ops = [op for op, _ in rec.ops[mark:]]
    assert ops == ["create", "write", "fsync", "rename", "fsync_dir"]
    assert Store.open(tmp_path).list_recognitions() == [new]


@pytest.mark.parametrize("rwf_dsync", [True, False])
def test_the_real_durable_write(tmp_path: Path, rwf_dsync: bool,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """OsFileLayer.pwrite_durable writes at the offset, with RWF_DSYNC (one call) and with
    the pwrite + fdatasync fallback of kernels without it."""
    from cldcb.store import fs as fsmod

    if not rwf_dsync:
        monkeypatch.setattr(fsmod, "_RWF_DSYNC", 0)
    elif not fsmod._RWF_DSYNC:
        pytest.fail("this Linux has no RWF_DSYNC: the durable write is two calls")
    layer = OsFileLayer()
    path = tmp_path / "f"
    fd = layer.open_write(path, create=True)
    try:
        layer.pwrite(fd, bytes(100), 0)
        assert layer.pwrite_durable(fd, b"record", 10) == 6
    finally:
        layer.close(fd)
    assert path.read_bytes() == bytes(10) + b"record" + bytes(84)


def test_a_chunk_is_written_as_its_header_then_its_sealed_bytes_themselves(
        tmp_path: Path) -> None:
    """No copy of a chunk is built to write it (a fresh 1 MiB buffer per chunk): the frame
    header goes first, then the very ``sealed`` object; the file's bytes are the
    format's, byte for byte."""
    from cldcb.store.frames import SNAPSHOT_HEADER, encode_chunk
    from cldcb.store.snapshots import TempSnapshot

    written: list[object] = []

    class Keeping(Recorder):
        def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
            written.append(data)
            return super().pwrite(fd, data, offset)

    sealed = bytes(range(256)) * 4096
    temp = TempSnapshot(Keeping(), tmp_path)
    written.clear()
    temp.add_chunk(0, sealed)
    assert any(w is sealed for w in written)
    assert temp.path.read_bytes() == SNAPSHOT_HEADER + encode_chunk(0, sealed)
    temp.discard()
