"""The store's semantics: the chain, snapshots, fetch, retention, quota, clients."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers.entries import recognition_entry
from hypothesis import given, settings
from hypothesis import strategies as st
from store_crash_child import (
    CLIENT_PRIV,
    NODE,
    OTHER_PRIV,
    ZERO,
    Writer,
    client_id,
    client_pub,
    snapshot_bytes,
    verify,
)

from cldcb.core.dataversion import Kind, Tip, snapshot_tip
from cldcb.core.seal import ChainVerifier, SnapshotSealer
from cldcb.errors import KeyFormatError, QuotaExceeded, StoreError
from cldcb.store import ClientInfo, ClientStore, Deferred, SnapshotNeeded, Store, Stored
from cldcb.store.frames import (
    RECORD_HEAD,
    RECORD_MAGIC,
    ChunkFrame,
    RecordFrame,
    encode_frame,
    encode_record,
    read_frame,
)
from cldcb.store.settings import Settings
from cldcb.store.snapshots import SnapshotInfo

CID = client_id()
OTHER = client_id(OTHER_PRIV)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path, segment_bytes=2000)
    s.add_client(CID)
    yield s
    s.close()


@pytest.fixture
def w(store: Store) -> Writer:
    return Writer(store.client(CID))


def reopen(store: Store, **kw: object) -> tuple[Store, ClientStore]:
    store.close()
    s = Store.open(store.data_dir, segment_bytes=store.segment_bytes)
    return s, s.client(CID)


def same(a: Tip | None, b: Tip | None) -> bool:
    """Same place in the chain (a record, or the anchor that is that record's hash)."""
    assert a is not None and b is not None
    return (a.data_version, a.hash) == (b.data_version, b.hash)


def chain_of(w: Writer, at: int = -1) -> list[int]:
    f = verify(w.cs, at)
    assert f is not None
    return [dv for dv, _ in f.records]


# -- the chain --------------------------------------------------------------------------

def test_first_contact_needs_a_snapshot_and_stores_nothing(w: Writer) -> None:
    st = w.cs.status()
    assert st.tip is None and st.snapshot_data_version == -1 and st.want_snapshot
    res = w.change(1)
    assert isinstance(res, SnapshotNeeded) and "first contact" in res.reason
    assert w.cs.status().bytes_used == 0
    assert w.cs.fetch() is None


def test_records_continue_the_chain_and_gaps_need_a_snapshot(w: Writer) -> None:
    w.snapshot(10)
    for dv in (11, 12, 13):
        res = w.change(dv)
        assert isinstance(res, Stored) and res.data_version == dv
    assert w.cs.status().tip == w.tip
    used = w.cs.status().bytes_used
    gap = w.change(15)
    assert isinstance(gap, SnapshotNeeded) and "gap" in gap.reason
    back = w.change(11)
    assert isinstance(back, SnapshotNeeded) and "backwards" in back.reason
    link, sealed = w.seal(14, link=bytes(range(32)))
    wrong = w.cs.append(14, 0, link, sealed, w.now())
    assert isinstance(wrong, SnapshotNeeded) and "link" in wrong.reason
    assert w.cs.status().bytes_used == used and w.cs.status().tip == w.tip
    assert chain_of(w) == [11, 12, 13]


def test_replacement_and_pragma_records(w: Writer) -> None:
    w.snapshot(1)
    assert isinstance(w.change(1, Kind.PRAGMA), Stored)     # PRAGMA at the anchor's dv
    assert isinstance(w.change(2), Stored)
    before = w.tip
    assert isinstance(w.change(2), Stored)                  # uncommitted batch replaced
    assert isinstance(w.change(2), Stored)                  # and again
    assert w.tip is not None and before is not None and w.tip.link == before.link
    assert isinstance(w.change(2, Kind.PRAGMA), Stored)
    assert isinstance(w.change(3), Stored)
    st = w.cs.status()
    assert st.tip == w.tip and st.tip.kind == Kind.NORMAL
    f = verify(w.cs)
    assert f is not None and [dv for dv, _ in f.records] == [1, 2, 2, 2, 2, 3]
    assert f.tip == w.tip


def test_a_resent_newest_record_is_acked_once(w: Writer) -> None:
    """Each Ack, the first and the resend's, names the record it answers."""
    w.snapshot(5)
    link, sealed = w.seal(6)
    assert w.send(6, Kind.NORMAL, link, sealed) == Stored(6, Kind.NORMAL, link, False)
    used = w.cs.status().bytes_used
    again = w.cs.append(6, 0, link, sealed, w.now())
    assert again == Stored(6, Kind.NORMAL, link, False) and w.cs.status().bytes_used == used
    link2, sealed = w.seal(6, Kind.PRAGMA)
    assert link2 != link
    assert w.send(6, Kind.PRAGMA, link2, sealed) == Stored(6, Kind.PRAGMA, link2, False)
    assert w.cs.append(6, 1, link2, sealed, w.now()) == Stored(6, Kind.PRAGMA, link2, False)
    assert chain_of(w) == [6, 6]


def test_malformed_requests(w: Writer) -> None:
    w.snapshot(5)
    link, sealed = w.seal(6)
    with pytest.raises(StoreError, match="kind 7"):
        w.cs.append(6, 7, link, sealed, 0)
    with pytest.raises(StoreError, match="32 bytes"):
        w.cs.append(6, 0, link[:5], sealed, 0)
    with pytest.raises(ValueError, match="data_version"):
        w.cs.append(-3, 0, link, sealed, 0)
    with pytest.raises(StoreError, match="32 bytes"):
        w.cs.begin_snapshot(6, b"short", 0)


# -- snapshots and anchors ----------------------------------------------------------------

def test_fresh_anchor_is_the_tip_and_survives_a_restart(store: Store, w: Writer) -> None:
    anchor = w.snapshot(42)
    st = w.cs.status()
    assert st.tip is not None and st.tip.data_version == 42 and st.tip.hash == anchor
    assert st.tip.link == ZERO and st.snapshot_data_version == 42
    assert w.cs.tip == snapshot_tip(42, anchor)    # one form of a snapshot's tip everywhere
    store, cs = reopen(store)
    st = cs.status()
    assert (st.tip.data_version, st.tip.hash, st.tip.link) == (42, anchor, ZERO)
    w2 = Writer(cs, seed=5)
    assert w2.tip == snapshot_tip(42, anchor) == cs.tip
    assert isinstance(w2.change(42), SnapshotNeeded)       # cannot replace inside it
    assert isinstance(w2.change(43), Stored)
    assert chain_of(w2) == [43]
    store.close()


def test_anchored_snapshot_keeps_the_tip_and_records_follow_its_anchor(w: Writer) -> None:
    w.snapshot(10)
    for dv in range(11, 16):
        w.change(dv)
    assert w.tip is not None
    anchor = w.tip.hash
    up = w.cs.begin_snapshot(15, anchor, w.now())
    for dv in range(16, 19):                                  # records flow during the upload
        assert isinstance(w.change(dv), Stored)
    s = SnapshotSealer(NODE.pubkey, CLIENT_PRIV, b"\x44" * 32, 15, anchor)
    up.add_chunk(0, s.seal_chunk(snapshot_bytes(15, 0, 100)))
    assert w.cs.status().snapshot_data_version == 10          # not visible before commit
    up.commit(1, s.seal_manifest(0), w.now())
    st = w.cs.status()
    assert st.snapshot_data_version == 15 and st.tip == w.tip
    f = verify(w.cs)
    assert f is not None and f.snapshot_dv == 15 and f.anchor == anchor
    assert [dv for dv, _ in f.records] == [16, 17, 18] and f.tip == w.tip
    assert isinstance(w.change(19), Stored)


def test_fresh_snapshot_during_records_resets_the_tip(w: Writer) -> None:
    w.snapshot(10)
    w.change(11)
    anchor = w.new_anchor(30, anchored=False)
    s = SnapshotSealer(NODE.pubkey, CLIENT_PRIV, b"\x55" * 32, 30, anchor)
    up = w.cs.begin_snapshot(30, anchor, w.now())
    assert isinstance(w.change(12), Stored)                 # still the old chain
    up.add_chunk(0, s.seal_chunk(snapshot_bytes(30, 0, 50)))
    up.commit(1, s.seal_manifest(0), w.now())
    st = w.cs.status()
    assert (st.tip.data_version, st.tip.hash, st.tip.link) == (30, anchor, ZERO)
    w.tip = st.tip
    assert isinstance(w.change(31), Stored)
    assert chain_of(w) == [31]
    assert chain_of(w, 29) == [11, 12]                         # the older chain, point in time


def test_anchor_must_name_a_record_of_the_same_data_version(w: Writer) -> None:
    w.snapshot(10)
    w.change(11)
    w.change(12)
    assert w.tip is not None
    up = w.cs.begin_snapshot(11, w.tip.hash, w.now())         # record 12's hash, dv 11
    with pytest.raises(StoreError, match="anchor"):
        up.commit(0, b"m", w.now())
    assert w.cs.status().snapshot_data_version == 10
    assert not list((w.cs.folder / "snapshots").glob("*.part"))


def test_upload_protocol_errors(w: Writer) -> None:
    w.snapshot(10)
    up = w.cs.begin_snapshot(11, bytes(32), w.now())
    up.add_chunk(0, b"a")
    with pytest.raises(StoreError, match="chunk 2 arrived where chunk 1"):
        up.add_chunk(2, b"b")
    with pytest.raises(StoreError, match="already finished or aborted"):
        up.add_chunk(1, b"b")
    up = w.cs.begin_snapshot(11, bytes(32), w.now())
    up.add_chunk(0, b"a")
    with pytest.raises(StoreError, match="chunk_count 3 but 1 chunks"):
        up.commit(3, b"m", w.now())
    up = w.cs.begin_snapshot(11, bytes(32), w.now())
    up.abort()
    up.abort()
    assert not list((w.cs.folder / "snapshots").glob("*.part"))
    assert w.cs.status().snapshot_data_version == 10


# -- fetch ----------------------------------------------------------------------------

def test_fetch_newest_and_point_in_time(w: Writer) -> None:
    w.snapshot(10)
    for dv in range(11, 21):
        w.change(dv)
    w.snapshot(20, anchored=True)
    for dv in range(21, 26):
        w.change(dv)
    f = verify(w.cs)
    assert f is not None and f.snapshot_dv == 20 and [d for d, _ in f.records] == list(
        range(21, 26))
    assert chain_of(w, 12) == [11, 12]
    assert verify(w.cs, 12).snapshot_dv == 10                 # type: ignore[union-attr]
    assert chain_of(w, 19) == list(range(11, 20))
    assert chain_of(w, 20) == []
    assert chain_of(w, 23) == [21, 22, 23]
    assert w.cs.fetch(9) is None
    plan = w.cs.fetch(23)
    assert plan is not None
    assert isinstance(plan.snapshot, SnapshotInfo)           # the store's own, not wire's
    assert [c.index for c in plan.chunks() if isinstance(c, ChunkFrame)] == [0, 1, 2]
    chain = ChainVerifier(NODE, client_pub(), plan.snapshot.data_version, plan.snapshot.anchor)
    for r in plan.records():
        assert isinstance(r, RecordFrame) and r.time_ms > 0
        chain.open(r.data_version, Kind(r.kind), r.link, r.sealed)
    assert chain.tip.data_version == 23
    plan.close()


def test_fetch_plan_survives_pruning(store: Store, w: Writer) -> None:
    w.snapshot(10)
    for dv in range(11, 30):
        w.change(dv, size=200)
    plan = w.cs.fetch()
    assert plan is not None
    w.snapshot(29, anchored=True)
    w.change(30)
    w.snapshot(30, anchored=True)                             # generation of 10 is pruned
    assert [s.data_version for s in w.cs.snapshots] == [29, 30]
    assert len(list(plan.chunks())) == 3
    assert [r.data_version for r in plan.records()] == list(range(11, 30))


# -- retention --------------------------------------------------------------------------

def test_two_generations_keep_a_usable_backup_at_every_step(store: Store, w: Writer) -> None:
    dv = 100
    w.snapshot(dv)
    kept: list[int] = [dv]
    for round_ in range(6):
        for _ in range(8):
            dv += 1
            assert isinstance(w.change(dv, size=150), Stored)
            f = verify(w.cs)
            assert f is not None and same(f.tip, w.tip)
        fresh = round_ % 3 == 2
        if fresh:
            dv += 5
        anchor = w.new_anchor(dv, anchored=not fresh)
        s = SnapshotSealer(NODE.pubkey, CLIENT_PRIV, bytes([round_ + 1]) * 32, dv, anchor)
        up = w.cs.begin_snapshot(dv, anchor, w.now())
        up.add_chunk(0, s.seal_chunk(snapshot_bytes(dv, 0, 300)))
        before = verify(w.cs)                                  # mid-upload: still usable
        assert before is not None and same(before.tip, w.tip)
        up.commit(1, s.seal_manifest(0), w.now())
        if fresh:
            w.tip = Tip(dv, Kind.NORMAL, anchor, ZERO, is_snapshot=True)
        kept = (kept + [dv])[-2:]
        assert [s.data_version for s in w.cs.snapshots] == kept
        for at in kept:                                        # both generations fetchable
            g = verify(w.cs, at)
            assert g is not None and g.snapshot_dv == at
        f = verify(w.cs)
        assert f is not None and same(f.tip, w.tip)
    segs = sorted((w.cs.folder / "log").glob("*.log"))
    assert len(segs) <= 6, segs                                # old segments were deleted
    store2, cs = reopen(store)
    assert [s.data_version for s in cs.snapshots] == kept and same(cs.status().tip, w.tip)
    store2.close()


def test_one_generation(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_client(CID, generations=1)
    w = Writer(store.client(CID))
    w.snapshot(1)
    w.change(2)
    w.snapshot(2, anchored=True)
    assert [s.data_version for s in w.cs.snapshots] == [2]
    assert chain_of(w) == [] and w.cs.fetch(1) is None
    store.close()


def test_append_only_keeps_everything_until_the_server_prunes(tmp_path: Path) -> None:
    store = Store.open(tmp_path, segment_bytes=600)
    store.add_client(CID, append_only=True, generations=2)
    w = Writer(store.client(CID))
    w.snapshot(1)
    for dv in range(2, 30):
        w.change(dv)
        if dv % 7 == 0:
            w.snapshot(dv, anchored=True)
    w.change(29)                                               # a replacement: old one stays
    assert [s.data_version for s in w.cs.snapshots] == [1, 7, 14, 21, 28]
    assert chain_of(w, 3) == [2, 3]
    segs = len(list((w.cs.folder / "log").glob("*.log")))
    assert w.cs.status().append_only
    freed = store.prune(CID)
    assert freed > 0
    assert [s.data_version for s in w.cs.snapshots] == [21, 28]
    assert len(list((w.cs.folder / "log").glob("*.log"))) < segs
    assert chain_of(w) == [29, 29] and chain_of(w, 25) == [22, 23, 24, 25]
    assert w.cs.fetch(20) is None
    store.close()


# -- quota and want_snapshot --------------------------------------------------------------

def test_quota_exceeded_stores_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_client(CID, quota=3000)
    w = Writer(store.client(CID))
    w.snapshot(1)
    acked = 1
    with pytest.raises(QuotaExceeded) as err:
        for dv in range(2, 100):
            w.change(dv, size=100)
            acked = dv
    msg = str(err.value)
    assert "of 3000 bytes are used" in msg and f"cldcb-server set {CID} --quota SIZE" in msg
    st = w.cs.status()
    assert st.tip.data_version == acked and st.bytes_used <= 3000 and st.quota == 3000
    assert chain_of(w)[-1] == acked
    with pytest.raises(QuotaExceeded):
        w.snapshot(acked, anchored=True)
    assert not list((w.cs.folder / "snapshots").glob("*.part"))
    store.change_settings(CID, quota=100_000)                  # the operator raises it
    w.tip = w.cs.status().tip
    assert isinstance(w.change(acked + 1), Stored)
    store.close()


def test_want_snapshot_when_the_log_outgrows_the_snapshot(w: Writer) -> None:
    w.snapshot(1, chunks=1, chunk_size=1000)
    size = w.cs.snapshots[-1].size
    dv, res = 1, None
    while True:
        dv += 1
        res = w.change(dv, size=100)
        assert isinstance(res, Stored)
        if w.cs.log.bytes_after(w.cs.snapshots[-1].start) > size:
            break
        assert not res.want_snapshot
    assert res.want_snapshot and w.cs.status().want_snapshot
    w.snapshot(dv, anchored=True, chunks=1, chunk_size=1000)
    assert not w.cs.status().want_snapshot


# -- clients and recognition entries -------------------------------------------------------

def test_add_list_remove(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    assert store.list_clients() == [] and not store.is_registered(CID)
    info = store.add_client(CID.upper().replace("C", "c", 1))
    assert info == ClientInfo(CID, None, False, 2, 0, None, None)
    assert store.add_client(CID) == info                       # idempotent
    settings = (tmp_path / "clients" / CID / "settings.json").stat().st_mtime_ns
    store.add_client(CID)
    assert (tmp_path / "clients" / CID / "settings.json").stat().st_mtime_ns == settings
    assert store.add_client(CID, quota=5000, append_only=True, generations=3) == info
    assert not store.register(CID, Settings(quota=5000))      # registered: kept as it is
    old, new = store.change_settings(CID, quota=5000, append_only=True, generations=3)
    assert (old.quota, old.append_only, old.generations) == (None, False, 2)
    info = store.info(CID)
    assert (info.quota, info.append_only, info.generations) == (5000, True, 3)
    assert store.change_settings(CID, append_only=False)[1] == Settings(5000, False, 3)
    store.add_client(OTHER)
    w = Writer(store.client(CID))
    w.snapshot(7)
    w.change(8)
    w.cs.touch(1234)
    listed = {c.client_id: c for c in store.list_clients()}
    assert set(listed) == {CID, OTHER}
    assert listed[CID].newest_data_version == 8 and listed[CID].last_seen_ms == 1234
    assert listed[CID].bytes_used == w.cs.status().bytes_used > 0
    assert listed[OTHER].newest_data_version is None
    entry = recognition_entry(NODE, CLIENT_PRIV)
    store.put_recognition(CID, entry)
    store.remove_client(CID)
    assert not store.is_registered(CID) and store.list_recognitions() == []
    with pytest.raises(StoreError, match="not registered"):
        store.client(CID)
    with pytest.raises(StoreError, match="removed"):
        w.cs.status()
    kept = tmp_path / "removed" / f"{CID}.1"
    assert (kept / "settings.json").exists() and (kept / "recognition.entry").read_bytes() \
        == entry and list((kept / "snapshots").glob("*.snap"))
    with pytest.raises(StoreError, match="not registered"):
        store.remove_client(CID)
    store.add_client(CID)                                       # a fresh start
    assert store.client(CID).fetch() is None
    store.remove_client(CID)
    assert (tmp_path / "removed" / f"{CID}.2").is_dir()
    with pytest.raises(KeyFormatError):
        store.add_client("c3../../etc")
    with pytest.raises(KeyFormatError):
        store.client("03" + CID[2:])
    assert not store.is_registered("../x")
    with pytest.raises(StoreError, match="generations"):
        store.add_client(OTHER, generations=0)
    store.close()


def test_recognition_entries(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_client(CID)
    store.add_client(OTHER)
    one, two, three = (recognition_entry(NODE, p) for p in (CLIENT_PRIV, OTHER_PRIV,
                                                             CLIENT_PRIV))
    store.put_recognition(CID, one)
    store.put_recognition(OTHER, two)
    store.put_recognition(CID, three)                           # replaces its own
    assert sorted(store.list_recognitions()) == sorted([three, two])
    assert not list((tmp_path / "recognitions").glob("*.tmp"))
    stranger = b"\x07" * 32
    with pytest.raises(StoreError, match="not registered"):
        store.put_recognition("c" + client_pub(stranger).hex()[1:],
                              recognition_entry(NODE, stranger))
    with pytest.raises(StoreError, match="not empty"):
        store.put_recognition(CID, b"")
    store.close()
    assert sorted(Store.open(tmp_path).list_recognitions()) == sorted([three, two])


def test_open_needs_the_data_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cldcb-server init"):
        Store.open(tmp_path / "missing")


def test_one_client_store_per_store(store: Store) -> None:
    assert store.client(CID) is store.client(CID)


def test_another_instance_sees_new_records_and_settings(store: Store, w: Writer) -> None:
    w.snapshot(3)
    other = Store.open(store.data_dir)
    reader = other.client(CID)
    assert reader.status().tip.data_version == 3
    w.change(4)
    assert reader.status().tip.data_version == 4              # noticed, reloaded
    other.change_settings(CID, quota=10**9)
    assert w.cs.status().quota == 10**9                        # settings reloaded
    other.close()


def test_a_vouched_writer_skips_the_checks_until_the_token_changes(store: Store,
                                                                    w: Writer) -> None:
    """vouch(token): the same token as the previous successful call spares the checks
    for other instances' changes; another token (a takeover, a settings epoch) or none
    brings them back."""
    w.snapshot(3)
    w.cs.vouch((1, 0))
    assert isinstance(w.change(4), Stored)
    other = Store.open(store.data_dir)
    theirs = Writer(other.client(CID))               # another process took over
    assert isinstance(theirs.change(5), Stored)
    w.cs.vouch((1, 0))                                # the same token: not looked at
    assert w.cs.status().tip.data_version == 4
    w.cs.vouch((2, 0))                                # the takeover's generation
    assert w.cs.status().tip.data_version == 5        # noticed, reloaded
    w.tip = theirs.tip
    w.cs.vouch((2, 0))
    assert isinstance(w.change(6), Stored)
    other.change_settings(CID, quota=10**9)           # settings.json replaced
    w.cs.vouch((2, 0))
    assert w.cs.status().quota is None                # (None: no quota)
    w.cs.vouch((2, 1))                                # ... and the epoch bumped
    assert w.cs.status().quota == 10**9
    other.close()


def test_a_hot_path_append_never_grows_the_log(store: Store, w: Writer) -> None:
    """hot_path (an event loop's call): an append that would create or roll a segment
    or zero-fill more of its tail answers Deferred.LOG_MUST_GROW (a result, not an
    exception) and changes nothing; the same append without it grows the log; the next one
    fits and goes through."""
    w.snapshot(3)
    link, sealed = w.seal(4)
    sizes = {p.name: p.stat().st_size for p in (w.cs.folder / "log").glob("*.log")}
    deferred = w.cs.append(4, int(Kind.NORMAL), link, sealed, w.now(), hot_path=True)
    assert deferred is Deferred.LOG_MUST_GROW    # the first record zero-fills a tail first
    assert w.cs.status().tip == w.tip
    assert {p.name: p.stat().st_size for p in (w.cs.folder / "log").glob("*.log")} == sizes
    assert isinstance(w.send(4, Kind.NORMAL, link, sealed), Stored)
    link, sealed = w.seal(5)
    assert isinstance(w.cs.append(5, int(Kind.NORMAL), link, sealed, w.now(),
                                  hot_path=True), Stored)


def test_a_live_upload_is_not_taken_for_debris(store: Store, w: Writer) -> None:
    w.snapshot(3)
    w.change(4)
    assert w.tip is not None
    s = SnapshotSealer(NODE.pubkey, CLIENT_PRIV, b"\x66" * 32, 4, w.tip.hash)
    up = w.cs.begin_snapshot(4, w.tip.hash, w.now())
    up.add_chunk(0, s.seal_chunk(snapshot_bytes(4, 0, 10)))
    (w.cs.folder / "snapshots" / "upload-old.part").write_bytes(b"debris")
    other = Store.open(store.data_dir)
    other.client(CID)                                          # opening cleans debris only
    names = [p.name for p in (w.cs.folder / "snapshots").glob("*.part")]
    assert "upload-old.part" not in names and len(names) == 1
    up.commit(1, s.seal_manifest(0), w.now())
    assert w.cs.status().snapshot_data_version == 4
    other.close()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 1), st.binary(min_size=32, max_size=32),
       st.integers(0, 2**63 - 1), st.binary(max_size=5000))
def test_a_record_frame_is_the_generic_frame_of_its_body(dv: int, kind: int, link: bytes,
                                                         t: int, sealed: bytes) -> None:
    """A frame made of pieces (one copy of the sealed bytes, running checksums) is the
    very frame of the body they make, and read_frame gives the body back."""
    frame = encode_record(dv, kind, link, t, sealed)
    body = RECORD_HEAD.pack(dv, kind, link, t) + sealed
    assert frame == encode_frame(RECORD_MAGIC, body)
    assert read_frame(io.BytesIO(frame), 0, len(frame), RECORD_MAGIC) == (body, len(frame))
