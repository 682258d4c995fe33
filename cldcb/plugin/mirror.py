"""The local mirror: a copy of the node's database kept from the change stream.

Why: a compaction or a returning server's catch-up needs a snapshot, and a
consistent copy of lightningd's database can only be read while a hook call
holds lightningd still; a big database's copy (about 4 s per GiB on ext4)
would freeze lightningd for that long. The mirror is a second SQLite file,
built from the very changes the plugin already seals and sends; snapshots
are read from it, in place, while lightningd goes on.

Where and what it costs
-----------------------
``<lightning-dir>/<network>/cldcb-mirror.sqlite3`` (mode 0600, with its
``-wal``/``-shm`` files while the plugin runs): one more copy of the
database on the node's disk, and the same writes again in the background.
``# mirror = off`` in the wrapper turns it off (every snapshot is then
copied from lightningd's database inside a hook call, as before).

How a change reaches it (all in the mirror's thread, never on the hook's path)
------------------------------------------------------------------------------
:meth:`Mirror.feed` only puts ``(seq, data_version, kind, writes)`` on a
queue. The thread walks the stream with the rules of
:mod:`cldcb.core.dataversion`, exactly as :class:`~cldcb.node.replay.Replayer` does,
but a change is *held* (in memory, not applied) until it is known to be
committed:

* the next change's decision says so: APPEND means the held change was
  committed (it is applied: a normal change's statements, after which
  ``vars.data_version`` must be its data_version; a PRAGMA-only change
  outside any transaction, once the open one is committed); REPLACE means it
  was not (it is dropped);
* or the live database says so: when the thread reads ``vars.data_version``
  of lightningd's database (see *checking*) and finds the held normal
  change's data_version there, lightningd committed it (within one plugin
  process lightningd commits only what the hook answered), and it is
  applied, provided no other item waits on the queue;
* at the end (:meth:`Mirror.close`), the same test once more.

Committed changes are applied in large transactions: one stays open for up to
:data:`BATCH` changes or :data:`BATCH_SECONDS` after its first, and is committed
earlier whenever the mirror's committed state is needed (a snapshot, a piece
of the check, a PRAGMA-only change, the end). A transaction per change wrote
each change's pages to the WAL again (about three 4 KiB frames per change);
the mirror's thread spent most of its time there. The result is the one a
transaction per change gives, ``.dump`` for ``.dump``, for the reasons
:mod:`cldcb.node.replay` gives: each statement sees exactly the changes before
it, and foreign keys are immediate constraints (a cascade happens at its
statement). No savepoint is needed: only committed changes are applied, and a
statement that fails throws the whole mirror away. A change is *applied*
(:attr:`Mirror.data_version`) once its transaction is committed.

A SNAPSHOT decision (a gap), a statement that fails, or a change that leaves
another data_version means the mirror cannot follow: it is *discarded*
(logged, its files deleted). The connection has ``foreign_keys`` on, as
lightningd's has. The file is in WAL mode with ``synchronous = NORMAL``: a
killed plugin leaves it consistent at the last change applied. The thread
runs at the plugin's own CPU priority, not a nicer one: it shares the GIL
with the hook path, and a nicer thread holding the GIL is scheduled less often
on a busy machine while the hook path waits for it (``bench/gil_priority.py``).

Snapshots (:meth:`Mirror.snapshot`)
-----------------------------------
A request names the data_version the snapshot must hold (the state before
the hook call that asked: the engine sends it from that call, after the
call's own change was fed, so the queue puts it exactly there). The thread
checks that the mirror holds that data_version, checkpoints the WAL
(TRUNCATE) and holds the mirror's file at that state with a read transaction
of its own (:class:`~cldcb.plugin.mirrorview.MirrorView`): the answer is a
:class:`~cldcb.plugin.snapshot.LocalCopy` whose bytes are read in place from
the mirror's file (presented as the rollback-journal file a copy set to
``journal_mode = DELETE`` was), and no copy is written. The mirror goes on
applying changes into its WAL meanwhile; its file does not change until the
copy is let go (see :mod:`cldcb.plugin.mirrorview`). One such snapshot at a
time: a request while one is still read fails. Anything else fails the
request with :class:`MirrorUnusable`. A discarded or rebuilt mirror revokes the
snapshot being read (its upload fails and is tried again later).

Rebuilding (:meth:`Mirror.rebuild`)
-----------------------------------
A snapshot copied from lightningd's database (the first one, a gap, or any
copy taken while the mirror is not usable) replaces the mirror, the stream
restarts at its data_version, and the changes already fed with ``seq`` at or
after the copy's ``next_seq`` (the last :data:`RETAIN` changes are kept for
this; those fed later wait on the queue) are walked again on top. A blocking
snapshot's copy is *handed over*: once no upload reads it any more (the mirror
changes its file from then on) the thread renames that very file into place,
never copying it again (the thread waits for it meanwhile; a copy on another
file system is copied). Any other copy's file is copied in once it is whole.

At start
--------
An existing mirror is used if its ``vars.data_version`` equals the live
database's (lightningd has not written since the plugin stopped); otherwise
it is discarded (it lost changes that were committed while its thread was
behind, e.g. the plugin was killed). No mirror: it is *absent* until the
next snapshot taken from lightningd's database rebuilds it.

Checking (the mirror is checked, not trusted)
---------------------------------------------
While it is usable the thread compares it with the live database
(:mod:`cldcb.plugin.mirrorcheck`: small pieces, each a short read of the live
database at the data_version the mirror holds), at most one piece every
:data:`CHECK_INTERVAL` seconds and only when its queue is empty. On any
difference the mirror is discarded and the log says where; the next snapshot
comes from lightningd's database the old way (inside a hook call) and
rebuilds it.

Thread safety: :meth:`feed`, :meth:`snapshot`, :meth:`rebuild`,
:meth:`close` and the read-only properties may be used from any thread;
everything else runs in the mirror's thread. ``notify(level, message)`` is
called from that thread and must be thread-safe.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cldcb.core.dataversion import (
    STAND_IN_ANCHOR,
    Action,
    DataVersionError,
    Kind,
    Tip,
    advance,
    decide,
    snapshot_tip,
    stand_in_hash,
)
from cldcb.errors import MirrorDiffers, MirrorDiscarded, MirrorUnusable, PluginError
from cldcb.node.nodedb import DATA_VERSION_SQL, connect_ro, is_busy, new_copy_file
from cldcb.plugin.mirrorcheck import Checker
from cldcb.plugin.mirrorview import FileRef, MirrorView
from cldcb.plugin.snapshot import Handover, LocalCopy, read_data_version

MIRROR_NAME = "cldcb-mirror.sqlite3"
CHECK_INTERVAL = 0.1
"""Seconds between two pieces of the check (the throttle)."""
RETAIN = 256
"""Changes kept after they were walked, so that a rebuild can walk them again."""
RETAIN_BYTES = 16 * 1024 * 1024
BATCH = 1000
"""Committed changes applied in one transaction at most."""
BATCH_SECONDS = 0.25
"""An open transaction is committed this long after its first change at the latest (so
that a plugin killed in a quiet moment leaves the mirror at the database's state)."""

Notify = Callable[[str, str], None]


def _reached(conn: sqlite3.Connection) -> int:
    """``vars.data_version`` after a change: one query where ``vars`` holds it (every
    change but a database's first), :func:`read_data_version` otherwise."""
    with contextlib.suppress(sqlite3.Error):
        row = conn.execute(DATA_VERSION_SQL).fetchone()
        if row is not None and isinstance(row[0], int):
            return int(row[0])
    return read_data_version(conn)


@dataclass(frozen=True)
class _Change:
    seq: int
    data_version: int
    kind: Kind
    writes: Sequence[str]

    @property
    def size(self) -> int:
        return sum(len(w) for w in self.writes)


@dataclass(frozen=True)
class _Snapshot:
    data_version: int
    folder: Path
    future: concurrent.futures.Future[LocalCopy]


@dataclass(frozen=True)
class _Rebuild:
    path: Path
    data_version: int
    next_seq: int
    done: Callable[[], None]
    ready: Callable[[], None] | None = None
    handover: Handover | None = None


_STOP = object()


class Mirror:
    """See the module docstring. :meth:`start` it, :meth:`close` it."""

    def __init__(self, path: Path, live_db: Path, *, notify: Notify,
                 on_state: Callable[[], None] | None = None,
                 check_interval: float = CHECK_INTERVAL) -> None:
        self.path = path
        self.live_db = live_db
        self._notify = notify
        self._on_state = on_state or (lambda: None)
        self.check_interval = check_interval
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._handovers: set[Handover] = set()
        self._handovers_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        # -- the thread's own state (read by others only through the properties) --
        self._conn: sqlite3.Connection | None = None
        self._file: FileRef | None = None    # the mirror's file, for the views
        self._views: set[MirrorView] = set()  # snapshots being read (at most one)
        self._live: sqlite3.Connection | None = None
        self._tip: Tip | None = None
        self._held: _Change | None = None
        self._retained: deque[_Change] = deque()
        self._retained_bytes = 0
        self._usable = False
        self._applied_dv: int | None = None
        self._batched = 0                    # changes applied in the open transaction
        self._batch_dv: int | None = None    # the data_version they reach
        self._batch_since = 0.0
        self._state = "starting"
        self._checker = Checker()
        self._next_check = 0.0

    # -- from any thread --------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """True while the mirror follows the stream (a snapshot may be asked of it)."""
        return self._usable and not self._closing

    @property
    def rounds(self) -> int:
        """Complete checks that found the mirror equal to the live database."""
        return self._checker.rounds

    @property
    def data_version(self) -> int | None:
        """The data_version of the last change applied (None while not usable)."""
        return self._applied_dv if self._usable else None

    def describe(self) -> dict[str, object]:
        return {"state": self._state, "data_version": self.data_version,
                "checked_rounds": self.rounds, "path": str(self.path)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cldcb-mirror", daemon=True)
        self._thread.start()

    def feed(self, seq: int, data_version: int, kind: Kind, writes: Sequence[str]) -> None:
        """A change the engine recorded at log position ``seq`` (cheap: a queue put)."""
        self._queue.put(_Change(seq, data_version, kind, writes))

    def snapshot(self, data_version: int, folder: Path) -> concurrent.futures.Future[LocalCopy]:
        """Ask for a copy of the mirror holding ``data_version`` (see the docstring)."""
        fut: concurrent.futures.Future[LocalCopy] = concurrent.futures.Future()
        self._queue.put(_Snapshot(data_version, folder, fut))
        return fut

    def rebuild(self, path: Path, data_version: int, next_seq: int,
                done: Callable[[], None], ready: Callable[[], None] | None = None,
                handover: Handover | None = None) -> None:
        """Replace the mirror by the database copy at ``path`` (state ``data_version``, the
        first change on top of it at log position ``next_seq``); ``done()`` is called from
        the thread once ``path`` was read (or could not be). ``ready()``, if given, is
        called first and returns once the copy is whole (it is still being filled). With
        ``handover`` the file itself becomes the mirror (renamed, not copied) once the
        handover gives it: nobody else reads it any more."""
        if handover is not None:
            with self._handovers_lock:
                if self._closing:
                    handover.abandon()
                else:
                    self._handovers.add(handover)
        self._queue.put(_Rebuild(path, data_version, next_seq, done, ready, handover))

    def close(self, timeout: float = 60.0) -> None:
        """Apply the last change if the live database shows it committed, then stop (a
        rebuild still waiting for its handover gives it up)."""
        with self._handovers_lock:
            self._closing = True
            for handover in self._handovers:
                handover.abandon()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._open_existing()
            while True:
                wait = None
                if self._usable:
                    wait = self._next_check
                    if self._batched:
                        wait = min(wait, self._batch_since + BATCH_SECONDS)
                    wait = max(0.0, wait - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    self._finish()
                    return
                if item is not None:
                    self._handle(item)
                if self._batched and time.monotonic() >= self._batch_since + BATCH_SECONDS:
                    self._guard(self._commit)
                if self._usable and time.monotonic() >= self._next_check \
                        and self._queue.empty():
                    self._guard(self._check_piece)
                    self._next_check = time.monotonic() + self.check_interval
        except BaseException as exc:  # noqa: BLE001 - the thread must say why it stops
            self._notify("broken", f"the mirror's thread stopped ({type(exc).__name__}: "
                                   f"{exc}); snapshots are copied from the database")
            self._usable = False
            self._state = "off"
            self._fail_requests()
            self._close_conns()

    def _handle(self, item: object) -> None:
        if isinstance(item, _Change):
            self._retain(item)
            if self._usable:
                self._guard(lambda: self._walk(item))
        elif isinstance(item, _Snapshot):
            self._guard(self._commit)
            self._serve(item)
        elif isinstance(item, _Rebuild):
            self._guard(lambda: self._rebuild(item))

    def _guard(self, step: Callable[[], None]) -> None:
        """Run ``step``; a :class:`MirrorDiscarded` or an SQLite error throws the mirror away."""
        try:
            step()
        except (MirrorDiscarded, MirrorDiffers) as exc:
            self._discard(str(exc))
        except (sqlite3.Error, OSError, DataVersionError, PluginError) as exc:
            self._discard(f"it cannot be used ({type(exc).__name__}: {exc})")

    def _set_state(self, state: str) -> None:
        self._state = state
        self._on_state()

    # -- files ------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        return [self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"),
                Path(f"{self.path}-journal")]

    def _open_conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._conn = conn
        self._file = FileRef(self.path)
        return conn

    def _live_conn(self) -> sqlite3.Connection:
        if self._live is None:
            self._live = connect_ro(self.live_db, timeout=0, isolation_level=None)
        return self._live

    def _close_conns(self) -> None:
        for view in list(self._views):    # first, while the connection holds the file
            with contextlib.suppress(sqlite3.Error):
                view.revoke()
        for conn in (self._conn, self._live):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()           # (an open transaction is rolled back)
        self._conn = self._live = None
        if self._file is not None:
            self._file.release()
            self._file = None
        self._batched, self._batch_dv = 0, None

    def _open_existing(self) -> None:
        if not self.path.exists():
            self._set_state("absent")
            self._notify("info", f"no mirror at {self.path} yet: it is built from the next "
                                 "snapshot copied from the database")
            return
        try:
            held = read_data_version(self._open_conn())
            live = self._read_live_dv()
        except (sqlite3.Error, PluginError) as exc:
            self._discard(f"it cannot be opened ({exc})")
            return
        if live is not None and live != held:
            self._discard(f"it holds data_version {held} but the database {live} (it lost "
                          "changes, e.g. the plugin was killed while it was behind)")
            return
        self._follow(held)
        self._notify("info", f"mirror at data_version {held} ({self.path})")

    def _read_live_dv(self) -> int | None:
        """``vars.data_version`` of the live database; None when it cannot be read now."""
        try:
            return read_data_version(self._live_conn())
        except sqlite3.Error as exc:
            if is_busy(exc):
                return None
            raise

    def _follow(self, data_version: int) -> None:
        self._tip = snapshot_tip(data_version, STAND_IN_ANCHOR)
        self._held = None
        self._applied_dv = data_version
        self._checker.restart()
        self._usable = True
        self._set_state("in-step")

    def _discard(self, reason: str) -> None:
        self._usable = False
        self._held = None
        self._tip = None
        self._applied_dv = None
        self._close_conns()
        for p in self._files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._set_state("discarded")
        self._notify("unusual", f"the mirror is thrown away: {reason}; the next snapshot is "
                                "copied from the database inside a hook call and the mirror "
                                "is rebuilt from it")

    def _fail_requests(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Snapshot):
                item.future.set_exception(MirrorUnusable("the mirror stopped"))
            elif isinstance(item, _Rebuild):
                if item.handover is not None and item.handover.abandon():
                    with contextlib.suppress(FileNotFoundError):
                        item.path.unlink()           # given to the mirror: its to delete
                item.done()

    def _finish(self) -> None:
        if self._usable:
            with contextlib.suppress(sqlite3.Error, MirrorDiscarded):
                self._commit()
                self._confirm_from_live(self._read_live_dv())
        self._fail_requests()
        self._close_conns()

    # -- walking the stream -----------------------------------------------------------------
    def _retain(self, change: _Change) -> None:
        self._retained.append(change)
        self._retained_bytes += change.size
        while len(self._retained) > RETAIN or (self._retained_bytes > RETAIN_BYTES
                                               and len(self._retained) > 1):
            self._retained_bytes -= self._retained.popleft().size

    def _walk(self, change: _Change) -> None:
        decision = decide(self._tip, change.data_version, change.kind)
        if decision.action is Action.SNAPSHOT:
            raise MirrorDiscarded(f"change {change.data_version} cannot follow it "
                                  f"({decision.reason})")
        if decision.action is Action.REPLACE:
            if self._held is None:
                raise MirrorDiscarded(f"change {change.data_version} replaces a batch it already "
                               "applied as committed")
            self._held = None
        else:
            self._apply_held()
        self._tip = advance(self._tip, change.data_version, change.kind,
                            stand_in_hash(change.seq), decision=decision)
        self._held = change

    def _apply_held(self) -> None:
        change, self._held = self._held, None
        if change is None:
            return
        conn = self._conn
        assert conn is not None
        if change.kind is Kind.PRAGMA:
            self._commit()
            for statement in change.writes:
                conn.execute(statement)
            return
        if not conn.in_transaction:
            conn.execute("BEGIN")
            self._batch_since = time.monotonic()
        for statement in change.writes:    # (a failure discards the mirror: see _guard)
            conn.execute(statement)
        reached = _reached(conn)
        if reached != change.data_version:
            raise MirrorDiscarded(f"change {change.data_version} left vars.data_version at "
                           f"{reached}")
        self._batched += 1
        self._batch_dv = change.data_version
        if self._batched >= BATCH:
            self._commit()

    def _commit(self) -> None:
        """Commit the open transaction: its changes are applied."""
        conn = self._conn
        if conn is not None and conn.in_transaction:
            conn.execute("COMMIT")
        if self._batch_dv is not None:
            self._applied_dv = self._batch_dv
            self._on_state()
        self._batched, self._batch_dv = 0, None

    def _confirm_from_live(self, live_dv: int | None) -> None:
        """The live database shows the held normal change committed: apply it."""
        held = self._held
        if held is not None and held.kind is Kind.NORMAL and live_dv == held.data_version:
            self._apply_held()
            self._commit()

    # -- snapshots and rebuilds -------------------------------------------------------------
    def _serve(self, req: _Snapshot) -> None:
        if not req.future.set_running_or_notify_cancel():
            return
        try:
            req.future.set_result(self._copy(req))
        except BaseException as exc:  # noqa: BLE001 - whatever it was, the caller must know
            req.future.set_exception(exc if isinstance(exc, MirrorUnusable)
                                     else MirrorUnusable(f"copying the mirror failed: {exc}"))
            if not isinstance(exc, Exception):
                raise

    def _copy(self, req: _Snapshot) -> LocalCopy:
        if self._closing:
            raise MirrorUnusable("the plugin is stopping")
        if not self._usable or self._conn is None:
            raise MirrorUnusable(f"the mirror is {self._state}")
        if self._applied_dv != req.data_version:
            raise MirrorUnusable(f"the mirror holds data_version {self._applied_dv}, "
                                 f"not {req.data_version}")
        if self._views:
            raise MirrorUnusable("the last snapshot of the mirror is still being read")
        busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy or self._file is None:
            raise MirrorUnusable("the mirror's WAL could not be checkpointed")
        view = MirrorView.begin(self.path, self._file, self._views.discard)
        if view.data_version != req.data_version:
            view.close()
            raise MirrorUnusable(f"the mirror's snapshot holds data_version "
                                 f"{view.data_version}, not {req.data_version}")
        self._views.add(view)
        return LocalCopy(self.path, view.data_version, view.size, source=view)

    def _rebuild(self, item: _Rebuild) -> None:
        self._usable = False
        self._close_conns()
        for p in self._files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        try:
            if item.handover is not None:
                self._take(item, item.handover)
            else:
                if item.ready is not None:
                    item.ready()
                self._copy_in(item.path)
        finally:
            item.done()
        held = read_data_version(self._open_conn())
        if held != item.data_version:
            raise MirrorDiscarded(f"the copy it was rebuilt from holds data_version {held}, "
                           f"not {item.data_version}")
        self._follow(held)
        self._notify("info", f"mirror rebuilt at data_version {held}")
        for change in [c for c in self._retained if c.seq >= item.next_seq]:
            self._walk(change)

    def _copy_in(self, path: Path) -> None:
        name = new_copy_file(self.path.parent)
        try:
            shutil.copyfile(path, name)
            os.replace(name, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise

    def _take(self, item: _Rebuild, handover: Handover) -> None:
        """Make the copy's file the mirror, once the copy gave it (no upload reads it any
        more: the mirror changes it from now on); renamed, never copied again (but on
        another file system)."""
        given = handover.wait()
        with self._handovers_lock:
            self._handovers.discard(handover)
        if not given:
            raise MirrorDiscarded("the plugin stopped before the copy was free")
        try:
            if item.ready is not None:
                item.ready()                   # (raises if its fill failed)
            try:
                os.replace(item.path, self.path)
            except OSError:                    # (EXDEV: another file system)
                self._copy_in(item.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                item.path.unlink()

    # -- checking ---------------------------------------------------------------------------
    def _check_piece(self) -> None:
        conn = self._conn
        assert conn is not None
        self._commit()
        piece = self._checker.read_live(self._live_conn())
        if piece is None:
            return
        if self._queue.empty():
            self._confirm_from_live(piece.data_version)
        if piece.data_version == self._applied_dv and self._checker.compare(conn, piece):
            self._on_state()                # a round found it equal
