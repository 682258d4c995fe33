"""Snapshot files of one client: ``snapshots/NNNNNNNNNN.snap`` (see :mod:`cldcb.store`).

A snapshot file is::

    b"cldcbSN1" || chunk frame* || trailer frame || trailer offset (u64) || b"cldcbEND"

It is written as ``upload-*.part`` (flock'ed by the process writing it, so
that another opener never takes a live upload for debris), fsynced, renamed
to its final name and the folder fsynced; only then does it exist. While it
is received its chunks are put on their way to the disk as they come, at
most :data:`WRITEBACK_AHEAD` bytes of it waiting (``sync_file_range``, not a
durability point), so that its final fsync is short and never holds the
record fsyncs on the same disk behind a whole database of dirty pages.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cldcb.errors import Damage, StoreError
from cldcb.store.crashpoints import crashpoint
from cldcb.store.frames import (
    CHUNK_MAGIC,
    FOOTER,
    FOOTER_MAGIC,
    SNAPSHOT_HEADER,
    TRAILER_HEAD,
    TRAILER_MAGIC,
    ChunkFrame,
    chunk_head,
    decode_chunk,
    encode_frame,
    iter_frames,
    read_frame,
)
from cldcb.store.fs import FileLayer, write_all
from cldcb.store.log import Pos

log = logging.getLogger("cldcb.store")

_SNAP = re.compile(r"^(\d{10})\.snap(\.damaged)?$")
_PART = re.compile(r"^upload-.*\.part$")


@dataclass(frozen=True)
class SnapshotInfo:
    """A complete, published snapshot."""

    seq: int
    path: Path
    data_version: int
    anchor: bytes
    chunk_count: int
    time_ms: int
    anchored: bool          # the anchor is a record of the log (compaction / catch-up)
    start: Pos              # where the records that follow it begin in the log
    manifest: bytes
    size: int
    trailer_offset: int


def snapshot_path(folder: Path, seq: int) -> Path:
    return folder / f"{seq:010d}.snap"


def encode_trailer(data_version: int, anchor: bytes, chunk_count: int, time_ms: int,
                   anchored: bool, start: Pos, manifest: bytes) -> bytes:
    return encode_frame(TRAILER_MAGIC, TRAILER_HEAD.pack(
        data_version, anchor, chunk_count, time_ms, int(anchored), start[0], start[1]),
        manifest)


def read_info(fs: FileLayer, path: Path, seq: int) -> SnapshotInfo:
    """The trailer of a published snapshot; Damage if it does not check."""
    size = fs.size(path)
    end = size - FOOTER.size
    with fs.open_read(path) as f:
        if end < len(SNAPSHOT_HEADER) or f.read(len(SNAPSHOT_HEADER)) != SNAPSHOT_HEADER:
            raise Damage(0, "the file header is missing")
        f.seek(end)
        trailer_offset, magic = FOOTER.unpack(f.read(FOOTER.size))
        if magic != FOOTER_MAGIC or not len(SNAPSHOT_HEADER) <= trailer_offset < end:
            raise Damage(end, "the footer is damaged")
        body, nxt = read_frame(f, trailer_offset, end, TRAILER_MAGIC)
        if nxt != end or len(body) < TRAILER_HEAD.size:
            raise Damage(trailer_offset, "the trailer is damaged")
    dv, anchor, count, time_ms, anchored, sseg, soff = TRAILER_HEAD.unpack_from(body, 0)
    return SnapshotInfo(seq, path, dv, anchor, count, time_ms, bool(anchored), (sseg, soff),
                        body[TRAILER_HEAD.size:], size, trailer_offset)


def _in_use(path: Path) -> bool:
    """True when a live upload (this process or another) holds the temp file's flock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def load_folder(fs: FileLayer, folder: Path, *, repair: bool) -> tuple[list[SnapshotInfo], int]:
    """Published snapshots (oldest first) and the next free number.

    With ``repair``: a damaged snapshot is renamed ``*.snap.damaged`` (kept, and no
    longer offered) and abandoned upload temp files are deleted, each with a log line.
    """
    try:
        names = sorted(fs.listdir(folder))
    except FileNotFoundError:
        return [], 1
    found: list[SnapshotInfo] = []
    top = 0
    for name in names:
        path = folder / name
        m = _SNAP.match(name)
        if m:
            seq = int(m.group(1))
            top = max(top, seq)
            if m.group(2):
                continue
            try:
                found.append(read_info(fs, path, seq))
            except (Damage, OSError) as exc:
                log.error("%s is damaged (%s): %s; the previous snapshot generation is "
                          "offered instead", path, exc,
                          f"set aside as {name}.damaged" if repair else "ignored")
                if repair:
                    fs.rename(path, path.with_name(name + ".damaged"))
                    fs.fsync_dir(folder)
        elif repair and _PART.match(name) and not _in_use(path):
            crashpoint("open.before_discard_temp")
            fs.unlink(path)
            crashpoint("open.after_discard_temp")
            log.info("%s: deleted an abandoned snapshot upload (never acknowledged)", path)
    return found, top + 1


