"""One client's stored backup: :class:`ClientStore`, uploads and fetch plans.

The rules are in the docstring of :mod:`cldcb.store`; this module follows them.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cldcb.core import wire
from cldcb.core.dataversion import (
    Action,
    Kind,
    Tip,
    advance,
    check_data_version,
    decide,
    next_link,
    snapshot_tip,
)
from cldcb.core.seal import item_hash
from cldcb.errors import BadRequest, QuotaExceeded, StoreError
from cldcb.store.chains import ChainWalk, chain_stop, list_states
from cldcb.store.crashpoints import crashpoint
from cldcb.store.frames import ChunkFrame, RecordFrame, encode_record, frame_len
from cldcb.store.fs import FileLayer, ensure_dir, io_error, replace_file
from cldcb.store.log import LogEntry, Pos, SegmentLog, SegmentRange, iter_ranges
from cldcb.store.results import AppendResult, Deferred, Holding, SnapshotNeeded, Stored
from cldcb.store.settings import SETTINGS, read_settings
from cldcb.store.snapshots import (
    SnapshotInfo,
    TempSnapshot,
    damaged_files,
    encode_trailer,
    iter_chunks,
    load_folder,
    snapshot_path,
)

log = logging.getLogger("cldcb.store")

_KINDS = {int(k): k for k in Kind}      # a wire kind → Kind, without Enum's slow call
SEEN = "last_seen"


class ClientStore:
    """The records and snapshots of one client (see :mod:`cldcb.store`).

    Not thread-safe: the caller holds one lock per client around every call,
    including the calls of :class:`SnapshotUpload` and the iterators of
    :class:`FetchPlan` it returns. ``readonly`` instances (used for listing)
    repair nothing and refuse writes.
    """

    def __init__(self, fs: FileLayer, folder: Path, client_id: str, *,
                 segment_bytes: int, readonly: bool = False) -> None:
        self.fs = fs
        self.folder = folder
        self.client_id = client_id
        self.readonly = readonly
        self.closed = False
        self.log = SegmentLog(fs, folder / "log", segment_bytes)
        self._settings_path = str(folder / SETTINGS)
        self._uploads: weakref.WeakSet[SnapshotUpload] = weakref.WeakSet()
        self._vouched: object = None
        self._trusted: object = None
        self._load()

    # -- loading ---------------------------------------------------------------------
    def _load(self) -> None:
        self._settings_key = self._stat_settings()
        settings = read_settings(self.folder)
        if settings is None:
            raise self._not_registered()
        self.settings = settings
        if not self.readonly:
            ensure_dir(self.fs, self.folder / "log", "client_dirs")
            ensure_dir(self.fs, self.folder / "snapshots", "client_dirs")
        try:
            self.snapshots, self._next_seq = load_folder(self.fs, self.folder / "snapshots",
                                                         repair=not self.readonly)
            last = self.log.load(repair=not self.readonly)
        except OSError as exc:
            raise io_error(exc, f"opening the store of client {self.client_id}") from None
        self.tip: Tip | None = None
        self.tip_time = 0
        newest = self.snapshots[-1] if self.snapshots else None
        if newest is None:
            pass  # records without a usable snapshot are no backup: ask for one
        elif last is not None and (newest.anchored or last.pos >= newest.start):
            r = last.record
            self.tip = Tip(r.data_version, Kind(r.kind), last.hash, r.link)
            self.tip_time = r.time_ms
        else:
            self.tip = snapshot_tip(newest.data_version, newest.anchor)
            self.tip_time = newest.time_ms
        self._index: dict[bytes, tuple[Pos, Pos, int]] | None = None
        self.last_seen_ms = self._read_seen()
        self._stale = False

    def _stat_settings(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._settings_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _not_registered(self) -> StoreError:
        return StoreError(f"client {self.client_id} is not registered on this server (or was "
                          f"removed); register it with `cldcb-server add {self.client_id}`")

    def _read_seen(self) -> int | None:
        try:
            return int((self.folder / SEEN).read_text().strip())
        except (OSError, ValueError):
            return None

    def vouch(self, token: object) -> None:
        """The caller, holding the client's lock, vouches for the next call: if ``token``
        equals the one of the previous call that passed every check, no other process
        changed the client's files in between (see :mod:`cldcb.store.locks`: the
        writer's generation and the settings epoch), and the next call skips those
        checks, three ``stat`` calls that slow the record's fsync down measurably."""
        self._vouched = token

    def _ready(self, *, write: bool = False) -> None:
        """Before each call: notice removal, new settings, writes by another instance."""
        if self.closed:
            raise StoreError(f"the store of client {self.client_id} was closed (the client "
                             "was removed, or the server is stopping)")
        if write and self.readonly:
            raise StoreError(f"the store of client {self.client_id} is open read-only")
        token, self._vouched = self._vouched, None
        if token is not None and token == self._trusted and not self._stale:
            self.log.retry_cut()
            return
        self._trusted = None
        key = self._stat_settings()
        if key is None:
            raise self._not_registered()
        if key != self._settings_key:
            self._settings_key = key
            self.settings = read_settings(self.folder) or self.settings
        self.log.retry_cut()
        if not self._stale:
            try:
                self._stale = self.log.changed_underneath()
            except OSError:
                self._stale = True
        if self._stale:
            log.info("client %s: its files changed underneath; reloading", self.client_id)
            self._load()
        self._trusted = token

    # -- queries ---------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return (self.log.total_bytes + sum(s.size for s in self.snapshots)
                + sum(u.size for u in self._uploads))

    def _want_snapshot(self) -> bool:
        if not self.snapshots:
            return True
        newest = self.snapshots[-1]
        return self.log.bytes_after(newest.start) > newest.size

    def status(self) -> Holding:
        """What this server holds for the client (see :class:`Holding`)."""
        self._ready()
        t = self.tip
        snap = self.snapshots[-1] if self.snapshots else None
        return Holding(
            tip=t,
            tip_time=self.tip_time if t else 0,
            snapshot_data_version=snap.data_version if snap else -1,
            snapshot_time=snap.time_ms if snap else 0,
            bytes_used=self.bytes_used,
            quota=self.settings.quota,
            append_only=self.settings.append_only,
            want_snapshot=self._want_snapshot(),
            generations=self.settings.generations)

    def _check_quota(self, more: int, what: str) -> None:
        quota = self.settings.quota
        if quota is None:
            return
        used = self.bytes_used
        if used + more > quota:
            raise QuotaExceeded(
                f"{what} of {more} bytes would exceed client {self.client_id}'s quota on this "
                f"server: {used} of {quota} bytes are used (with "
                f"{self.settings.generations} snapshot generations kept); nothing was "
                f"stored. Ask the server operator to raise it with `cldcb-server set "
                f"{self.client_id} --quota SIZE`")

    # -- records -----------------------------------------------------------------------
    def append(self, data_version: int, kind: int, link: bytes, sealed: bytes,
               now_ms: int, *, hot_path: bool = False) -> AppendResult:
        """Store a record if it continues the chain: :class:`Stored` only once it is
        fsynced (or already held), else :class:`SnapshotNeeded` with nothing stored.

        ``hot_path`` (the server answering on its event loop): :data:`Deferred.LOG_MUST_GROW`,
        having changed nothing, if the log must grow first (see
        :meth:`SegmentLog.must_grow`)."""
        self._ready(write=True)
        check_data_version(data_version)
        k = _KINDS.get(kind)
        if k is None:
            raise BadRequest(f"record kind {kind} is unknown (0 normal, 1 PRAGMA-only)")
        if len(link) != 32:
            raise BadRequest("a record's link must be 32 bytes")
        h = item_hash(sealed)
        tip = self.tip
        if tip is not None and tip.data_version == data_version and not tip.is_snapshot \
                and (tip.kind, tip.link, tip.hash) == (k, link, h):
            return Stored(data_version, kind, link, self._want_snapshot())  # a resend
        if next_link(tip, data_version, k) == link:    # the usual case: the next change
            new_tip = Tip(data_version, k, h, link)
        else:
            decision = decide(tip, data_version, k)
            if tip is None or decision.action is Action.SNAPSHOT or decision.link is None:
                return SnapshotNeeded(data_version, decision.reason)
            if decision.link != link:
                return SnapshotNeeded(
                    data_version, f"the record does not continue this server's chain: "
                    f"{decision.reason}, so its link should be {decision.link.hex()[:16]}…, "
                    f"it is {link.hex()[:16]}…")
            new_tip = advance(tip, data_version, k, h, decision=decision)
        frame = encode_record(data_version, k, link, now_ms, sealed)
        self._check_quota(len(frame), "a record")
        if hot_path and self.log.must_grow(len(frame)):
            return Deferred.LOG_MUST_GROW
        pos = self.log.append(frame)
        self.tip = new_tip
        self.tip_time = now_ms
        if self._index is not None:
            self._index[h] = (pos, (pos[0], pos[1] + len(frame)), data_version)
        return Stored(data_version, kind, link, self._want_snapshot())

    def _ensure_index(self) -> dict[bytes, tuple[Pos, Pos, int]]:
        """hash → (position, end, data_version) of the records since the oldest snapshot."""
        if self._index is None:
            start = min((s.start for s in self.snapshots), default=(0, 0))
            index: dict[bytes, tuple[Pos, Pos, int]] = {}
            for e in iter_ranges(self.log.open_range(start, self.log.end())):
                index[e.hash] = (e.pos, e.end, e.record.data_version)
            self._index = index
        return self._index

    # -- snapshots ---------------------------------------------------------------------
    def begin_snapshot(self, data_version: int, anchor: bytes, now_ms: int) -> SnapshotUpload:
        """Start receiving a snapshot of state ``data_version``; chunks go to a temp file."""
        self._ready(write=True)
        check_data_version(data_version)
        if len(anchor) != 32:
            raise BadRequest("a snapshot's anchor must be 32 bytes")
        upload = SnapshotUpload(self, data_version, anchor, now_ms)
        self._uploads.add(upload)
        return upload

    def _anchor_end(self, anchor: bytes, data_version: int) -> Pos | None:
        """Where the records after a snapshot anchored in the log begin (None: fresh)."""
        hit = self._ensure_index().get(anchor)
        if hit is None:
            return None
        pos, end, dv = hit
        if dv != data_version:
            raise BadRequest(f"the snapshot of data_version {data_version} names as its anchor "
                             f"the record of data_version {dv}; an anchor must be the hash of "
                             "the newest record the snapshot contains")
        fresh = [s.start for s in self.snapshots if not s.anchored]
        if fresh and pos < fresh[-1]:
            raise BadRequest(f"the snapshot of data_version {data_version} is anchored to a "
                             "record from before the newest fresh snapshot: it does not belong "
                             "to the chain this server holds")
        return end

    def _commit(self, up: SnapshotUpload, chunk_count: int, manifest: bytes,
                now_ms: int) -> None:
        self._ready(write=True)
        temp = up.temp
        if chunk_count != temp.chunks:
            raise BadRequest(f"the snapshot ends with chunk_count {chunk_count} but "
                             f"{temp.chunks} chunks arrived; nothing was stored")
        self._check_quota(len(manifest) + 128, "the snapshot")
        end = self._anchor_end(up.anchor, up.data_version)
        seq = self._next_seq
        final = snapshot_path(self.folder / "snapshots", seq)
        try:
            start = end if end is not None else self.log.start_fresh()
            trailer = encode_trailer(up.data_version, up.anchor, chunk_count, now_ms,
                                     end is not None, start, manifest)
            temp.finish(trailer)
            temp.publish(final)
        except OSError as exc:
            if temp.path == final:
                self._stale = True  # renamed but not synced: abort() deletes it; re-read
            raise io_error(exc, f"storing the snapshot of data_version {up.data_version}",
                           "it is not acknowledged; the client will send it again") from None
        info = SnapshotInfo(seq, final, up.data_version, up.anchor, chunk_count, now_ms,
                            end is not None, start, manifest, temp.size, temp.trailer_offset)
        self.snapshots.append(info)
        self._next_seq = seq + 1
        if end is None:
            self.tip = snapshot_tip(up.data_version, up.anchor)
            self.tip_time = now_ms
        crashpoint("snapshot.after_commit")
        if not self.settings.append_only:
            try:
                self.prune()
            except (OSError, StoreError) as exc:
                self._stale = True
                log.error("client %s: pruning old snapshots failed (%s); the new snapshot is "
                          "safe and pruning is tried again at the next one", self.client_id, exc)

    def prune(self, generations: int | None = None) -> int:
        """Keep the newest ``generations`` snapshots and the records from the oldest kept
        one on; delete the rest. Bytes freed. Raises OSError."""
        self._ready(write=True)
        keep_n = generations or self.settings.generations
        drop = self.snapshots[:-keep_n] if len(self.snapshots) > keep_n else []
        keep = self.snapshots[len(drop):]
        freed = 0
        if not keep:
            return 0
        crashpoint("prune.before")
        for s in drop:
            crashpoint("prune.before_unlink_snapshot")
            self.fs.unlink(s.path)
            crashpoint("prune.after_unlink_snapshot")
            freed += s.size
        if drop:
            self.fs.fsync_dir(self.folder / "snapshots")
            crashpoint("prune.after_fsync_snapshot_dir")
        self.snapshots = keep
        oldest = min(s.start for s in keep)
        freed += self.log.prune_before(oldest[0])
        if self._index is not None:
            self._index = {h: v for h, v in self._index.items() if v[0] >= oldest}
        crashpoint("prune.done")
        if freed:
            log.info("client %s: pruned %d bytes (%d snapshots kept)", self.client_id, freed,
                     len(keep))
        return freed

    # -- fetching ----------------------------------------------------------------------
    def fetch(self, at_data_version: int = -1, *,
              generation: int | None = None) -> FetchPlan | None:
        """The newest snapshot (with data_version ≤ ``at_data_version``, if given; the
        snapshot numbered ``generation``, if given) and the records of its chain after it;
        None when there is no such snapshot."""
        self._ready()
        if at_data_version != -1:
            check_data_version(at_data_version)
        candidates = [s for s in self.snapshots
                      if (at_data_version == -1 or s.data_version <= at_data_version)
                      and (generation is None or s.seq == generation)]
        if not candidates:
            return None
        chosen = candidates[-1]
        stop = chain_stop(self.snapshots, chosen, self.log.end())
        try:
            snap_file = self.fs.open_read(chosen.path)
        except OSError as exc:
            raise io_error(exc, f"opening snapshot {chosen.path}") from None
        ranges = self.log.open_range(chosen.start, stop) if chosen.start < stop else []
        return FetchPlan(chosen, snap_file, ranges, at_data_version)

    def states(self) -> list[wire.RestorableState]:
        """What a client can restore from here: every kept snapshot generation (its chunks
        read and checked) with the data_version range of its chain's records, and the
        generations set aside as damaged; oldest first (see :mod:`cldcb.store.chains`)."""
        self._ready()
        try:
            return list_states(self.fs, self.log, self.snapshots,
                               damaged_files(self.fs, self.folder / "snapshots"))
        except OSError as exc:
            raise io_error(exc, f"listing the states of client {self.client_id}") from None

    def touch(self, now_ms: int) -> None:
        """Remember when the client was last seen (kept in ``last_seen``)."""
        self._ready()
        self.last_seen_ms = now_ms
        if self.readonly:
            return
        try:
            replace_file(self.fs, self.folder / SEEN, f"{now_ms}\n".encode(), "seen")
        except OSError as exc:
            log.warning("client %s: %s", self.client_id,
                        io_error(exc, "recording when it was last seen"))

    def close(self) -> None:
        """Abort uploads in progress and close files; the instance is unusable after."""
        for up in list(self._uploads):
            up.abort()
        self.log.close()
        self.closed = True


