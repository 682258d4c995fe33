"""Damaged store files: a logged repair or a clear StoreError, never a crash loop or a
silent loss of acknowledged records."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from store_crash_child import OTHER_PRIV, Writer, client_id, verify

from cldcb.errors import ChainError, StoreError
from cldcb.store import SnapshotNeeded, Store, Stored
from cldcb.store.frames import encode_record
from cldcb.store.log import segment_records

CID = client_id()


def build(tmp_path: Path, segment_bytes: int = 1 << 20, records: int = 5) -> Writer:
    store = Store.open(tmp_path, segment_bytes=segment_bytes)
    store.add_client(CID)
    w = Writer(store.client(CID))
    w.snapshot(10)
    for dv in range(11, 11 + records):
        assert isinstance(w.change(dv, size=80), Stored)
    store.close()
    return w


def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "clients" / CID / "log"


def newest_segment(tmp_path: Path) -> Path:
    return max(log_dir(tmp_path).glob("*.log"))


def record_offsets(path: Path) -> list[int]:
    """Where the frames of a segment start (its zero-filled tail is not one)."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data) and data[pos:pos + 4] == b"cbR1":
        out.append(pos)
        pos += 16 + int.from_bytes(data[pos + 4:pos + 8], "big")
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def reopen(tmp_path: Path) -> Writer:
    return Writer(Store.open(tmp_path).client(CID), seed=3)


def records(w: Writer, at: int = -1) -> list[int]:
    f = verify(w.cs, at)
    assert f is not None
    return [dv for dv, _ in f.records]


