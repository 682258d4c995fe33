"""The server's storage: per client, a log of sealed records and complete snapshots.

This docstring is the specification; the modules of this package follow it.
The store is the server's I/O edge: synchronous, called from worker threads,
with one lock per client held by the caller around every call on that client
(including the calls on the :class:`SnapshotUpload` and the iterators of the
:class:`FetchPlan` it hands out). The store never sees plaintext: records,
chunks and manifests are sealed to the node (:mod:`cldcb.core.seal`); it knows
data_versions, kinds, links, hashes, sizes and times. It knows nothing of the
protocol either: its calls answer with results of its own
(:mod:`cldcb.store.results`: :class:`Stored`, :class:`SnapshotNeeded`,
:data:`Deferred`, :class:`Holding`; a fetch's :class:`SnapshotInfo`,
:class:`ChunkFrame` and :class:`RecordFrame`), which the server
(:mod:`cldcb.server.handler`) maps to its wire messages.

Layout
------
::

    DATA_DIR/                        made by `cldcb-server init` (server_key, ...)
      clients/<client_id>/           one per registered client (lower-case c2…/c3…)
        settings.json                quota, append_only, generations; its presence
                                     is what "registered" means
        settings.history             one JSON line per registration or settings
                                     change (time_ms, by: add|set, old, new),
                                     appended and data-synced before the change
        last_seen                    unix ms of the last session (informational)
        log/NNNNNNNNNN.log           record segments, numbered from 1, contiguous
        log/NNNNNNNNNN.log.torn-OFF  bytes cut from a torn tail (kept for inspection)
        snapshots/NNNNNNNNNN.snap    complete snapshots, numbered in commit order
        snapshots/*.snap.damaged     a snapshot found damaged (kept, not offered)
        snapshots/upload-*.part      an upload in progress (flock'ed by its writer)
      recognitions/<client_id>.entry one recognition entry per client
      removed/<client_id>.<n>/       what `remove` moved aside (never deleted)

Every file that replaces another (settings, recognition entries, last_seen) is
written as ``NAME.tmp``, fsynced, renamed over ``NAME``, and the folder
fsynced. Every new file or folder has its parent folder fsynced before
anything relies on it.

Recognition entries
-------------------
One per registered client, at most :data:`~cldcb.core.wire.MAX_RECOGNITION` bytes
(a larger one is refused, the previous one kept). On put an entry is checked
(:func:`cldcb.core.recognition.check_put`: the current version, its exact length, and
the client it names is the session's own; else BadRequest, the previous one
kept). An append-only client's entry, once held, is never replaced: the same
bytes again are accepted, other bytes refused (RecognitionKept, wire code
``KEPT``); so a stolen client key cannot make recovery from ``hsm_secret``
blind. The check and the write run under the client's lock. They are listed in pages, in
client id order (:meth:`Store.recognition_page`): a file larger than the cap
(left by an older version) is skipped with a warning, never listed.

Frames
------
Records, snapshot chunks and snapshot trailers are frames
(:mod:`cldcb.store.frames`)::

    magic (4) || length (u32) || crc32(body) (u32) || crc32(first 12 bytes) (u32) || body

- record body: ``data_version (i64) || kind (u8) || link (32) || receive time
  (ms, u64) || sealed record``. The record's *hash* is SHA256 of the sealed
  bytes (:func:`cldcb.core.seal.item_hash`); it is computed, never stored.
- a snapshot file is ``b"cldcbSN1" || chunk frame* || trailer frame ||
  trailer offset (u64) || b"cldcbEND"``; chunk body ``index (u32) || sealed
  chunk``; trailer body ``data_version (i64) || anchor (32) || chunk_count
  (u32) || commit time (ms, u64) || anchored (u8) || start segment (u64) ||
  start offset (u64) || sealed manifest``.

Records and the chain
---------------------
A position in the log is ``(segment, offset)``. Only the newest segment is
written; it is rolled at 16 MiB (``segment_bytes``) and when a fresh snapshot
is committed.

The newest segment has a **zero-filled tail**: zeros are written (and
fsynced) 1 MiB at a time ahead of the records, so that appending a record
overwrites blocks the file already has and its data sync flushes only
that data, with no journal commit for a new file size. A segment's records
end where its frames end; zeros from there to the end of the file are the
tail. A segment is truncated to its records (and fsynced) before it stops
being the newest, so only the newest one ever has a tail. Sizes, quota and
``bytes_used`` count records, not the tail.

The *tip* is the newest thing held: the newest record (``Tip(data_version,
kind, hash, link)``) or, when a fresh snapshot has no record after it yet,
that snapshot's anchor (``Tip(data_version, NORMAL, anchor, link=32 zero
bytes, is_snapshot=True)``; the server's ``Status.tip_link`` is then zero, which
no record's link is). :meth:`ClientStore.append` asks
:func:`cldcb.core.dataversion.decide` about the record:

- no tip (nothing held), a SNAPSHOT decision, or a link other than the one
  the decision names → ``SnapshotNeeded(data_version, reason)`` (the server's
  ``NeedSnapshot``); nothing stored;
- the record equal to the tip (same data_version, kind, link and hash: a
  resend after a lost ack) → ``Stored`` (the server's ``Ack``) without storing
  it twice;
- otherwise quota check, write the frame **data-synced** (one
  ``pwritev(RWF_DSYNC)`` on Linux, else ``pwrite`` then ``fdatasync``: the
  data and, when the file grew, its size), and only then ``Stored``;
  the tip becomes :func:`cldcb.core.dataversion.advance` of the old one.

A *hot-path* append (``hot_path=True``: the server answering on its event
loop, where no call may wait on the disk longer than a record's own write)
that would have to grow the log first (a new segment, or more zero-filled
tail) returns ``Deferred.LOG_MUST_GROW`` having done nothing: the server then
makes the same call in a worker thread.

Every ``Stored`` names the record it answers (its data_version, kind and link, as
the request gave them). ``Stored.want_snapshot`` and ``Holding.want_snapshot`` are
true when there is no snapshot, or when the log from the newest snapshot's
start on is larger (in bytes) than that snapshot's file.

Snapshots
---------
:meth:`ClientStore.begin_snapshot` makes ``snapshots/upload-*.part``;
:meth:`SnapshotUpload.add_chunk` appends chunk frames (indexes 0, 1, 2, …;
anything else aborts the upload), unsynced, so memory stays bounded, each
put on its way to the disk as it comes (at most
:data:`~cldcb.store.snapshots.WRITEBACK_AHEAD` bytes waiting, so that the
final fsync is short and record fsyncs never queue behind it);
:meth:`SnapshotUpload.commit` then:

1. checks the chunk count and the quota;
2. looks the anchor up among the hashes of the records since the oldest
   kept snapshot (an index built on first use, then kept up to date):

   - found (a compaction or catch-up snapshot of state already in the
     chain): the snapshot's records are those after that record; the tip
     does not change. The record must have the snapshot's data_version and
     lie after the newest fresh snapshot's start, else StoreError;
   - not found (first contact, or a gap: the anchor is fresh random bytes):
     the newest segment is rolled so it is empty, the snapshot's records are
     those appended after the commit, and the tip becomes its anchor;

3. writes the trailer and footer, fsyncs the file, renames it to
   ``NNNNNNNNNN.snap``, fsyncs the folder; it returns (and the snapshot is
   visible, and counts) only after that;
4. prunes (see Retention), unless the client is append-only.

Records keep flowing while a snapshot uploads; a fresh snapshot's records
are those appended after its commit, an anchored one's those after its anchor.

Fetching
--------
:meth:`ClientStore.fetch` (-1) gives the newest complete snapshot and every
record of its chain from its start on, in log order; ``fetch(N)`` the
newest-committed snapshot with data_version ≤ N and the records of its chain
with data_version ≤ N; ``fetch(generation=G)`` the snapshot numbered G (its
``NNNNNNNNNN``), so that a client can fall back to an older generation. None
when there is no such snapshot. A snapshot's *chain* is the records that
follow it by the data_version rules (walked from its anchor as recovery walks
them, :mod:`cldcb.store.chains`), from its start up to the start of the next
fresh snapshot (a later chain), and never past the first record that does not
follow: when a fresh snapshot was set aside as damaged, its records (linked to
its anchor) are not served after the previous generation. The files are
opened when the plan is made (later pruning cannot pull them away) and read
lazily, frame by frame; each frame's checksum is verified as it is read.

:meth:`ClientStore.states` lists what can be restored: every kept snapshot
(number, data_version, commit time; its chunks read and checked, a damaged one
named with the error) with the data_version range, count and newest receive
time of its chain's records, and every snapshot set aside as damaged after the
oldest kept one, with the records that follow it (they belong to no
restorable state). It reads every kept snapshot and the log, and writes
nothing.

Retention
---------
The newest ``generations`` (default 2) complete snapshots are kept, and the
records from the oldest kept snapshot's start on; whole segments before that
are deleted. Deletion happens only after the new snapshot is durable
(published and its folder fsynced), snapshots first (oldest first, folder
fsynced), then segments (folder fsynced), so a crash in the middle leaves at
worst extra files, and every kept snapshot has all its records: there is a
usable backup at every moment. In **append-only** mode nothing a client sends
deletes anything (no pruning on commit; a replacement record is appended, the
record it replaces stays); only the server-side :meth:`Store.prune` prunes.
Files moved aside (``*.torn-*``, ``*.damaged``, ``removed/``) are never
deleted and do not count toward the quota.

Quota
-----
``bytes_used`` counts segments, published snapshots and uploads in progress.
A record or chunk that would take it over the quota raises
:class:`~cldcb.errors.QuotaExceeded` (saying how much is used, the quota, and
to ask the operator for ``cldcb-server set ID --quota SIZE``) and stores
nothing (a chunk also aborts its upload). Since the previous generations stay
until a new snapshot is complete, a quota must hold ``generations + 1``
snapshots and their logs.

Crashes and damage
------------------
Every acknowledged record and snapshot was fsynced (and its folder entry
fsynced) before the acknowledgement, so a crash at any point leaves them
readable. Opening a client's store (:meth:`Store.client`):

- zeros after the newest segment's last frame, to the end of the file, are
  its zero-filled tail: nothing to repair;
- a **torn tail** of the newest segment (a short frame, a bad checksum at
  the end, garbage after the last good frame: anything that has no valid
  frame after it, since the store only appends) is copied to
  ``NNNNNNNNNN.log.torn-OFFSET`` (fsynced), then cut, with a warning on the
  ``cldcb.store`` logger. A bad frame *followed* by a valid one, a bad frame
  in an older segment, or a missing segment is damage in the middle:
  :class:`~cldcb.errors.StoreError` naming the file and offset, every time,
  nothing cut, never a crash loop. Older segments are checked when they are
  read (fetch, the anchor index), not at every open, so opening stays cheap;
- the newest segment and the log folder are fsynced, so whatever a crashed
  process left in the page cache is durable before it is relied upon (a
  resent record is then acknowledged as already held);
- ``upload-*.part`` files no live upload holds (flock) are deleted, with a
  log line: they were never acknowledged;
- a published snapshot whose header, footer or trailer does not check is
  renamed ``*.snap.damaged`` with an error log line, and the previous
  generation is offered instead. A damaged chunk is found when fetched:
  StoreError naming the file.

A failed write or fsync of a record (ENOSPC, EIO) raises StoreError, no Ack:
the segment is cut back to where the record began and fsynced; until that
succeeds the store refuses further writes (retrying the cut first). A failed
snapshot write, fsync or rename aborts the upload (temp file, or the renamed
file when its folder fsync failed, is deleted). :mod:`cldcb.store.crashpoints`
names every step so tests kill the process there.

Concurrency
-----------
One writing instance per client at a time (the caller's per-client lock,
across processes too: :mod:`cldcb.store.locks`). Each call first checks
``settings.json`` (reloaded if changed; gone means the client was removed)
and whether the newest segment changed size, holds a frame where this
instance's records end, or a newer one appeared (then the instance reloads
from disk). A writer may skip these checks by vouching
(:meth:`ClientStore.vouch`) with its generation and the settings epoch of the
lock file: registering, changing settings and ``remove`` bump that epoch under
the lock, and no other process writes a client's files without taking over as
its writer.

Settings
--------
Only the operator's explicit word changes a client's settings.
:meth:`Store.register` (``cldcb-server add``, also through a setup key's
``forced --allow add``) writes ``settings.json`` only for a client not yet
registered; for a registered one it changes nothing. :meth:`Store.change_settings`
(``cldcb-server set``, or ``add`` with options typed at the server's shell)
changes the settings it is given and nothing else. Every registration and
change is first appended to ``settings.history``; lifting append-only is also
a warning on the ``cldcb.store`` logger (and ``cldcb-server`` prints it on
stderr).
:meth:`Store.list_clients` opens clients read-only: it repairs nothing, so it
is safe while a daemon writes.
"""

from cldcb.store.client import ClientStore, FetchPlan, SnapshotUpload
from cldcb.store.fs import FileLayer, OsFileLayer
from cldcb.store.registry import SEGMENT_BYTES, ClientInfo, Store
from cldcb.store.results import AppendResult, Deferred, Holding, SnapshotNeeded, Stored

__all__ = ["SEGMENT_BYTES", "AppendResult", "ClientInfo", "ClientStore", "Deferred",
           "FetchPlan", "FileLayer", "Holding", "OsFileLayer", "SnapshotNeeded",
           "SnapshotUpload", "Store", "Stored"]
