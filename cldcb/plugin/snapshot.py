"""Snapshots: a consistent local copy of the node's database, and its sealed upload.

Copy (:func:`copy_database`)
----------------------------
Taken only while a ``db_write`` hook call is pending: lightningd has run the
batch's statements in its open transaction and waits, so a reader sees the
last committed state and nothing can commit under it. The copy is made from
a **read-only** connection into a temporary file in the node's folder, then
the database is let go:

- in rollback-journal mode (lightningd's), a read transaction holds SQLite's
  SHARED lock, under which no writer can change the database file, and the
  file's bytes are copied with ``copy_file_range`` (several times faster than
  the backup API for a large database);
- otherwise (WAL), or if that fails, SQLite's backup API copies it.

A blocking snapshot's copy is *read in place* (:func:`start_copy`): the
data_version and the size are read under the SHARED lock, and the upload
reads lightningd's database file itself (:meth:`LocalCopy.read_into`) for as
long as that lock holds it still: no local byte is written for it. Only what
outlives the hook call needs a local copy: the mirror's rebuild, and servers
beyond the quorum that may still be uploading when the call is answered. For
them (``keep``) the same bytes are copied once into a file in pieces by a
thread (:meth:`LocalCopy.fill`) that keeps the lock until the last piece;
readers go on from that file once the lock is let go. The mirror then takes
that very file (:meth:`LocalCopy.bequeath`, a rename), once no upload reads it
any more: at most one local copy is ever written.

The order at the end of the call: every read of the live file has returned,
then the lock goes (:meth:`LocalCopy.let_go`), then the call is answered.
Letting go first is safe: until the answer lightningd runs no statement and
cannot commit, so the file does not change; and lightningd's COMMIT then never
waits for the plugin's lock. A read asked after the lock went reads the copy
(whole by then: the fill lets go only after its last piece), or fails where
there is none. A fill never falls back to the backup API once a reader may
have read its bytes; where ``copy_file_range`` does not work it copies with
``pread``/``pwrite``.

The hazard: in rollback-journal mode a transaction that spilled SQLite's page
cache holds an EXCLUSIVE lock until COMMIT, which lightningd does only after
the hook answered; every read gets SQLITE_BUSY. Python's
``Connection.backup`` would retry forever. Here each backup step's status
goes through the progress callback, which stops the copy with
:class:`DatabaseBusy` once SQLITE_BUSY/SQLITE_LOCKED persisted for
``busy_timeout`` seconds, and the whole copy has a deadline too. The caller
decides what that means (a blocking snapshot fails the hook; a background one
is tried again at a later call).

Upload (:func:`upload_snapshot`)
--------------------------------
The copy is read in chunks (1 MiB, into one buffer reused for every chunk; from
the database itself while it is held still, else from the copy, a chunk still
being filled waited for), each sealed with a
:class:`~cldcb.core.seal.SnapshotSealer` (a fresh ephemeral key per snapshot; the
next chunk is read and sealed in a thread while one is sent),
with at most ``window`` chunks awaiting their ``ChunkAck``: memory stays
bounded whatever the database's size, and writes interleaved on the same
connection are never queued behind much. ``SnapshotEnd`` carries the sealed
manifest; the answer means the snapshot is durable and visible. Every
``ChunkAck`` must name its chunk's index and the ``SnapshotAck`` this
snapshot's id and data_version: anything else raises
:class:`~cldcb.errors.AckMismatch` (a protocol violation; the caller drops
the connection).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from cldcb.core import wire
from cldcb.core.ids import new_privkey
from cldcb.core.seal import OVERHEAD, SnapshotSealer
from cldcb.core.session import check_chunk_ack, check_snapshot_ack
from cldcb.errors import DatabaseBusy, PluginError, SnapshotAborted
from cldcb.node import nodedb

CHUNK_SIZE = 1024 * 1024
WINDOW = 8
"""Chunks awaiting their ChunkAck while the hook waits for the snapshot (throughput)."""
BACKGROUND_WINDOW = 2
"""... while records keep flowing on the same connection: a write queued behind the
chunks in flight (answers come in order) waits for at most this many."""
FILL_PIECE = 8 << 20
"""Bytes a fill copies between two reports of how far it got."""
IN_PLACE_SUFFIX = ".cldcb-in-place"
"""The name (never created) of a copy that has no file: it is read in place."""


class CopySource(Protocol):
    """Where a copy's bytes come from when they are not a file of their own (a snapshot
    read in place from the plugin's mirror, :class:`cldcb.plugin.mirrorview.MirrorView`)."""

    @property
    def alive(self) -> bool: ...

    def read_into(self, offset: int, buf: memoryview) -> int: ...

    def close(self) -> None: ...