def damaged_files(fs: FileLayer, folder: Path) -> list[tuple[int, Path]]:
    """The snapshots set aside as ``*.snap.damaged``: (number, path), oldest first."""
    try:
        names = sorted(fs.listdir(folder))
    except FileNotFoundError:
        return []
    return [(int(m.group(1)), folder / name) for name in names
            if (m := _SNAP.match(name)) and m.group(2)]


WRITEBACK_AHEAD = 8 << 20
"""Bytes of an upload written but not yet waited onto the disk, at most (plus a chunk)."""


class TempSnapshot:
    """A snapshot being uploaded: chunks streamed to a temp file, bounded memory."""

    def __init__(self, fs: FileLayer, folder: Path) -> None:
        self.fs = fs
        self.folder = folder
        crashpoint("snapshot.before_create_temp")
        for _ in range(100):
            self.path = folder / f"upload-{os.getpid()}-{os.urandom(6).hex()}.part"
            try:
                self._fd: int | None = fs.open_write(self.path, create=True, exclusive=True)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "no free temp file name")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a FileLayer without real descriptors: no protection from other openers
        crashpoint("snapshot.after_create_temp")
        self.size = 0
        self.chunks = 0
        self._written_back = 0
        self.trailer_offset = 0
        self._write(SNAPSHOT_HEADER)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        write_all(self.fs, self._fd, data, self.size)
        self.size += len(data)

    def add_chunk(self, index: int, sealed: bytes | memoryview) -> None:
        """Append the chunk's frame: its header, then ``sealed`` as it is (not a copy of
        the two joined: the same bytes as :func:`encode_chunk`)."""
        crashpoint("snapshot.before_chunk_write")
        start = self.size
        self._write(chunk_head(index, sealed))
        self._write(sealed)
        crashpoint("snapshot.after_chunk_write")
        self.chunks += 1
        self._write_back(start)

    def _write_back(self, start: int) -> None:
        """Start writing the bytes from ``start`` to the disk, and wait for those more than
        :data:`WRITEBACK_AHEAD` behind: otherwise a whole database's dirty pages pile up
        and the commit's fsync writes them all at once, which holds every other fsync on
        the disk (each record's) for as long (ext4 commits its journal in order)."""
        assert self._fd is not None
        self.fs.writeback(self._fd, start, self.size - start, wait=False)
        behind = self.size - WRITEBACK_AHEAD
        if behind > self._written_back:
            self.fs.writeback(self._fd, self._written_back, behind - self._written_back,
                              wait=True)
            self._written_back = behind

    def finish(self, trailer: bytes) -> None:
        """Write the trailer and footer, fsync, close."""
        assert self._fd is not None
        self.trailer_offset = self.size
        crashpoint("snapshot.before_manifest_write")
        self._write(trailer + FOOTER.pack(self.trailer_offset, FOOTER_MAGIC))
        crashpoint("snapshot.after_manifest_write")
        self.fs.fsync(self._fd)
        crashpoint("snapshot.after_fsync")
        fd, self._fd = self._fd, None
        self.fs.close(fd)

    def publish(self, final: Path) -> None:
        """Rename into place and fsync the folder: from then on the snapshot exists."""
        crashpoint("snapshot.before_rename")
        self.fs.rename(self.path, final)
        self.path = final
        crashpoint("snapshot.after_rename")
        self.fs.fsync_dir(self.folder)
        crashpoint("snapshot.after_fsync_dir")

    def discard(self) -> None:
        """Close and delete the temp file (best effort; open() deletes leftovers)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self.fs.close(fd)
            except OSError:
                pass
        crashpoint("snapshot.before_abort_unlink")
        try:
            self.fs.unlink(self.path)
        except OSError:
            pass
        crashpoint("snapshot.after_abort_unlink")

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                self.fs.close(self._fd)  # type: ignore[arg-type]
            except OSError:
                pass


def iter_chunks(f: BinaryIO, info: SnapshotInfo) -> Iterator[ChunkFrame]:
    """The chunks of a published snapshot, checked; closes ``f`` when done."""
    try:
        expect = 0
        try:
            for _, body in iter_frames(f, len(SNAPSHOT_HEADER), info.trailer_offset,
                                       CHUNK_MAGIC):
                index, sealed = decode_chunk(body)
                if index != expect:
                    raise Damage(0, f"chunk {index} stands where chunk {expect} belongs")
                expect += 1
                yield ChunkFrame(index, sealed)
        except Damage as d:
            raise StoreError(f"snapshot file {info.path} is damaged ({d}); fetch an older "
                             "point in time, or restore the file from a copy") from None
        if expect != info.chunk_count:
            raise StoreError(f"snapshot file {info.path} holds {expect} chunks, its trailer "
                             f"says {info.chunk_count}; it is damaged")
    finally:
        f.close()