def test_log_truncated_mid_record_is_cut_with_a_log_line(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    build(tmp_path)
    seg = newest_segment(tmp_path)
    last = record_offsets(seg)[-1]
    with open(seg, "r+b") as f:
        f.truncate(last + 30)
    with caplog.at_level(logging.WARNING, logger="cldcb.store"):
        w = reopen(tmp_path)
    assert "cut 30 bytes" in caplog.text and seg.name in caplog.text
    assert (seg.parent / f"{seg.name}.torn-{last}").stat().st_size == 30
    assert seg.stat().st_size == last
    assert records(w) == [11, 12, 13, 14] and w.cs.status().tip.data_version == 14
    assert isinstance(w.change(15), Stored)
    assert records(reopen(tmp_path)) == [11, 12, 13, 14, 15]


def test_a_damaged_last_record_is_cut_and_kept_aside(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    build(tmp_path)
    seg = newest_segment(tmp_path)
    last = record_offsets(seg)[-1]
    flip(seg, last + 60)
    with caplog.at_level(logging.WARNING, logger="cldcb.store"):
        w = reopen(tmp_path)
    assert "checksum" in caplog.text and "kept in" in caplog.text
    assert (seg.parent / f"{seg.name}.torn-{last}").exists()
    assert records(w) == [11, 12, 13, 14]


def test_zeros_after_the_last_record_are_the_zero_filled_tail(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a power cut can leave after the records (zeros) is what the store itself
    writes ahead of them: no cut, no warning, and the next record follows the last."""
    build(tmp_path)
    seg = newest_segment(tmp_path)
    with open(seg, "ab") as f:
        f.write(b"\x00" * 4096)
    with caplog.at_level(logging.WARNING, logger="cldcb.store"):
        w = reopen(tmp_path)
    assert "cut" not in caplog.text and not list(seg.parent.glob("*.torn-*"))
    assert records(w) == [11, 12, 13, 14, 15]
    assert isinstance(w.change(16), Stored)
    assert records(reopen(tmp_path)) == [11, 12, 13, 14, 15, 16]
    assert record_offsets(seg)[-1] < seg.stat().st_size


@pytest.mark.parametrize("where", ["body", "length"])
def test_damage_in_the_middle_is_a_clear_error_every_time(tmp_path: Path, where: str) -> None:
    build(tmp_path)
    seg = newest_segment(tmp_path)
    middle = record_offsets(seg)[2]
    flip(seg, middle + (70 if where == "body" else 6))
    before = seg.read_bytes()
    for _ in range(3):                             # the same answer, nothing cut
        store = Store.open(tmp_path)
        with pytest.raises(StoreError) as err:
            store.client(CID)
        msg = str(err.value)
        assert str(seg) in msg and f"offset {middle}" in msg and "will not cut" in msg
        assert seg.read_bytes() == before
        store.close()
    store = Store.open(tmp_path)                   # other clients and listing still work
    store.add_client(client_id(OTHER_PRIV))
    listed = {c.client_id: c for c in store.list_clients()}
    assert listed[CID].newest_data_version is None and len(listed) == 2


def test_damage_in_an_older_segment_shows_when_read(tmp_path: Path) -> None:
    build(tmp_path, segment_bytes=700, records=12)
    segs = sorted(log_dir(tmp_path).glob("*.log"))
    assert len(segs) >= 3
    flip(segs[0], record_offsets(segs[0])[1] + 70)
    w = reopen(tmp_path)                            # opening reads only the newest segment
    assert w.cs.status().tip.data_version == 22
    plan = w.cs.fetch()
    assert plan is not None
    assert len(list(plan.chunks())) == 3
    with pytest.raises(StoreError, match=str(segs[0])):
        list(plan.records())
    with pytest.raises(StoreError, match="damaged"):
        w.snapshot(22, anchored=True)               # the anchor index reads it too
    assert isinstance(w.change(23), Stored)        # appending is not blocked


def test_a_missing_segment_is_a_clear_error(tmp_path: Path) -> None:
    build(tmp_path, segment_bytes=700, records=12)
    segs = sorted(log_dir(tmp_path).glob("*.log"))
    segs[1].unlink()
    with pytest.raises(StoreError, match=f"{segs[1]} is missing"):
        Store.open(tmp_path).client(CID)


def test_a_garbage_temp_snapshot_is_discarded(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    build(tmp_path)
    snaps = tmp_path / "clients" / CID / "snapshots"
    (snaps / "upload-123-abc.part").write_bytes(b"cldcbSN1" + b"\xff" * 1000)
    (snaps / "upload-124-abd.part").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="cldcb.store"):
        w = reopen(tmp_path)
    assert caplog.text.count("abandoned snapshot upload") == 2
    assert not list(snaps.glob("*.part"))
    assert records(w) == [11, 12, 13, 14, 15]


@pytest.mark.parametrize("damage", ["trailer", "truncated", "footer"])
def test_a_damaged_published_snapshot_falls_back_a_generation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    w = build(tmp_path)
    store = Store.open(tmp_path)
    w = Writer(store.client(CID))
    w.snapshot(15, anchored=True)
    w.change(16)
    store.close()
    snaps = tmp_path / "clients" / CID / "snapshots"
    newest = max(snaps.glob("*.snap"))
    size = newest.stat().st_size
    if damage == "trailer":
        flip(newest, size - 40)
    elif damage == "footer":
        flip(newest, size - 3)
    else:
        with open(newest, "r+b") as f:
            f.truncate(size // 2)
    with caplog.at_level(logging.ERROR, logger="cldcb.store"):
        w = reopen(tmp_path)
    assert "previous snapshot generation" in caplog.text
    assert (snaps / f"{newest.name}.damaged").exists() and not newest.exists()
    f = verify(w.cs)
    assert f is not None and f.snapshot_dv == 10
    assert [dv for dv, _ in f.records] == [11, 12, 13, 14, 15, 16]
    assert w.cs.status().tip.data_version == 16 and w.cs.status().want_snapshot is not None
    assert isinstance(w.change(17), Stored)


def test_a_damaged_chunk_is_an_error_when_fetched(tmp_path: Path) -> None:
    build(tmp_path)
    snap = max((tmp_path / "clients" / CID / "snapshots").glob("*.snap"))
    flip(snap, 8 + 16 + 50)                          # inside the first chunk
    w = reopen(tmp_path)
    plan = w.cs.fetch()
    assert plan is not None
    with pytest.raises(StoreError, match=f"snapshot file {snap} is damaged"):
        list(plan.chunks())
    plan = w.cs.fetch()
    assert plan is not None                          # the records are still served
    assert [r.data_version for r in plan.records()] == [11, 12, 13, 14, 15]


def _two_chains(tmp_path: Path) -> Path:
    """Generation 1: snapshot 10 + records 11..15; generation 2: a fresh snapshot at 20
    (a gap) + records 21, 22. Returns the newest snapshot's path."""
    w = build(tmp_path)
    store = Store.open(tmp_path)
    w = Writer(store.client(CID))
    assert isinstance(w.change(20), SnapshotNeeded)
    w.snapshot(20)
    w.change(21)
    w.change(22)
    store.close()
    return max((tmp_path / "clients" / CID / "snapshots").glob("*.snap"))


def test_a_damaged_fresh_snapshot_set_aside_leaves_the_older_chain_alone(
        tmp_path: Path) -> None:
    newest = _two_chains(tmp_path)
    flip(newest, newest.stat().st_size - 40)            # its trailer
    w = reopen(tmp_path)
    f = verify(w.cs)                                    # ChainVerifier: no foreign records
    assert f is not None and f.snapshot_dv == 10
    assert [dv for dv, _ in f.records] == [11, 12, 13, 14, 15]
    states = w.cs.states()
    assert [(s.generation, s.damaged, s.snapshot_data_version, s.first_data_version,
             s.last_data_version) for s in states] == [(1, False, 10, 11, 15),
                                                        (2, True, -1, 21, 22)]
    assert "gap" in states[0].note and newest.name in states[1].note


def test_fetch_names_a_generation_and_serves_only_its_chain(tmp_path: Path) -> None:
    newest = _two_chains(tmp_path)
    flip(newest, 8 + 16 + 50)                           # a chunk: found only when read
    w = reopen(tmp_path)
    states = w.cs.states()
    assert [(s.generation, s.damaged, s.snapshot_data_version, s.first_data_version,
             s.last_data_version, s.record_count) for s in states] == [
                 (1, False, 10, 11, 15, 5), (2, True, 20, 21, 22, 2)]
    assert str(newest) in states[1].note and states[0].note == ""
    plan = w.cs.fetch(generation=1)
    assert plan is not None and plan.snapshot.data_version == 10
    assert [r.data_version for r in plan.records()] == [11, 12, 13, 14, 15]
    plan.close()
    assert w.cs.fetch(generation=7) is None


def test_a_record_missing_inside_a_segment_is_served_for_recovery_to_name(
        tmp_path: Path) -> None:
    """Not another chain (it does not start a segment): the fetch serves what follows the
    gap as it is, so that recovery names the record; the listing says the chain breaks."""
    build(tmp_path)
    seg = newest_segment(tmp_path)
    frames, _ = segment_records(seg)
    assert [f.data_version for f in frames] == [11, 12, 13, 14, 15]
    del frames[2]
    seg.write_bytes(b"".join(encode_record(f.data_version, f.kind, f.link, f.time_ms, f.sealed)
                             for f in frames))
    w = reopen(tmp_path)
    plan = w.cs.fetch()
    assert plan is not None
    assert [r.data_version for r in plan.records()] == [11, 12, 14, 15]
    plan.close()
    (state,) = w.cs.states()
    assert (state.last_data_version, state.record_count, state.damaged) == (12, 2, False)
    assert "does not follow" in state.note and "broken" in state.note
    with pytest.raises(ChainError, match=r"record #2 \(data_version 14\)"):
        verify(w.cs)
