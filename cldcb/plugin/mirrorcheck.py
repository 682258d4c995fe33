"""Comparing the local mirror with the live database, one small piece at a time.

The mirror (:mod:`cldcb.plugin.mirror`) is checked, not trusted. A *round*
compares first the schema (``sqlite_schema`` without root pages), then each
table in ranges of rowid of at most :data:`PIECE_ROWS` rows and about
:data:`PIECE_BYTES` bytes (rowid included, so the rows' identity is compared
too). A table WITHOUT ROWID (Core Lightning has none) is compared whole, in
one piece.

A piece is read from the live database in one short read transaction
(:meth:`Checker.read_live`, on a read-only connection with no busy wait) that
also reads ``vars.data_version``: the caller compares it with the mirror
(:meth:`Checker.compare`) only when the mirror holds that same data_version.
A reader's SHARED lock makes lightningd's COMMIT wait (up to the 60 s busy
timeout it sets) rather than fail, so a piece is kept small: well under a
millisecond on typical rows. A locked database means "later"; a table a
migration dropped during the round starts the round again. A difference
raises :class:`MirrorDiffers`, naming the table and where.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from cldcb.errors import MirrorDiffers
from cldcb.nodedb import is_busy
from cldcb.plugin.snapshot import read_data_version

PIECE_ROWS = 200
PIECE_BYTES = 512 * 1024

Rows = list[tuple[object, ...]]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _row_size(row: tuple[object, ...]) -> int:
    return sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)


@dataclass(frozen=True)
class Piece:
    """What the live database holds in one piece, at ``data_version``."""

    data_version: int
    index: int              # -1: the schema; else the position in the round's tables
    lo: int                 # the first rowid asked for
    hi: int | None          # the last rowid read, None when the table ended in the piece
    rows: Rows


class Checker:
    """Where the current round is; see the module docstring."""

    def __init__(self) -> None:
        self.tables: list[tuple[str, bool]] = []      # (name, has a rowid)
        self.cursor: tuple[int, int] = (-1, 0)        # (table index, next rowid)
        self.rounds = 0
        """Rounds that found the mirror equal to the live database."""

    def restart(self) -> None:
        self.cursor = (-1, 0)

    def read_live(self, live: sqlite3.Connection) -> Piece | None:
        """The next piece from the live database; None when it cannot be read now."""
        index, lo = self.cursor
        try:
            live.execute("BEGIN")
            try:
                data_version = read_data_version(live)
                if index < 0:
                    return Piece(data_version, index, lo, None, _schema(live))
                name, rowid = self.tables[index]
                rows, hi = _piece(live, name, rowid, lo)
                return Piece(data_version, index, lo, hi, rows)
            finally:
                live.execute("COMMIT")
        except sqlite3.Error as exc:
            if is_busy(exc):
                return None                 # lightningd is committing: later
            if "no such table" in str(exc):
                self.restart()              # a migration dropped it: start the round again
                return None
            raise

    def compare(self, mirror: sqlite3.Connection, piece: Piece) -> bool:
        """Compare ``piece`` with the mirror (which holds ``piece.data_version``) and move
        on; True when this completed a round. Raises :class:`MirrorDiffers`."""
        if piece.index < 0:
            if _schema(mirror) != piece.rows:
                raise MirrorDiffers(f"its schema differs from the database's at "
                                    f"data_version {piece.data_version}")
            self.tables = [(str(r[1]), "WITHOUT ROWID" not in str(r[3]).upper())
                           for r in piece.rows if r[0] == "table"]
            return self._advance(0)
        name, rowid = self.tables[piece.index]
        if _range(mirror, name, rowid, piece.lo, piece.hi) != piece.rows:
            where = f"rowid {piece.lo} and after" if rowid else "the whole table"
            raise MirrorDiffers(f"table {name} differs from the database's at data_version "
                                f"{piece.data_version} ({where})")
        if piece.hi is None:
            return self._advance(piece.index + 1)
        self.cursor = (piece.index, piece.hi + 1)
        return False

    def _advance(self, index: int) -> bool:
        if index >= len(self.tables):
            self.rounds += 1
            self.cursor = (-1, 0)
            return True
        self.cursor = (index, 0)
        return False


def _schema(conn: sqlite3.Connection) -> Rows:
    return conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema "
                        "ORDER BY type, name").fetchall()


def _piece(conn: sqlite3.Connection, name: str, rowid: bool, lo: int) -> tuple[Rows, int | None]:
    """Rows of ``name`` from rowid ``lo`` (at most a piece's worth) and the last rowid read,
    or None when the table ends within the piece."""
    if not rowid:
        return conn.execute(f"SELECT * FROM {_quote(name)} ORDER BY 1").fetchall(), None
    cur = conn.execute(f"SELECT rowid, * FROM {_quote(name)} WHERE rowid >= ? "
                       f"ORDER BY rowid LIMIT ?", (lo, PIECE_ROWS))
    rows: Rows = []
    size = 0
    for row in cur:
        rows.append(row)
        size += _row_size(row)
        if size >= PIECE_BYTES:
            break
    else:
        if len(rows) < PIECE_ROWS:
            return rows, None
    cur.close()
    return rows, int(rows[-1][0])  # type: ignore[call-overload]


def _range(conn: sqlite3.Connection, name: str, rowid: bool, lo: int, hi: int | None) -> Rows:
    if not rowid:
        return conn.execute(f"SELECT * FROM {_quote(name)} ORDER BY 1").fetchall()
    if hi is None:
        return conn.execute(f"SELECT rowid, * FROM {_quote(name)} WHERE rowid >= ? "
                            "ORDER BY rowid", (lo,)).fetchall()
    return conn.execute(f"SELECT rowid, * FROM {_quote(name)} WHERE rowid BETWEEN ? AND ? "
                        "ORDER BY rowid", (lo, hi)).fetchall()