class SnapshotUpload:
    """One snapshot being received. Indexes must come in order 0, 1, 2, …"""

    def __init__(self, owner: ClientStore, data_version: int, anchor: bytes,
                 now_ms: int) -> None:
        self.owner = owner
        self.data_version = data_version
        self.anchor = anchor
        self.began_ms = now_ms
        self.done = False
        try:
            self.temp = TempSnapshot(owner.fs, owner.folder / "snapshots")
        except OSError as exc:
            raise io_error(exc, "starting a snapshot upload") from None

    @property
    def size(self) -> int:
        return 0 if self.done else self.temp.size

    def _check_open(self) -> None:
        if self.done:
            raise BadRequest("this snapshot upload is already finished or aborted; "
                             "begin a new one")

    def add_chunk(self, index: int, sealed: bytes) -> None:
        self._check_open()
        if index != self.temp.chunks:
            self.abort()
            raise BadRequest(f"snapshot chunk {index} arrived where chunk {self.temp.chunks} "
                             "belongs; the upload is aborted, begin it again")
        try:
            self.owner._check_quota(frame_len(4 + len(sealed)), "a snapshot chunk")
            self.temp.add_chunk(index, sealed)
        except QuotaExceeded:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise io_error(exc, "writing a snapshot chunk", "the upload is aborted") from None

    def commit(self, chunk_count: int, manifest: bytes, now_ms: int) -> None:
        """Make the snapshot durable and visible; returns only once it is."""
        self._check_open()
        try:
            self.owner._commit(self, chunk_count, manifest, now_ms)
        except BaseException:
            self.abort()
            raise
        self.done = True
        self.owner._uploads.discard(self)

    def abort(self) -> None:
        """Drop the upload and its temp file (nothing was acknowledged)."""
        if self.done:
            return
        self.done = True
        self.temp.discard()
        self.owner._uploads.discard(self)


class FetchPlan:
    """A snapshot (:attr:`snapshot`), its chunks and the records of its chain after it;
    files are opened now and read lazily."""

    def __init__(self, info: SnapshotInfo, snap_file: BinaryIO, ranges: list[SegmentRange],
                 at_data_version: int) -> None:
        self.snapshot = info
        self._snap_file = snap_file
        self._ranges = ranges
        self._at = at_data_version

    def chunks(self) -> Iterator[ChunkFrame]:
        return iter_chunks(self._snap_file, self.snapshot)

    def records(self) -> Iterator[RecordFrame]:
        return self._records(iter_ranges(self._ranges))

    def _records(self, entries: Iterator[LogEntry]) -> Iterator[RecordFrame]:
        at = self._at
        for e in ChainWalk(self.snapshot, pass_breaks=True).follow(entries):
            r = e.record
            if at == -1 or r.data_version <= at:
                yield r

    def close(self) -> None:
        self._snap_file.close()
        for r in self._ranges:
            r.file.close()

    def __enter__(self) -> FetchPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