@dataclass
class LocalCopy:
    """A consistent copy of the database at ``data_version``, on local disk, or (while a
    blocking snapshot's call holds the database still) the database itself.

    ``anchor`` is what its manifest names (the hash of the record holding that
    state, or 32 fresh random bytes); ``next_seq`` the position in the
    :class:`~cldcb.plugin.recordlog.RecordLog` of the first record that goes
    on top of it. Read it with :meth:`read_into`. The file is deleted once nobody
    uses it (:meth:`release`), by a worker thread when that happens on the event
    loop, unless it was bequeathed (:meth:`bequeath`): then its heir takes it.
    A copy begun by :func:`start_copy` without ``keep`` has no file at all: it
    can be read only until the call ends (:meth:`hook_done`).
    With a ``source`` (a snapshot of the mirror read in place) the bytes are read
    from it and it is closed instead of a file deleted; ``path`` only names where
    they live.
    """

    path: Path
    data_version: int
    size: int
    anchor: bytes = b""
    next_seq: int = 0
    users: int = 0
    in_hook: bool = True
    fresh: bool = False     # anchored at fresh random bytes (a blocking snapshot)
    deleting: bool = False  # nobody uses it any more: being deleted (or handed over)
    taken_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    filling: _Filling | None = field(default=None, repr=False)
    heir: Handover | None = field(default=None, repr=False)
    source: CopySource | None = field(default=None, repr=False)

    def fill(self) -> None:
        """Copy the rest of the bytes (blocking: run it in a thread), then let go of the
        database; nothing to do for a copy made whole, or one without a file (it lets go
        at :meth:`let_go`). Raises what stopped it (every :meth:`wait_ready` raises it
        too)."""
        if self.filling is not None:
            self.filling.run()

    def wait_ready(self, end: int | None = None) -> None:
        """Block until the bytes before ``end`` (None: all of them) are in the file; raises
        :class:`PluginError` if the fill failed, or if there is no file."""
        if self.filling is not None:
            self.filling.wait(self.size if end is None else min(end, self.size))

    def read_into(self, offset: int, buf: memoryview, f: BinaryIO | None) -> int:
        """Read the copy's bytes at ``offset`` into ``buf`` (blocking: run it in a thread);
        how many (0 at the end). From the database itself while it is held still, else
        from the file ``f`` (this copy's file, opened by the caller; None when it has
        none)."""
        want = min(len(buf), self.size - offset)
        if want <= 0:
            return 0
        view = buf[:want]
        if self.source is not None:
            return self.source.read_into(offset, view)
        if self.filling is not None:
            n = self.filling.read_live(offset, view)
            if n is not None:
                return n
            self.filling.wait(offset + want)
        if f is None:
            raise PluginError("the database was let go at the end of the hook call and no "
                              "copy of it was kept")
        return os.preadv(f.fileno(), [view], offset)

    @property
    def failed(self) -> str | None:
        """Why the copy cannot be read (its fill, or a read of the database, failed)."""
        return self.filling.error if self.filling is not None else None

    @property
    def has_file(self) -> bool:
        return self.source is None and (self.filling is None or self.filling.keeps)

    def let_go(self) -> None:
        """Let go of the database (blocking for as long as a read of it in progress, a
        few ms at most): the end of the hook call, before it is answered."""
        if self.filling is not None:
            self.filling.let_go()

    def bequeath(self) -> Handover:
        """Give the file to an heir once nobody else uses it, instead of deleting it."""
        self.heir = Handover()
        return self.heir

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users = max(0, self.users - 1)
        self._maybe_delete()

    def hook_done(self) -> None:
        self.in_hook = False
        self.let_go()
        self._maybe_delete()

    @property
    def alive(self) -> bool:
        if self.deleting:
            return False
        if self.source is not None:
            return self.source.alive
        if self.filling is not None and not self.filling.keeps:
            return self.filling.holding
        return self.path.exists()

    def _maybe_delete(self) -> None:
        if self.users == 0 and not self.in_hook and not self.deleting:
            self.deleting = True
            if self.heir is not None and self.heir.give():
                return
            if self.source is not None:
                self.source.close()
            elif self.has_file:
                _delete_soon(self.path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _delete_soon(path: Path) -> None:
    """Delete ``path``: in a worker thread when called on the event loop (unlinking a copy
    of a large database takes ext4 tens of ms per GiB: a stall of every hook call waiting
    on the loop), at once otherwise. ``asyncio.run`` waits for it before it returns."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _unlink(path)
        return
    loop.run_in_executor(None, _unlink, path)


def read_data_version(conn: sqlite3.Connection) -> int:
    """``vars.data_version`` of a Core Lightning database; 0 when it has no tables."""
    held = nodedb.read_data_version(conn)
    if held is None:
        raise PluginError("the database has no vars.data_version: it is not a Core Lightning "
                          "database; check the `database =` line of the wrapper")
    return held


class Handover:
    """A copy's file passed on to one heir (the mirror) once nobody else reads it.

    ``pending`` until the copy's last user lets go: then ``given`` (the heir owns
    the file and renames it; the copy never deletes it), unless the heir gave up
    first (``abandoned``: the copy deletes its file as usual). Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state = "pending"

    def give(self) -> bool:
        """The copy's last user let go: True if the heir takes the file."""
        with self._cond:
            if self._state != "pending":
                return False
            self._state = "given"
            self._cond.notify_all()
            return True

    def wait(self) -> bool:
        """Block until the file is given (True) or the heir gave up (False)."""
        with self._cond:
            while self._state == "pending":
                self._cond.wait()
            return self._state == "given"

    def abandon(self) -> bool:
        """The heir gives up; True if the file was already given (the heir deletes it)."""
        with self._cond:
            if self._state == "pending":
                self._state = "abandoned"
                self._cond.notify_all()
            return self._state == "given"


