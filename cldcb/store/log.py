"""A client's record log: numbered segment files in ``log/`` (see :mod:`cldcb.store`).

A position in the log is ``(segment number, byte offset)``; positions compare
as tuples. Only the newest segment is ever written; it is rolled (a new,
empty segment is created and the folder fsynced) when it reaches the size
limit and before a snapshot that starts a new chain.

Zero-filled tail: the newest segment is extended with zeros (written and
fsynced, :data:`PREALLOC` at a time) ahead of the records, so that a record
overwrites blocks the file already has and its data sync flushes just
that data, not a journal commit for a new file size (about half the cost of
an append + fsync). A segment's records end where its frames end; zeros after
the last frame, up to the end of the file, are that tail and not damage.
Only the newest segment has one: before a segment stops being the newest it
is truncated to its records (and fsynced), so every older segment ends with
its last frame.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cldcb.crashpoints import crashpoint
from cldcb.errors import Damage, StoreError
from cldcb.store.frames import (
    HEADER_LEN,
    RECORD_MAGIC,
    RecordFrame,
    decode_record,
    iter_frames,
    valid_frame_after,
)
from cldcb.store.fs import FileLayer, io_error, write_all

log = logging.getLogger("cldcb.store")

Pos = tuple[int, int]
_SEGMENT = re.compile(r"^(\d{10})\.log$")
_COPY = 1 << 20
PREALLOC = 1 << 20
"""Bytes of zeros written ahead of the records of the newest segment."""
_ZEROS = bytes(1 << 16)


@dataclass(frozen=True)
class LogEntry:
    """A record as read back from the log."""

    pos: Pos
    end: Pos
    record: RecordFrame

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.record.sealed).digest()


@dataclass
class SegmentRange:
    seq: int
    path: Path
    file: BinaryIO
    start: int
    end: int


class SegmentLog:
    """The segment files of one client's log."""

    def __init__(self, fs: FileLayer, folder: Path, segment_bytes: int) -> None:
        self.fs = fs
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.sizes: dict[int, int] = {}          # each segment's records, in bytes
        self.file_end = 0                         # the newest segment's file size
        self._fd: int | None = None
        self._fd_seq = 0
        self.pending_cut: Pos | None = None
        self._paths: dict[int, Path] = {}

    def path(self, seq: int) -> Path:
        path = self._paths.get(seq)
        if path is None:
            path = self._paths[seq] = self.folder / f"{seq:010d}.log"
        return path

    @property
    def newest(self) -> int:
        return max(self.sizes) if self.sizes else 0

    def end(self) -> Pos:
        seq = self.newest
        return (seq, self.sizes[seq]) if seq else (0, 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def bytes_after(self, pos: Pos) -> int:
        return sum(size - (pos[1] if seq == pos[0] else 0)
                   for seq, size in self.sizes.items() if seq >= pos[0])

    # -- loading ---------------------------------------------------------------------
    def load(self, *, repair: bool) -> LogEntry | None:
        """Find the segments and the newest record; cut a torn tail when ``repair``."""
        self.close()
        self.sizes = {}
        self.pending_cut = None
        try:
            names = self.fs.listdir(self.folder)
        except FileNotFoundError:
            return None
        for name in names:
            m = _SEGMENT.match(name)
            if m:
                self.sizes[int(m.group(1))] = self.fs.size(self.folder / name)
        self.sizes = dict(sorted(self.sizes.items()))
        self.file_end = self.sizes[max(self.sizes)] if self.sizes else 0
        seqs = list(self.sizes)
        if seqs and seqs != list(range(seqs[0], seqs[-1] + 1)):
            missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
            raise StoreError(f"log segment {self.path(missing[0])} is missing (segments "
                             f"{seqs[0]}..{seqs[-1]} should all be there); acknowledged "
                             "records may be lost: restore it from a copy of the server, "
                             "or move the client aside (cldcb-server remove) and re-add it "
                             "so it sends a fresh snapshot")
        last: LogEntry | None = None
        for seq in reversed(seqs):
            last = self._scan(seq, tail=(seq == seqs[-1]), repair=repair)
            if last is not None:
                break
        if repair and seqs:
            self._sync_newest()
        return last

    def _scan(self, seq: int, *, tail: bool, repair: bool) -> LogEntry | None:
        """The last record of segment ``seq``; damage at a tail is cut (or ignored)."""
        path = self.path(seq)
        size = self.sizes[seq]
        last: tuple[int, bytes, int] | None = None
        with self.fs.open_read(path) as f:
            try:
                for off, body in iter_frames(f, 0, size, RECORD_MAGIC):
                    last = (off, body, off + HEADER_LEN + len(body))
            except Damage as d:
                if tail and _zeros_to_end(f, d.offset, size):
                    self.sizes[seq] = d.offset        # the zero-filled tail: not damage
                    return self._entry(seq, last)
                after = valid_frame_after(f, d.offset, size, RECORD_MAGIC) if tail else None
                if not tail or after is not None:
                    raise self._damaged(path, d, after) from None
                if repair:
                    self._cut_tail(seq, f, d)
                else:
                    self.sizes[seq] = d.offset
        return self._entry(seq, last)

    @staticmethod
    def _entry(seq: int, last: tuple[int, bytes, int] | None) -> LogEntry | None:
        if last is None:
            return None
        off, body, end = last
        return LogEntry((seq, off), (seq, end), decode_record(body))

    def _damaged(self, path: Path, d: Damage, after: int | None) -> StoreError:
        follows = (f"a valid record follows at offset {after}" if after is not None
                   else "later segments hold acknowledged records")
        return StoreError(
            f"log segment {path} is damaged at offset {d.offset} ({d.reason}) and {follows}, "
            "so this is not an interrupted write and the store will not cut it: restore "
            "the file from a copy of the server, or move the client aside "
            "(cldcb-server remove, then add) so it sends a fresh snapshot")

    def _cut_tail(self, seq: int, f: BinaryIO, d: Damage) -> None:
        path = self.path(seq)
        size = self.sizes[seq]
        saved = self.folder / f"{seq:010d}.log.torn-{d.offset}"
        try:
            crashpoint("repair.before_save_tail")
            fd = self.fs.open_write(saved, create=True, truncate=True)
            try:
                pos = d.offset
                while pos < size:
                    f.seek(pos)
                    piece = f.read(min(_COPY, size - pos))
                    if not piece:
                        break
                    write_all(self.fs, fd, piece, pos - d.offset)
                    pos += len(piece)
                crashpoint("repair.after_save_write")
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
            crashpoint("repair.after_save_fsync")
            self.fs.fsync_dir(self.folder)
            crashpoint("repair.before_truncate")
            fd = self.fs.open_write(path)
            try:
                self.fs.truncate(fd, d.offset)
                crashpoint("repair.after_truncate")
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
            crashpoint("repair.after_fsync")
            if seq == self.newest:
                self.file_end = d.offset
        except OSError as exc:
            raise io_error(exc, f"cutting the torn tail of {path}") from None
        log.warning("%s: cut %d bytes at offset %d (%s): the end of an append interrupted "
                    "by a crash, never acknowledged (or a damaged disk); the bytes are kept "
                    "in %s", path, size - d.offset, d.offset, d.reason, saved.name)
        self.sizes[seq] = d.offset

    def _sync_newest(self) -> None:
        """Make what the newest segment holds durable (a crashed process may have left
        written but unsynced bytes in the page cache) before anything relies on it."""
        path = self.path(self.newest)
        try:
            fd = self.fs.open_write(path)
            try:
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
            self.fs.fsync_dir(self.folder)
        except OSError as exc:
            raise io_error(exc, f"syncing {path}") from None

    # -- writing ---------------------------------------------------------------------
    def _writer(self) -> int:
        seq = self.newest
        if seq == 0:
            seq = self._create(1)
        elif self.sizes[seq] >= self.segment_bytes:
            seq = self._roll()
        if self._fd is None or self._fd_seq != seq:
            self.close()
            self._fd = self.fs.open_write(self.path(seq))
            self._fd_seq = seq
        return self._fd

    def _roll(self) -> int:
        """Trim the newest segment's zero-filled tail (it stops being the newest), then
        create the next one."""
        seq = self.newest
        if self.file_end > self.sizes[seq]:
            crashpoint("segment.before_trim")
            fd = self.fs.open_write(self.path(seq))
            try:
                self.fs.truncate(fd, self.sizes[seq])
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
            crashpoint("segment.after_trim")
            self.file_end = self.sizes[seq]
        return self._create(seq + 1)

    def _prealloc(self, fd: int, seq: int, need: int) -> None:
        """Extend the newest segment with zeros (fsynced) past ``need`` bytes."""
        start = self.file_end
        stop = need + PREALLOC
        crashpoint("segment.before_zero")
        pos = start
        while pos < stop:
            n = min(len(_ZEROS), stop - pos)
            write_all(self.fs, fd, _ZEROS[:n], pos)
            pos += n
        self.fs.fsync(fd)
        crashpoint("segment.after_zero")
        self.file_end = stop

    def _create(self, seq: int) -> int:
        path = self.path(seq)
        crashpoint("segment.before_create")
        fd = self.fs.open_write(path, create=True, exclusive=True)
        crashpoint("segment.after_create")
        try:
            self.fs.fsync_dir(self.folder)
        except OSError:
            self.fs.close(fd)
            self.fs.unlink(path)
            raise
        crashpoint("segment.after_fsync_dir")
        self.close()
        self._fd, self._fd_seq = fd, seq
        self.sizes[seq] = 0
        self.file_end = 0
        return seq

    def must_grow(self, frame_len: int) -> bool:
        """Whether appending ``frame_len`` bytes would first create or roll a segment, or
        zero-fill more of its tail (a megabyte and an fsync: not for an event loop)."""
        seq = self.newest
        return (seq == 0 or self.pending_cut is not None or self.sizes[seq] >= self.segment_bytes
                or self.sizes[seq] + frame_len > self.file_end)

    def append(self, frame: bytes) -> Pos:
        """Write and fsync one record frame; its position. Raises StoreError."""
        self.retry_cut()
        try:
            fd = self._writer()
        except OSError as exc:
            raise io_error(exc, f"creating a log segment in {self.folder}",
                           "nothing was stored") from None
        seq = self._fd_seq
        off = self.sizes[seq]
        crashpoint("record.before_write")
        try:
            if off + len(frame) > self.file_end:
                self._prealloc(fd, seq, off + len(frame))
            write_all(self.fs, fd, frame, off, durable=True)    # written and data-synced
            crashpoint("record.after_write")
        except OSError as exc:
            self._undo(seq, off)
            raise io_error(exc, f"writing a record to {self.path(seq)}",
                           "nothing was stored; the client will retry") from None
        crashpoint("record.after_fsync")
        self.sizes[seq] = off + len(frame)
        return (seq, off)

    def _undo(self, seq: int, off: int) -> None:
        """After a failed write or fsync: cut the segment back to ``off``, durably."""
        self.pending_cut = (seq, off)
        try:
            self.retry_cut()
        except StoreError as exc:
            log.error("%s", exc)

    def retry_cut(self) -> None:
        """Finish cutting back a failed append; until it succeeds, nothing else is written."""
        if self.pending_cut is None:
            return
        seq, off = self.pending_cut
        self.close()
        try:
            fd = self.fs.open_write(self.path(seq))
            try:
                self.fs.truncate(fd, off)
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
        except OSError as exc:
            raise io_error(exc, f"cutting back a failed write in {self.path(seq)}",
                           "the store refuses writes until it can") from None
        self.sizes[seq] = off
        if seq == self.newest:
            self.file_end = off
        self.pending_cut = None

    def start_fresh(self) -> Pos:
        """An empty newest segment (created or rolled) for a new chain; its start."""
        self.retry_cut()
        seq = self.newest
        if seq == 0:
            seq = self._create(1)
        elif self.sizes[seq] > 0:
            seq = self._roll()
        return (seq, 0)

    def prune_before(self, seq: int) -> int:
        """Delete segments numbered below ``seq`` (never the newest); bytes freed."""
        doomed = [s for s in self.sizes if s < min(seq, self.newest)]
        freed = 0
        for s in doomed:
            crashpoint("prune.before_unlink_segment")
            self.fs.unlink(self.path(s))
            crashpoint("prune.after_unlink_segment")
            freed += self.sizes.pop(s)
        if doomed:
            self.fs.fsync_dir(self.folder)
            crashpoint("prune.after_fsync_log_dir")
        return freed

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self.fs.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------
    def open_range(self, start: Pos, stop: Pos) -> list[SegmentRange]:
        """Open the segments holding ``start``..``stop`` now (reads stay valid if pruned)."""
        out: list[SegmentRange] = []
        try:
            for seq, size in self.sizes.items():
                if seq < start[0] or seq > stop[0]:
                    continue
                lo = start[1] if seq == start[0] else 0
                hi = stop[1] if seq == stop[0] else size
                if hi > lo:
                    out.append(SegmentRange(seq, self.path(seq), self.fs.open_read(self.path(seq)),
                                      lo, hi))
        except OSError as exc:
            for r in out:
                r.file.close()
            raise io_error(exc, f"opening the log of {self.folder.parent.name}") from None
        return out

    def changed_underneath(self) -> bool:
        """Whether another instance wrote the log since this one last looked: a newer
        segment, another file size, or a frame where this instance's records end."""
        seq = self.newest
        if not seq:
            return self.fs.exists(self.path(1))
        if self.fs.exists(self.path(seq + 1)) or self.fs.size(self.path(seq)) != self.file_end:
            return True
        if self.file_end == self.sizes[seq]:
            return False
        fd = os.open(self.path(seq), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return any(os.pread(fd, HEADER_LEN, self.sizes[seq]))
        finally:
            os.close(fd)


def segment_records(path: Path) -> tuple[list[RecordFrame], int]:
    """A segment file's records and the offset where they end (its zero-filled tail, if
    any, follows); StoreError if anything else follows them (for tools and tests)."""
    out: list[RecordFrame] = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            for _, body in iter_frames(f, 0, size, RECORD_MAGIC):
                out.append(decode_record(body))
        except Damage as d:
            if not _zeros_to_end(f, d.offset, size):
                raise StoreError(f"{path}: {d}") from None
            return out, d.offset
    return out, size


def _zeros_to_end(f: BinaryIO, offset: int, end: int) -> bool:
    """True if the bytes from ``offset`` to ``end`` are all zeros (the zero-filled tail)."""
    f.seek(offset)
    pos = offset
    while pos < end:
        piece = f.read(min(_COPY, end - pos))
        if not piece:
            return False
        if piece.count(0) != len(piece):
            return False
        pos += len(piece)
    return True


def iter_ranges(ranges: list[SegmentRange]) -> Iterator[LogEntry]:
    """The records of opened ranges, in log order; closes the files as it goes."""
    try:
        for r in ranges:
            try:
                for off, body in iter_frames(r.file, r.start, r.end, RECORD_MAGIC):
                    yield LogEntry((r.seq, off), (r.seq, off + HEADER_LEN + len(body)),
                                   decode_record(body))
            except Damage as d:
                raise StoreError(
                    f"log segment {r.path} is damaged at offset {d.offset} ({d.reason}) "
                    "inside acknowledged records: restore it from a copy of the server, or "
                    "fetch an older point in time") from None
            finally:
                r.file.close()
    finally:
        for r in ranges:
            r.file.close()
