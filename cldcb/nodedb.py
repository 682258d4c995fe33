"""The node's SQLite database as cldcb reads it: read-only, by its exact path.

- :func:`ro_uri` / :func:`connect_ro`: a read-only connection. The path goes into a
  ``file:`` URI quoted, so a path holding ``?``, ``#`` or ``%`` is still that path
  (unquoted, SQLite would read the rest as options, a fragment or escapes, and open,
  even create, another file).
- :func:`read_data_version`: the one reader of ``vars.data_version``. A database with
  no tables (what lightningd starts from) is at 0; one with tables but no usable
  ``vars.data_version`` is not lightningd's (None); each caller says what that means
  to its user.
- :func:`is_busy`: SQLITE_BUSY or SQLITE_LOCKED, someone holds a lock the read needs
  (lightningd's open transaction: never wait on it forever).
- copies of the database in the node's folder (:func:`new_copy_file`,
  :func:`remove_stale_copies`) are named ``.cldcb-snapshot-*.tmp``, so a copy left by a
  killed plugin is found and deleted.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

DATA_VERSION_SQL = "SELECT intval FROM vars WHERE name = 'data_version'"
BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
COPY_PREFIX = ".cldcb-snapshot-"
COPY_SUFFIX = ".tmp"


def ro_uri(path: Path) -> str:
    """The ``file:`` URI opening ``path`` read-only, the path quoted."""
    return "file:" + urllib.parse.quote(str(Path(path).absolute())) + "?mode=ro"


def connect_ro(path: Path, **kwargs: Any) -> sqlite3.Connection:
    """A read-only connection to ``path`` (``kwargs`` go to :func:`sqlite3.connect`)."""
    return sqlite3.connect(ro_uri(path), uri=True, **kwargs)


def read_data_version(conn: sqlite3.Connection) -> int | None:
    """``vars.data_version``: 0 for a database with no tables, None when it has tables
    but no integer ``vars.data_version`` (not lightningd's database). Any other SQLite
    error (locked, damaged) is raised as it is."""
    (tables, has_vars) = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE type = 'table' AND name = 'vars') "
        "FROM sqlite_master").fetchone()
    if tables == 0:
        return 0
    if not has_vars:
        return None
    try:
        row = conn.execute(DATA_VERSION_SQL).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such column" in str(exc):
            return None
        raise
    if row is None or not isinstance(row[0], int):
        return None
    return int(row[0])


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: someone holds a lock the read needs."""
    return getattr(exc, "sqlite_errorcode", None) in BUSY_CODES or "locked" in str(exc)


def new_copy_file(folder: Path) -> Path:
    """A new empty file in ``folder`` to copy the database into."""
    fd, name = tempfile.mkstemp(prefix=COPY_PREFIX, suffix=COPY_SUFFIX, dir=folder)
    os.close(fd)
    return Path(name)


def remove_stale_copies(folder: Path) -> int:
    """Delete copies left in ``folder`` by a plugin that was killed; returns how many."""
    count = 0
    for p in folder.glob(f"{COPY_PREFIX}*{COPY_SUFFIX}"):
        try:
            p.unlink()
            count += 1
        except OSError:
            pass
    return count
