"""Rebuild a Core Lightning SQLite database from a base and a stream of changes.

The base is either an empty (or absent) file, which is the state at
data_version 0, or a restored snapshot, whose ``vars.data_version`` is where
the stream must continue. Changes are fed in stream order with
:meth:`Replayer.apply`; the data_version rules of :mod:`cldcb.core.dataversion`
decide each one, exactly as the plugin decided it when it was recorded.

How a change is applied:

* ``PRAGMA foreign_keys = ON`` is set on the connection first: lightningd sets
  it on every connection it opens and it is not in the stream (without it,
  ``ON DELETE CASCADE``/``SET NULL`` do not fire; ``foreign_keys=False``
  exists to show that).
* A normal change runs inside the open transaction (``BEGIN`` … ``COMMIT``), its
  statements in order, then a check that ``vars.data_version`` now equals the
  change's data_version: four executes for the usual change of three
  statements, no savepoint of its own. The newest change stays **pending**: it
  may be a batch lightningd never committed, which only the next change can
  tell. The next change's decision settles it: APPEND keeps it (nothing to
  run), REPLACE undoes it. :meth:`Replayer.finish` keeps the last one (the
  newest record is always kept: it was acknowledged before lightningd could act
  on it); :meth:`Replayer.close` without ``finish`` undoes it.
* Undoing (a REPLACE, or a failure): the open transaction is rolled back and
  the changes it had kept are run again, in order, without the one undone. So
  the replayer holds the statements of the changes since the last COMMIT (at
  most ``batch`` changes or :data:`KEPT_BYTES` of statements: reaching either
  commits) and pays for an undo only when one happens (a repeated data_version,
  after lightningd restarted with an uncommitted batch: rare). Running a change
  again on the state it first ran on gives the same rows (lightningd's
  statements carry their values; the only clock in the traces is a migration's
  ``strftime('%s', 'now')``, which no replay reproduces anyway). It also
  survives what a savepoint did not: a statement whose error makes SQLite roll
  back the whole transaction (``INSERT OR ROLLBACK``, a full disk) no longer
  takes the changes kept before it along.
* Large transactions: up to ``batch`` consecutive kept changes share one
  transaction, since a COMMIT per change writes its pages to the file each
  time. The result is the database one transaction per change gives
  (``batch=1``), the same ``.dump`` byte for byte: each statement still sees
  exactly the changes before it, foreign keys are immediate constraints (Core
  Lightning declares none deferred), so a violation or a cascade happens at the
  statement, as in lightningd.
* A PRAGMA-only change runs outside any transaction (SQLite ignores
  ``PRAGMA foreign_keys`` inside one), after the open transaction is
  committed.
* A SNAPSHOT decision, a failing statement, a change whose kind does not match
  its statements or a data_version the change did not produce raises
  :class:`~cldcb.errors.ReplayError` from the :meth:`Replayer.apply` of that
  record, naming its position (0-based, counted from the Replayer's first
  ``apply``) and data_version. Messages show at most the first 60 characters of
  a statement, since values inlined further on may be sensitive. After an
  error the database holds the records before the failing one, and the
  failing one left nothing behind. The record right before it: a failure while
  the change's statements ran (or at its data_version check) comes after the
  change's decision kept that record; a record refused before anything ran (a
  SNAPSHOT decision, a kind that does not match, a data_version out of range)
  leaves it pending, and then :meth:`Replayer.finish` keeps it while
  :meth:`Replayer.close` undoes it. Close the Replayer after an error.

Durability: with ``durable=False`` (the default) the replay runs with
``PRAGMA synchronous = OFF`` and ``journal_mode = MEMORY`` (about six times
faster on the channel trace: no fsync and no journal file per record), a
page cache of :data:`CACHE_KIB` (a transaction's dirty pages stay in it), and
:meth:`Replayer.finish` fsyncs the file once. Until ``finish`` returned, treat
the file as scratch: a crash in the middle can leave it damaged (recovery
rebuilds in a temporary file and moves it into place only afterwards). With
``durable=True`` every commit is durable, as in lightningd.

Hashes: the replayer needs only the ``(data_version, kind)`` part of the rules.
It feeds :func:`~cldcb.core.dataversion.decide`/:func:`~cldcb.core.dataversion.advance`
stand-in hashes derived from positions; checking the real chain of sealed
records is the job of ``seal``, before anything reaches the replayer.

``decide_fn`` can be replaced (tests use it to show that the naive rule
"same data_version replaces the previous call" cannot rebuild real traces).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from cldcb.core.dataversion import (
    STAND_IN_ANCHOR,
    Action,
    DataVersionError,
    DecideFn,
    Kind,
    Tip,
    advance,
    check_data_version,
    classify,
    decide,
    snapshot_tip,
    stand_in_hash,
)
from cldcb.errors import ReplayError
from cldcb.node.nodedb import DATA_VERSION_SQL, read_data_version

_STATEMENT_PREVIEW = 60
BATCH = 1000
"""Kept changes per transaction (fast mode; the durable mode commits each change)."""
KEPT_BYTES = 16 << 20
"""Statements' characters of the changes in the open transaction that commit it (the
replayer holds them, to run them again after an undo)."""
CACHE_KIB = 16 << 10
"""SQLite's page cache in the fast mode: holds a large transaction's pages (bounded RSS)."""


def _where(position: int, data_version: int) -> str:
    return f"record {position} (data_version {data_version})"


def _preview(statement: str) -> str:
    text = " ".join(statement.split())
    if len(text) > _STATEMENT_PREVIEW:
        text = text[:_STATEMENT_PREVIEW] + "..."
    return text


class Replayer:
    """Apply changes to the SQLite database at ``db_path`` (created if absent)."""

    def __init__(self, db_path: Path, *, foreign_keys: bool = True,
                 decide_fn: DecideFn = decide, check_data_version: bool = True,
                 durable: bool = False, batch: int | None = None) -> None:
        self._path = Path(db_path)
        self._durable = durable
        self._decide = decide_fn
        self._check = check_data_version
        self._batch = max(1, batch if batch is not None else 1 if durable else BATCH)
        self._pending = False       # the newest change ran and may still be undone
        self._kept: list[Sequence[str]] = []    # changes run in the open transaction
        self._kept_bytes = 0
        self._position = 0
        try:
            self._conn = sqlite3.connect(self._path, isolation_level=None)
        except sqlite3.Error as err:
            raise ReplayError(
                f"cannot open database {self._path}: {err}; check the path and its permissions"
            ) from err
        try:
            start = self._read_start()
            self._conn.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            if not durable:
                self._conn.execute("PRAGMA synchronous = OFF")
                self._conn.execute("PRAGMA journal_mode = MEMORY")
                self._conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except BaseException:
            self._conn.close()
            raise
        self._tip = snapshot_tip(start, STAND_IN_ANCHOR)

    # -- reading the database ------------------------------------------------

    def _read_data_version(self) -> int:
        """``vars.data_version`` (0 when the database has no tables at all)."""
        try:
            held = read_data_version(self._conn)
        except sqlite3.Error as err:
            raise ReplayError(
                f"{self._path} is not a Core Lightning database ({err}); "
                "replay into an empty file or a restored snapshot"
            ) from err
        if held is None:
            raise ReplayError(
                f"{self._path} is not a Core Lightning database (it has no usable "
                "vars.data_version); replay into an empty file or a restored snapshot"
            )
        return held

    def _read_start(self) -> int:
        held = self._read_data_version()
        try:
            return check_data_version(held)
        except DataVersionError as err:
            raise ReplayError(f"{self._path} is damaged: {err}") from err

    # -- state ---------------------------------------------------------------

    @property
    def tip(self) -> Tip:
        """The newest record applied (stand-in hashes), or the base's anchor."""
        return self._tip

    @property
    def data_version(self) -> int:
        """The data_version the replay has reached (the newest record's, or the base's)."""
        return self._tip.data_version

    # -- applying ------------------------------------------------------------

    def apply(self, data_version: int, kind: Kind, writes: Sequence[str]) -> None:
        """Apply one change (a record's content) according to the rules."""
        position = self._position
        self._position += 1
        kind = Kind(kind)
        if classify(writes) is not kind:
            raise ReplayError(
                f"{_where(position, data_version)} is marked {kind.name} but its statements "
                f"are {classify(writes).name}; the record is malformed"
            )
        try:
            decision = self._decide(self._tip, data_version, kind)
        except DataVersionError as err:
            raise ReplayError(f"{_where(position, data_version)}: {err}") from err
        if decision.action is Action.SNAPSHOT:
            raise ReplayError(
                f"{_where(position, data_version)} cannot follow the records before it: "
                f"{decision.reason}; the backup lost changes here, so it can only be rebuilt "
                "from a snapshot taken after this point"
            )
        if decision.action is Action.REPLACE:
            if not self._pending:
                raise ReplayError(
                    f"{_where(position, data_version)} would replace the previous record, "
                    f"which is already committed ({decision.reason}); the stream does not "
                    "follow the data_version rules"
                )
            self._undo_pending()
        else:
            self._pending = False       # kept: it stays in the open transaction
        if kind is Kind.PRAGMA:
            self._commit()
            self._run(position, data_version, writes)
        else:
            self._run_change(position, data_version, writes)
        self._tip = advance(self._tip, data_version, kind, stand_in_hash(position),
                            decision=decision)

    def _undo_pending(self) -> None:
        """Undo the pending change: the open transaction again without it."""
        if self._pending:
            self._pending = False
            self._kept.pop()
            self._rerun()

    def _rerun(self) -> None:
        """Roll the open transaction back and run the changes it kept again."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        if not self._kept:
            return
        self._conn.execute("BEGIN")
        try:
            for writes in self._kept:
                for statement in writes:
                    self._conn.execute(statement)
        except (sqlite3.Error, sqlite3.Warning) as err:
            raise ReplayError(
                f"the records before record {self._position - 1} failed when run again "
                f"({err}); the database is not usable: rebuild it from the start"
            ) from err

    def _commit(self) -> None:
        self._kept.clear()
        self._kept_bytes = 0
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def _run(self, position: int, data_version: int, writes: Sequence[str]) -> None:
        execute = self._conn.execute
        for number, statement in enumerate(writes, start=1):
            try:
                execute(statement)
            except (sqlite3.Error, sqlite3.Warning) as err:
                raise ReplayError(
                    f"{_where(position, data_version)}: statement {number} of "
                    f"{len(writes)} failed: {err} "
                    f"(statement begins {_preview(statement)!r}); the backup cannot be "
                    "rebuilt past this record: try another server or an older snapshot "
                    "generation, and report it"
                ) from err

    def _run_change(self, position: int, data_version: int, writes: Sequence[str]) -> None:
        if len(self._kept) >= self._batch or self._kept_bytes >= KEPT_BYTES:
            self._commit()
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")
        try:
            self._run(position, data_version, writes)
            if self._check:
                reached = self._reached()
                if reached != data_version:
                    raise ReplayError(
                        f"{_where(position, data_version)} left vars.data_version at "
                        f"{reached}, not {data_version}: the record does not belong on top "
                        "of the records before it"
                    )
        except BaseException:
            self._rerun()               # the change leaves nothing behind
            raise
        self._kept.append(writes)
        self._kept_bytes += sum(map(len, writes))
        self._pending = True

    def _reached(self) -> int:
        """``vars.data_version`` after a change (one query where ``vars`` exists)."""
        try:
            row = self._conn.execute(DATA_VERSION_SQL).fetchone()
        except sqlite3.Error:
            return self._read_data_version()
        if row is None or not isinstance(row[0], int):
            return self._read_data_version()
        return row[0]

    def finish(self) -> int:
        """Commit what is pending, make the file durable; return ``vars.data_version``.

        Returns 0 for a database that is still empty. Records may still be
        applied afterwards, but the batch committed here can no longer be
        replaced.
        """
        self._pending = False
        self._commit()
        held = self._read_data_version()
        if not self._durable:
            try:
                with open(self._path, "rb") as db_file:
                    os.fsync(db_file.fileno())
            except OSError as err:
                raise ReplayError(
                    f"cannot flush {self._path} to disk: {err}; check the disk and try again"
                ) from err
        return held

    def close(self) -> None:
        """Close the database; a batch still pending (no :meth:`finish`) is rolled back,
        the changes kept before it are committed."""
        try:
            self._undo_pending()
            self._commit()
        finally:
            self._conn.close()

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
