"""The node's database, read one way everywhere: a path holding ``?``, ``#`` or ``%`` is
still that path (SQLite reads a ``file:`` URI's query and escapes), and every reader of
``vars.data_version`` gives the same answer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from traces import replay_trace

from cldcb import restore
from cldcb.client import status as status_mod
from cldcb.client import verify as verify_mod
from cldcb.nodedb import connect_ro, read_data_version
from cldcb.plugin.snapshot import copy_database

ODD = "a?mode=rwc#b%41c d"
"""A folder name SQLite would read as a URI's query, fragment and escape if unquoted."""


@pytest.fixture
def odd_db(tmp_path: Path) -> tuple[Path, int]:
    folder = tmp_path / ODD
    folder.mkdir()
    db = folder / "lightningd.sqlite3"
    return db, replay_trace("cln-crash-restart", db)


def test_every_reader_reads_a_database_whose_path_looks_like_a_uri(
        odd_db: tuple[Path, int], tmp_path: Path) -> None:
    db, dv = odd_db
    assert dv > 0
    assert status_mod.database_data_version(db) == dv
    assert verify_mod.copy_live(db, tmp_path / "copy.sqlite3") == dv
    restore.check_database(db, dv)
    copy = copy_database(db, db.parent)
    try:
        assert copy.data_version == dv
    finally:
        copy.path.unlink()


def test_reading_creates_no_file_the_unquoted_uri_would_name(odd_db: tuple[Path, int],
                                                             tmp_path: Path) -> None:
    """Unquoted, the odd path's URI names the file ``a`` beside its folder, opened with
    ``mode=rwc``: a reader would create it and read an empty database."""
    db, dv = odd_db
    before = sorted(p.name for p in tmp_path.iterdir())
    assert status_mod.database_data_version(db) == dv
    restore.check_database(db, dv)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("schema", "expected"), [
    ([], 0),
    (["CREATE TABLE other (x)"], None),
    (["CREATE TABLE vars (name TEXT, val TEXT, intval INTEGER)"], None),
    (["CREATE TABLE vars (name TEXT, val TEXT)"], None),
    (["CREATE TABLE vars (name TEXT, val TEXT, intval INTEGER)",
      "INSERT INTO vars VALUES ('data_version', NULL, 'seven')"], None),
    (["CREATE TABLE vars (name TEXT, val TEXT, intval INTEGER)",
      "INSERT INTO vars VALUES ('data_version', NULL, 7)"], 7),
])
def test_the_one_reader_of_data_version(tmp_path: Path, schema: list[str],
                                        expected: int | None) -> None:
    db = tmp_path / ODD
    con = sqlite3.connect(db)
    for statement in schema:
        con.execute(statement)
    con.commit()
    con.close()
    ro = connect_ro(db)
    try:
        assert read_data_version(ro) == expected
    finally:
        ro.close()
