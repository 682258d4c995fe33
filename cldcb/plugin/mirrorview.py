"""A snapshot of the plugin's mirror read in place: no copy of it is written.

Why: a snapshot of the mirror used to be a copy of its file into a temporary
file. On the machine it was measured on, writing 1 GiB into new page cache
cost 2.7 s of system CPU (more while a server wrote the same snapshot), on the
two cores the hook path and the servers share, and the copy's writeback then
made the servers' record fsyncs wait. Now the upload reads the mirror's own
file.

How its bytes stay still
------------------------
The mirror's thread checkpoints the mirror with ``wal_checkpoint(TRUNCATE)``
(every frame is in the database file, the WAL is empty) and at once, before
it applies anything else, begins a read transaction on a second connection
(:meth:`MirrorView.begin`). SQLite's ``walTryBeginRead`` (``src/wal.c``) gives
a reader that begins while the WAL is completely backfilled
``WAL_READ_LOCK(0)``: it reads the database file only. ``walCheckpoint`` must
hold ``WAL_READ_LOCK(0)`` exclusively before it writes any frame back into
the database file, so while the view lives no checkpoint changes the file (an
automatic one backs off; the mirror's connection goes on applying changes into
its WAL, which grows meanwhile). Restarting or truncating the WAL needs only
read locks 1..N, which this reader does not use. One view at a time: the
mirror refuses a new snapshot while one is open (its checkpoint could not
finish).

The bytes are read with ``pread`` from a descriptor (:class:`FileRef`) opened
with the mirror's connection and closed only once neither that connection nor
a view needs it: closing any descriptor of a file drops every POSIX lock the
process holds on it (SQLite's among them).

The end of a view
-----------------
:meth:`MirrorView.close` (the copy is no longer needed) ends the read
transaction. When the mirror's connection closes (the mirror is discarded or
rebuilt, the plugin stops) its open views are *revoked* first, while that
connection still holds the file: a read after that raises
:class:`~cldcb.errors.PluginError` (the upload fails and is tried again later)
and every byte read before it was the snapshot's. (Closed the other way round,
the reader would be the file's last connection, and SQLite would checkpoint
the WAL into the file and delete the WAL by its name, perhaps a new mirror's.)

The header
----------
The mirror's file says WAL (header bytes 18 and 19 are 2). The copies uploaded
before were set to ``journal_mode = DELETE``, which writes page 1 once: bytes
18 and 19 become 1, the file change counter (offset 24) one more, the
version-valid-for number (92) equal to it, and ``SQLITE_VERSION_NUMBER`` (96).
A view presents exactly those bytes (:func:`rollback_header`), so a restored
database is the same file as before, and opens in rollback-journal mode.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from cldcb.errors import PluginError
from cldcb.node.nodedb import read_data_version

HEADER = 100
_WAL_FORMAT = b"\x02\x02"


def rollback_header(header: bytes) -> bytes:
    """The first :data:`HEADER` bytes of a checkpointed WAL-mode database as
    ``PRAGMA journal_mode = DELETE`` leaves them (see the module docstring)."""
    if len(header) < HEADER or header[18:20] != _WAL_FORMAT:
        raise PluginError("the mirror's file is not a WAL-mode SQLite database")
    counter = (int.from_bytes(header[24:28], "big") + 1) & 0xFFFFFFFF
    major, minor, patch = sqlite3.sqlite_version_info
    version = major * 1_000_000 + minor * 1000 + patch
    out = bytearray(header[:HEADER])
    out[18:20] = b"\x01\x01"
    out[24:28] = out[92:96] = counter.to_bytes(4, "big")
    out[96:100] = version.to_bytes(4, "big")
    return bytes(out)


class FileRef:
    """A read-only descriptor of one file, closed when its last user lets go."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._users = 1
        self._lock = threading.Lock()

    def acquire(self) -> FileRef:
        with self._lock:
            if self._users == 0:
                raise PluginError("the mirror's file was already let go")
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            os.close(self.fd)


class MirrorView:
    """The mirror's file held at one data_version (see the module docstring). A
    :class:`~cldcb.plugin.snapshot.CopySource`."""

    def __init__(self, reader: sqlite3.Connection, file: FileRef, data_version: int,
                 size: int, header: bytes, on_close: Callable[[MirrorView], None]) -> None:
        self._reader: sqlite3.Connection | None = reader
        self._file = file
        self.data_version = data_version
        self.size = size
        self._header = header
        self._on_close = on_close
        self._lock = threading.Lock()
        self.revoked = False

    @classmethod
    def begin(cls, path: Path, file: FileRef,
              on_close: Callable[[MirrorView], None]) -> MirrorView:
        """Hold ``path`` (whose WAL was just checkpointed with TRUNCATE, nothing applied
        since; ``file`` is a descriptor of it) at the state it holds now."""
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        file.acquire()
        try:
            reader.execute("BEGIN")
            data_version = read_data_version(reader)   # the read transaction starts here
            if data_version is None:
                raise PluginError("the mirror has no vars.data_version")
            size = os.fstat(file.fd).st_size
            header = rollback_header(os.pread(file.fd, HEADER, 0))
        except BaseException:
            reader.close()
            file.release()
            raise
        return cls(reader, file, data_version, size, header, on_close)

    @property
    def alive(self) -> bool:
        return self._reader is not None

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Read up to ``len(buf)`` bytes from ``offset`` into ``buf`` (no new buffer: the
        upload reuses one); how many (fewer only at the view's end)."""
        want = max(0, min(len(buf), self.size - offset))
        got = 0
        with self._lock:
            if self._reader is None:
                raise PluginError("the snapshot of the mirror was revoked (the mirror was "
                                  "thrown away, rebuilt or closed)" if self.revoked
                                  else "the snapshot of the mirror is closed")
            while got < want:
                n = os.preadv(self._file.fd, [buf[got:want]], offset + got)
                if n == 0:
                    raise PluginError(f"the mirror's file ended at {offset + got} of "
                                      f"{self.size} bytes")
                got += n
        if offset < HEADER and got:
            end = min(HEADER, offset + got)
            buf[:end - offset] = self._header[offset:end]
        return got

    def close(self) -> None:
        """End the read transaction (the copy is no longer needed)."""
        self._end(revoke=False)

    def revoke(self) -> None:
        """End it now, while the mirror's connection still holds the file (see above)."""
        self._end(revoke=True)

    def _end(self, revoke: bool) -> None:
        with self._lock:
            reader, self._reader = self._reader, None
            if reader is None:
                return
            self.revoked = revoke
            try:
                reader.close()                 # (rolls the read transaction back)
            finally:
                self._file.release()
        self._on_close(self)