class _Filling:
    """The database held still under its SHARED lock: read in place (:meth:`read_live`)
    while the lock is held, and, for a copy that outlives the hook call, copied into
    ``dest_path`` by :meth:`run`, which lets go of the lock after the last byte. Without
    a destination nothing is copied and the lock goes at :meth:`let_go` (the end of the
    call)."""

    def __init__(self, src: sqlite3.Connection, db_path: Path, dest_path: Path | None,
                 size: int, deadline: float) -> None:
        self._src: sqlite3.Connection | None = src
        self._db_path, self._dest_path = db_path, dest_path
        self._live_fd: int | None = os.open(db_path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = size
        self._deadline = deadline
        self._cond = threading.Condition()
        self._copied = 0
        self._ended = dest_path is None       # nothing to copy
        self._error: str | None = None
        self._readers = 0                     # reads of the live file in progress
        self._letting_go = False

    @property
    def error(self) -> str | None:
        """What stopped the copy or a read of the database, if anything did."""
        return self._error

    @property
    def keeps(self) -> bool:
        """Whether the bytes are copied into a file that outlives the call."""
        return self._dest_path is not None

    @property
    def holding(self) -> bool:
        """The SHARED lock is held: the live file's bytes are the copy's."""
        return self._src is not None and not self._letting_go

    def wait(self, end: int) -> None:
        with self._cond:
            while self._copied < end and not self._ended:
                self._cond.wait()
            if self._error is not None:
                raise PluginError(f"copying the database failed: {self._error}")
            if self._copied < end:
                raise PluginError("the database was let go at the end of the hook call and "
                                  "no copy of it was kept")

    def read_live(self, offset: int, buf: memoryview) -> int | None:
        """Read the database file at ``offset`` into ``buf`` while the lock still holds it
        still; None once it is being let go (read the copy instead)."""
        with self._cond:
            if self._error is not None:
                raise PluginError(f"reading the database failed: {self._error}")
            if not self.holding or self._live_fd is None:
                return None
            self._readers += 1
            fd = self._live_fd
        try:
            return os.preadv(fd, [buf], offset)
        except OSError as exc:
            with self._cond:
                self._error = str(exc)
            raise PluginError(f"reading the database failed: {exc}") from None
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def _advance(self, copied: int) -> None:
        with self._cond:
            self._copied = copied
            self._cond.notify_all()

    def run(self) -> None:
        if self._dest_path is None:
            return                            # the lock goes at let_go()
        error: str | None = "stopped"
        try:
            with open(self._db_path, "rb") as fin, open(self._dest_path, "r+b") as fout:
                _copy_pieces(fin.fileno(), fout.fileno(), self._size, self._deadline,
                             self._advance)
            error = None
        except OSError as exc:
            error = str(exc)
            raise PluginError(f"copying the database failed: {exc}") from None
        finally:
            self.let_go()
            with self._cond:
                self._error = error
                self._ended = True
                self._cond.notify_all()

    def let_go(self) -> None:
        """End the read transaction (the SHARED lock goes) once no read of the live file is
        in progress; reads asked after this call read the copy. Idempotent."""
        with self._cond:
            self._letting_go = True
            while self._readers:
                self._cond.wait()
            src, self._src = self._src, None
            fd, self._live_fd = self._live_fd, None
        if fd is not None:
            os.close(fd)
        if src is not None:
            try:
                src.execute("ROLLBACK")
            finally:
                src.close()


def _copy_pieces(fin: int, fout: int, size: int, deadline: float,
                 advance: Callable[[int], None]) -> None:
    """Copy ``size`` bytes from ``fin`` to ``fout`` (both at offset 0), ``FILL_PIECE`` at a
    time, calling ``advance`` with the bytes copied so far after each piece."""
    copied = 0
    in_kernel = True
    while copied < size:
        if time.monotonic() > deadline:
            raise OSError(f"copying the database took too long ({copied} of {size} bytes)")
        n = min(size - copied, FILL_PIECE)
        if in_kernel:
            try:
                n = os.copy_file_range(fin, fout, n, copied, copied)
            except OSError:
                in_kernel = False       # (EXDEV, ENOSYS, EINVAL…): the same bytes by hand
                continue
        else:
            n = os.pwrite(fout, os.pread(fin, n, copied), copied)
        if n == 0:
            raise OSError(f"the database ended at {copied} of {size} bytes")
        copied += n
        advance(copied)


def _check_exists(db_path: Path) -> None:
    if not db_path.exists():
        raise PluginError(f"the database {db_path} does not exist; check the `database =` "
                          "line of the wrapper (relative to <lightning-dir>/<network>)")


def _new_copy_file(db_path: Path, folder: Path) -> Path:
    """An empty temporary file in ``folder`` for a copy of ``db_path`` (which must exist)."""
    _check_exists(db_path)
    return nodedb.new_copy_file(folder)


def start_copy(db_path: Path, folder: Path, *, busy_timeout: float = 1.0,
               deadline: float = 600.0, pages: int = 2048, keep: bool = True) -> LocalCopy:
    """Begin a copy of ``db_path`` (blocking; run it in a thread): in rollback-journal
    mode it returns as soon as the SHARED lock is held and the data_version and size are
    read; the copy is then read from the database itself while the lock holds it still.
    With ``keep`` a file in ``folder`` is filled too (:meth:`LocalCopy.fill`, in a
    thread), which lets go of the lock after its last byte; without, no byte is written
    and the lock goes at :meth:`LocalCopy.let_go`. Otherwise (WAL) the copy is made whole
    here, into a file. Raises as :func:`copy_database` does."""
    _check_exists(db_path)
    dest_path = nodedb.new_copy_file(folder) if keep else None
    started = time.monotonic()
    src = None
    try:
        src = nodedb.connect_ro(db_path, timeout=0, isolation_level=None,
                                check_same_thread=False)
        if _shared_lock(src, busy_timeout, started, deadline):
            try:
                data_version = read_data_version(src)
                with open(db_path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                filling = _Filling(src, db_path, dest_path, size, started + deadline)
            except BaseException:
                src.execute("ROLLBACK")
                raise
            src = None
            path = dest_path or db_path.with_name(f"{db_path.name}{IN_PLACE_SUFFIX}")
            return LocalCopy(path, data_version, size, filling=filling)
        src.close()
        src = None
    except BaseException:
        if src is not None:
            src.close()
        if dest_path is not None:
            _unlink(dest_path)
        raise
    if dest_path is not None:
        _unlink(dest_path)
    return copy_database(db_path, folder, busy_timeout=busy_timeout, deadline=deadline,
                         pages=pages)


def copy_database(db_path: Path, folder: Path, *, busy_timeout: float = 1.0,
                  deadline: float = 600.0, pages: int = 2048) -> LocalCopy:
    """Copy ``db_path`` into a new temporary file in ``folder`` (blocking; run it in a
    thread). Raises :class:`DatabaseBusy` (the hazard) or :class:`PluginError`."""
    dest_path = _new_copy_file(db_path, folder)
    started = time.monotonic()
    busy_since: list[float] = []

    def progress(status: int, remaining: int, total: int) -> None:
        now = time.monotonic()
        if status in nodedb.BUSY_CODES:
            if not busy_since:
                busy_since.append(now)
            if now - busy_since[0] >= busy_timeout:
                raise DatabaseBusy(
                    "the database is exclusively locked by lightningd's open transaction "
                    "(it spilled SQLite's page cache), so no consistent copy can be read now")
        else:
            busy_since.clear()
        if now - started > deadline:
            raise PluginError(f"copying the database took longer than {deadline:.0f} s")

    src = dest = None
    try:
        src = nodedb.connect_ro(db_path, timeout=0, isolation_level=None,
                                check_same_thread=False)
        if _copy_file_locked(src, db_path, dest_path, busy_timeout, started, deadline):
            src.close()
            src = None
            dest = sqlite3.connect(dest_path, isolation_level=None, check_same_thread=False)
            data_version = read_data_version(dest)
            dest.close()
            dest = None
            return LocalCopy(dest_path, data_version, dest_path.stat().st_size)
        dest = sqlite3.connect(dest_path, isolation_level=None, check_same_thread=False)
        dest.execute("PRAGMA journal_mode = OFF")
        dest.execute("PRAGMA synchronous = OFF")
        try:
            src.backup(dest, pages=pages, progress=progress, sleep=0.02)
        except DatabaseBusy:
            raise
        except sqlite3.Error as exc:
            if nodedb.is_busy(exc):
                raise DatabaseBusy(f"the database is locked ({exc})") from None
            raise PluginError(f"cannot copy the database {db_path}: {exc}") from None
        src.close()
        src = None
        data_version = read_data_version(dest)
        dest.close()
        dest = None
        return LocalCopy(dest_path, data_version, dest_path.stat().st_size)
    except BaseException:
        for c in (src, dest):
            if c is not None:
                c.close()
        try:
            dest_path.unlink()
        except FileNotFoundError:
            pass
        raise


def _shared_lock(src: sqlite3.Connection, busy_timeout: float, started: float,
                 deadline: float) -> bool:
    """Open a read transaction on ``src`` that holds SQLite's SHARED lock (the caller ends
    it); False where copying the file's bytes is not safe.

    Only in rollback-journal mode (in WAL mode committed pages may live in the
    -wal file). SQLITE_BUSY for longer than ``busy_timeout`` is the hazard:
    :class:`DatabaseBusy`. Any other problem returns False, and the caller
    falls back to the backup API.
    """
    try:
        (mode,) = src.execute("PRAGMA journal_mode").fetchone()
    except sqlite3.Error as exc:
        if nodedb.is_busy(exc):
            mode = "delete"  # the busy wait below decides
        else:
            return False
    if str(mode).lower() == "wal":
        return False
    busy_since = time.monotonic()
    while True:
        try:
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # SHARED lock
            return True
        except sqlite3.Error as exc:
            if src.in_transaction:
                src.execute("ROLLBACK")
            if not nodedb.is_busy(exc):
                return False
            now = time.monotonic()
            if now - busy_since >= busy_timeout or now - started > deadline:
                raise DatabaseBusy(
                    "the database is exclusively locked by lightningd's open transaction "
                    "(it spilled SQLite's page cache), so no consistent copy can be read "
                    "now") from None
            time.sleep(0.01)


def _copy_file_locked(src: sqlite3.Connection, db_path: Path, dest_path: Path,
                      busy_timeout: float, started: float, deadline: float) -> bool:
    """Copy the database file's bytes under a SHARED lock (:func:`_shared_lock`); False
    where that is not safe or did not work (the file is then empty again)."""
    if not _shared_lock(src, busy_timeout, started, deadline):
        return False
    try:
        with open(db_path, "rb") as fin, open(dest_path, "wb") as fout:
            size = os.fstat(fin.fileno()).st_size
            copied = 0
            while copied < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(size - copied, 1 << 30))
                if n == 0:
                    break
                copied += n
        if copied == size:
            return True
    except OSError:
        pass
    finally:
        src.execute("ROLLBACK")
    os.truncate(dest_path, 0)  # the backup API starts from an empty file
    return False


class SnapshotTarget(Protocol):
    """What an upload needs from a connection (see
    :class:`cldcb.transport.connection.Connection`)."""

    async def begin_snapshot(self, snapshot_id: int, data_version: int,
                             anchor: bytes) -> None: ...

    async def send_chunk(self, snapshot_id: int, index: int,
                         sealed: bytes) -> wire.ChunkAck: ...

    async def send_chunk_frame(self, frame: bytearray) -> wire.ChunkAck: ...

    async def end_snapshot(self, snapshot_id: int, chunk_count: int,
                           manifest: bytes) -> wire.SnapshotAck: ...


class _ChunkReader:
    """Reads a copy chunk by chunk into one buffer reused for every chunk and seals it
    straight into the frame that is sent (:func:`wire.snapshot_chunk_frame`): one new
    buffer per chunk, no copy between reading and the socket but the cipher's (a fresh
    1 MiB buffer is fresh memory each time on this kind of machine). One at a time."""

    def __init__(self, copy: LocalCopy, sealer: SnapshotSealer, snapshot_id: int,
                 chunk_size: int) -> None:
        self._copy, self._sealer = copy, sealer
        self._snapshot_id = snapshot_id
        self._buf = memoryview(bytearray(chunk_size))
        self._offset = 0
        self._file: BinaryIO | None = None

    def next_frame(self, first: bool) -> tuple[bytearray | None, int]:
        """The next chunk's frame, sealed, and its plaintext size (blocking: run it in a
        thread); (None, 0) at the end, except for the first chunk (sent even when
        empty)."""
        copy = self._copy
        if self._file is None and copy.has_file:
            self._file = open(copy.path, "rb")  # noqa: SIM115 - closed by close()
        n = 0
        while n < len(self._buf):
            got = copy.read_into(self._offset + n, self._buf[n:], self._file)
            if got == 0:
                break
            n += got
        self._offset += n
        if not n and not first:
            return None, 0
        frame, at = wire.snapshot_chunk_frame(self._snapshot_id, self._sealer.chunk_count,
                                              OVERHEAD + n)
        with memoryview(frame) as out:
            self._sealer.seal_chunk_into(self._buf[:n], out[at:])
        return frame, n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def upload_snapshot(conn: SnapshotTarget, copy: LocalCopy, *, node_pub: bytes,
                          client_priv: bytes, chunk_size: int = CHUNK_SIZE,
                          window: int = WINDOW,
                          chunk_delay: float | Callable[[], float] = 0.0,
                          still_wanted: Callable[[], bool] | None = None,
                          on_progress: Callable[[int, int], None] | None = None,
                          before_end: Callable[[], None] | None = None,
                          ) -> wire.SnapshotAck:
    """Seal and stream ``copy`` to ``conn``; returns the server's ``SnapshotAck``.

    At least one chunk is sent (an empty database's copy still has a header page).
    ``chunk_delay``: seconds to wait after each chunk (or a function asked after each).
    ``still_wanted`` is checked before each chunk: False stops with
    :class:`SnapshotAborted`; the caller should then drop the connection, which
    leaves the server's previous snapshot in place.
    """
    snapshot_id = secrets.randbits(32)
    sealer = SnapshotSealer(node_pub, client_priv, new_privkey(), copy.data_version,
                            copy.anchor)
    await conn.begin_snapshot(snapshot_id, copy.data_version, copy.anchor)
    pending: deque[tuple[int, asyncio.Task[wire.ChunkAck]]] = deque()
    ahead: asyncio.Future[tuple[bytearray | None, int]] | None = None
    reader = _ChunkReader(copy, sealer, snapshot_id, chunk_size)
    sent = 0
    try:
        index = 0
        # the next chunk is read and sealed (in a thread) while this one is sent
        ahead = asyncio.ensure_future(asyncio.to_thread(reader.next_frame, True))
        while True:
            if still_wanted is not None and not still_wanted():
                raise SnapshotAborted("the snapshot is no longer needed")
            frame, n = await ahead
            ahead = None
            if frame is None:
                break
            if n == chunk_size:
                ahead = asyncio.ensure_future(asyncio.to_thread(reader.next_frame, False))
            pending.append((index, asyncio.ensure_future(conn.send_chunk_frame(frame))))
            del frame
            index += 1
            sent += n
            if on_progress is not None:
                on_progress(sent, copy.size)
            while len(pending) >= window:
                await _chunk_acked(snapshot_id, *pending.popleft())
            if n < chunk_size:
                break
            delay = chunk_delay() if callable(chunk_delay) else chunk_delay
            if delay:
                await asyncio.sleep(delay)
        while pending:
            await _chunk_acked(snapshot_id, *pending.popleft())
    except BaseException:
        tasks = [t for _, t in pending]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *([ahead] if ahead is not None else []),
                             return_exceptions=True)
        raise
    finally:
        reader.close()
    manifest = sealer.seal_manifest(int(time.time() * 1000))
    if before_end is not None:
        before_end()
    ack = await conn.end_snapshot(snapshot_id, sealer.chunk_count, manifest)
    check_snapshot_ack(ack, snapshot_id, copy.data_version)
    return ack


async def _chunk_acked(snapshot_id: int, index: int, sent: asyncio.Task[wire.ChunkAck]) -> None:
    check_chunk_ack(await sent, snapshot_id, index)
