"""Rebuilding real Core Lightning databases from their db_write traces (cldcb.node.replay)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from helpers.traces import (
    EXPECTED_SHA256,
    TRACES,
    expected_dump,
    expected_dump_bytes,
    load_trace,
    replay_trace,
    sqlite_dump,
    sqlite_dump_bytes,
)

from cldcb.core.dataversion import Action, Decision, Kind, Tip, classify
from cldcb.errors import ReplayError
from cldcb.node.replay import Replayer

FINAL_DATA_VERSION = {"cln-workload": 806, "cln-crash-restart": 17, "cln-channels": 2525}


def naive_decide(tip: Tip | None, data_version: int, kind: Kind) -> Decision:
    """The tempting rule: the same data_version again replaces the previous call."""
    assert tip is not None
    if data_version == tip.data_version:
        return Decision(Action.REPLACE, tip.link, "naive repeat")
    return Decision(Action.APPEND, tip.hash, "naive next")


def append_always(tip: Tip | None, data_version: int, kind: Kind) -> Decision:
    """The other tempting rule: ignore repeats, apply everything in order."""
    assert tip is not None
    return Decision(Action.APPEND, tip.hash, "append always")


def feed(replayer: Replayer, calls: list[tuple[int, list[str]]]) -> None:
    for data_version, writes in calls:
        replayer.apply(data_version, classify(writes), writes)


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return tmp_path / "lightningd.sqlite3"


# -- the real traces ----------------------------------------------------------


@pytest.mark.parametrize("name", TRACES)
def test_expected_dumps_match_published_sha256(name: str) -> None:
    assert hashlib.sha256(expected_dump_bytes(name)).hexdigest() == EXPECTED_SHA256[name]


@pytest.mark.parametrize("name", TRACES)
def test_replay_gives_the_real_database(name: str, db: Path) -> None:
    assert replay_trace(name, db) == FINAL_DATA_VERSION[name]
    dump = sqlite_dump_bytes(db)
    assert hashlib.sha256(dump).hexdigest() == EXPECTED_SHA256[name]
    assert dump == expected_dump_bytes(name)
    assert sqlite_dump(db) == expected_dump(name)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


@pytest.mark.parametrize("batch", [1, 2, 7, 100_000])
@pytest.mark.parametrize("name", TRACES)
def test_large_transactions_give_the_same_dump(name: str, batch: int, db: Path) -> None:
    """Any number of changes per transaction: the sqlite3 program's .dump of the real
    database, byte for byte (repeats rolled back inside a transaction, PRAGMA-only calls
    committing it, cascades at their statement)."""
    assert replay_trace(name, db, batch=batch) == FINAL_DATA_VERSION[name]
    assert sqlite_dump_bytes(db) == expected_dump_bytes(name)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_changes_share_a_transaction_until_the_batch_is_full(db: Path) -> None:
    calls = load_trace("cln-crash-restart")
    assert [(dv, classify(w)) for dv, w in calls[3:8]] == [
        (2, Kind.PRAGMA), (3, Kind.NORMAL), (4, Kind.NORMAL), (5, Kind.NORMAL),
        (6, Kind.NORMAL)]

    def committed() -> int:
        with sqlite3.connect(db) as reader:
            return reader.execute("SELECT intval FROM vars WHERE name = 'data_version'"
                                  ).fetchone()[0]

    with Replayer(db, batch=3) as replayer:
        feed(replayer, calls[:4])       # a PRAGMA-only call commits what came before it
        assert committed() == 2
        feed(replayer, calls[4:7])      # 3 and 4 kept, 5 pending: one open transaction
        assert committed() == 2
        feed(replayer, calls[7:8])      # 5 kept: the third, so the transaction commits
        assert committed() == 5
        assert replayer.finish() == 6
    assert committed() == 6


def test_durable_replay_gives_the_same_database(db: Path) -> None:
    with Replayer(db, durable=True) as replayer:
        feed(replayer, load_trace("cln-crash-restart"))
        assert replayer.finish() == 17
    assert sqlite_dump_bytes(db) == expected_dump_bytes("cln-crash-restart")


# -- rules that look right and are not ------------------------------------------


@pytest.mark.parametrize("name", ["cln-workload", "cln-crash-restart"])
def test_naive_rule_fails(name: str, db: Path) -> None:
    # it takes "PRAGMA foreign_keys = OFF;" (data_version 1 again) for a
    # replacement of the schema batch, rolls the whole schema back, and the
    # table rebuild that follows finds no table
    with pytest.raises(ReplayError) as caught:
        replay_trace(name, db, decide_fn=naive_decide)
    message = str(caught.value)
    assert message.startswith("record 2 (data_version 2): statement 1 of 5 failed: "
                              "no such table: payments")
    assert "ALTER TABLE payments RENAME TO temp_payments;" in message


def test_appending_a_repeated_batch_fails_on_crash_restart(db: Path) -> None:
    # keeping the uncommitted batch 13 (datastore key 'k2') makes the later
    # insert of 'k2' collide, exactly as traces/README.md says
    with pytest.raises(ReplayError, match=r"record 19 \(data_version 17\): statement 1 of 2 "
                       r"failed: UNIQUE constraint failed: datastore\.key"):
        replay_trace("cln-crash-restart", db, decide_fn=append_always)


def test_foreign_keys_off_fails_on_channels(db: Path) -> None:
    # Every recovery starts from a snapshot, on a new connection: the stream's
    # own "PRAGMA foreign_keys = ON;" (record 3) is long past. Each start of
    # lightningd deletes its newest blocks; without foreign keys the cascade
    # into utxoset does not happen and a later insert of the same rows collides.
    calls = load_trace("cln-channels")
    replay_trace("cln-channels", db, calls=slice(0, 4))
    with Replayer(db, foreign_keys=False) as replayer, pytest.raises(
            ReplayError, match=r"^record 1699 \(data_version 1702\): statement 2 of 16 failed: "
            r"UNIQUE constraint failed: utxoset\.txid, utxoset\.outnum"):
        feed(replayer, calls[4:])


def test_foreign_keys_on_from_the_same_snapshot(db: Path) -> None:
    calls = load_trace("cln-channels")
    replay_trace("cln-channels", db, calls=slice(0, 4))
    with Replayer(db) as replayer:
        feed(replayer, calls[4:])
        assert replayer.finish() == 2525
    assert sqlite_dump_bytes(db) == expected_dump_bytes("cln-channels")


def test_pragma_calls_must_run_outside_a_transaction(db: Path) -> None:
    # From an empty file the stream turns foreign keys on by itself (record 3),
    # because PRAGMA-only calls run outside any transaction. A replayer that
    # loses them (skips them, or runs them inside a transaction, where SQLite
    # ignores PRAGMA foreign_keys) on a connection without foreign keys fails.
    calls = load_trace("cln-channels")
    assert replay_trace("cln-channels", db, foreign_keys=False) == 2525
    assert sqlite_dump_bytes(db) == expected_dump_bytes("cln-channels")
    db.unlink()
    normal_only = [call for call in calls if classify(call[1]) is Kind.NORMAL]
    with Replayer(db, foreign_keys=False) as replayer, pytest.raises(
            ReplayError, match=r"UNIQUE constraint failed: utxoset\.txid, utxoset\.outnum"):
        feed(replayer, normal_only)


# -- snapshots as a base ----------------------------------------------------------


def test_continue_from_a_restored_snapshot(db: Path) -> None:
    calls = load_trace("cln-crash-restart")
    # snapshot = committed state 12; the stream goes on with both batches 13
    assert replay_trace("cln-crash-restart", db, calls=slice(0, 14)) == 12
    with Replayer(db) as replayer:
        assert replayer.data_version == 12
        assert replayer.tip.is_snapshot
        feed(replayer, calls[14:])
        assert replayer.finish() == 17
    assert sqlite_dump_bytes(db) == expected_dump_bytes("cln-crash-restart")


def test_a_batch_cannot_replace_inside_a_snapshot(db: Path) -> None:
    calls = load_trace("cln-crash-restart")
    # a base that holds the uncommitted batch 13 as committed state 13
    assert replay_trace("cln-crash-restart", db, calls=slice(0, 15)) == 13
    with Replayer(db) as replayer, pytest.raises(
            ReplayError, match=r"record 0 \(data_version 13\) cannot follow.*snapshot"):
        feed(replayer, calls[15:])


def test_continue_workload_from_the_middle(db: Path) -> None:
    calls = load_trace("cln-workload")
    replay_trace("cln-workload", db, calls=slice(0, 400))
    with Replayer(db) as replayer:
        start = replayer.data_version
        assert start == calls[399][0]
        feed(replayer, calls[400:])
        assert replayer.finish() == 806
    assert sqlite_dump_bytes(db) == expected_dump_bytes("cln-workload")


# -- errors name the record -----------------------------------------------------


def test_gap_names_the_record(db: Path) -> None:
    calls = load_trace("cln-crash-restart")
    del calls[8]
    with Replayer(db) as replayer:
        with pytest.raises(ReplayError) as caught:
            feed(replayer, calls)
        assert str(caught.value).startswith(
            "record 8 (data_version 8) cannot follow the records before it: "
            "gap: backup holds 6, call is 8")
        # everything before the failing record is in the database
        assert replayer.finish() == 6


def test_backwards_names_the_record(db: Path) -> None:
    calls = load_trace("cln-crash-restart")
    calls.insert(10, calls[6])
    with Replayer(db) as replayer, pytest.raises(
            ReplayError, match=r"^record 10 \(data_version 5\).*backwards: backup holds 8"):
        feed(replayer, calls)


def test_empty_database_must_start_at_one(db: Path) -> None:
    calls = load_trace("cln-workload")
    with Replayer(db) as replayer, pytest.raises(
            ReplayError, match=r"^record 0 \(data_version 2\).*gap: snapshot holds 0"):
        feed(replayer, calls[2:])


def test_failing_statement_is_named_without_its_values(db: Path) -> None:
    secret = "ab" * 40
    with Replayer(db) as replayer:
        feed(replayer, load_trace("cln-crash-restart")[:5])
        statement = f"INSERT INTO no_such_table VALUES (0, x'{secret}')"
        bump = "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 3"
        with pytest.raises(ReplayError) as caught:
            replayer.apply(4, Kind.NORMAL, [bump, statement])
        message = str(caught.value)
        assert message.startswith("record 5 (data_version 4): statement 2 of 2 failed: "
                                  "no such table: no_such_table")
        assert statement[:60] in message
        assert secret not in message
        # the failed batch left nothing behind; the one before it is committed
        assert replayer.finish() == 3


def test_record_that_does_not_bump_data_version(db: Path) -> None:
    with Replayer(db) as replayer:
        feed(replayer, load_trace("cln-crash-restart")[:5])
        with pytest.raises(ReplayError, match=r"record 5 \(data_version 4\) left "
                           r"vars\.data_version at 3, not 4"):
            replayer.apply(4, Kind.NORMAL, ["DELETE FROM datastore"])
        assert replayer.finish() == 3


def test_kind_must_match_the_statements(db: Path) -> None:
    with Replayer(db) as replayer:
        with pytest.raises(ReplayError, match="marked PRAGMA but its statements are NORMAL"):
            replayer.apply(0, Kind.PRAGMA, ["DELETE FROM t"])
        with pytest.raises(ReplayError, match="marked NORMAL but its statements are PRAGMA"):
            replayer.apply(1, Kind.NORMAL, ["PRAGMA foreign_keys = OFF;"])


def test_out_of_range_data_version(db: Path) -> None:
    with Replayer(db) as replayer, pytest.raises(
            ReplayError, match=r"record 0 \(data_version 2147483648\).*signed 32-bit"):
        replayer.apply(2**31, Kind.PRAGMA, ["PRAGMA foreign_keys = ON;"])


def test_replace_of_a_committed_record_is_refused(db: Path) -> None:
    # the naive rule asks to replace a PRAGMA call, which ran outside any transaction
    calls = load_trace("cln-workload")
    with Replayer(db, decide_fn=naive_decide) as replayer:
        feed(replayer, calls[:1])
        replayer.apply(1, Kind.PRAGMA, calls[1][1])   # replaces batch 1: rolls it back
        with pytest.raises(ReplayError, match=r"record 2 \(data_version 1\) would replace "
                           "the previous record, which is already committed"):
            replayer.apply(1, Kind.PRAGMA, calls[1][1])


# -- the database file ------------------------------------------------------------


def test_close_without_finish_rolls_back_the_pending_batch(db: Path) -> None:
    calls = load_trace("cln-crash-restart")
    with Replayer(db) as replayer:
        feed(replayer, calls[:5])           # ends with normal batch 3
    with Replayer(db) as replayer:
        assert replayer.data_version == 2
        assert replayer.finish() == 2


def test_empty_stream(db: Path) -> None:
    with Replayer(db) as replayer:
        assert replayer.data_version == 0
        assert replayer.finish() == 0


def test_refuses_a_database_that_is_not_lightningds(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE other (x)")
    conn.close()
    with pytest.raises(ReplayError, match="is not a Core Lightning database"):
        Replayer(db)


def test_refuses_a_file_that_is_not_a_database(db: Path) -> None:
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReplayError, match="is not a Core Lightning database"):
        Replayer(db)


def test_foreign_keys_are_on(db: Path) -> None:
    with Replayer(db) as replayer:
        assert replayer._conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    with Replayer(db, foreign_keys=False) as replayer:
        assert replayer._conn.execute("PRAGMA foreign_keys").fetchone() == (0,)


# -- undo: a repeat or a failure inside a large transaction ----------------------------


def test_a_failure_that_rolls_back_the_transaction_keeps_the_records_before_it(
        db: Path) -> None:
    # INSERT OR ROLLBACK makes SQLite roll back the whole open transaction, not just the
    # statement: the kept changes of that transaction (3, 4, 5, 6 here; nothing was
    # committed since the PRAGMA-only call at 2) must still be in the database after it.
    calls = load_trace("cln-crash-restart")
    assert [dv for dv, _ in calls[:8]] == [1, 1, 2, 2, 3, 4, 5, 6]
    with Replayer(db) as replayer:
        feed(replayer, calls[:8])
        bump = "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 6"
        clash = "INSERT OR ROLLBACK INTO vars (name, intval) VALUES ('data_version', 0)"
        with pytest.raises(ReplayError, match=r"^record 8 \(data_version 7\): statement 2 "
                           r"of 2 failed: UNIQUE constraint failed: vars\.name"):
            replayer.apply(7, Kind.NORMAL, [bump, clash])
        assert replayer.finish() == 6
    reference = db.with_name("reference.sqlite3")
    replay_trace("cln-crash-restart", reference, calls=slice(0, 8))
    assert sqlite_dump_bytes(db) == sqlite_dump_bytes(reference)


@pytest.mark.parametrize("batch", [1, 3, 1000])
def test_a_failure_after_a_repeat_leaves_exactly_the_records_before_it(
        db: Path, batch: int) -> None:
    # crash-restart: batch 13 is repeated (records 14 and 15); a failure right after the
    # replacement undoes only the failing change, whatever the transaction holds
    calls = load_trace("cln-crash-restart")
    assert [dv for dv, _ in calls[13:17]] == [12, 13, 13, 14]
    with Replayer(db, batch=batch) as replayer:
        feed(replayer, calls[:16])
        with pytest.raises(ReplayError, match=r"^record 16 \(data_version 14\): statement 1"):
            replayer.apply(14, Kind.NORMAL, ["INSERT INTO no_such_table VALUES (1)"])
        assert replayer.finish() == 13
    reference = db.with_name("reference.sqlite3")
    replay_trace("cln-crash-restart", reference, calls=slice(0, 16))
    assert sqlite_dump_bytes(db) == sqlite_dump_bytes(reference)
