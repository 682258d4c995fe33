"""Which records belong to a snapshot's chain, and what a client can restore.

See "Fetching" in :mod:`cldcb.store`. A snapshot's records are those that
follow it by the data_version rules (:func:`cldcb.dataversion.decide`,
walked from the snapshot's anchor exactly as recovery's
:class:`~cldcb.seal.ChainVerifier` walks them), from its start in the log up to
the start of the next fresh snapshot (a later chain). The walk stops at the
first record that does not follow and starts a segment: the first record of a
chain whose fresh snapshot the store no longer offers (set aside as
``*.snap.damaged``; its commit rolled the log, and its records link to its
anchor). So a fetch never serves a snapshot followed by another chain's
records, whatever was set aside. A record that does not follow in the middle
of a segment is damage or tampering inside the chain, not another chain: a
fetch serves it as it is (recovery then names it), a listing says the chain
is broken there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cldcb import wire
from cldcb.dataversion import Kind, advance, decide, snapshot_tip
from cldcb.errors import Damage, StoreError
from cldcb.store.fs import FileLayer
from cldcb.store.log import LogEntry, Pos, SegmentLog, iter_ranges
from cldcb.store.snapshots import SnapshotInfo, iter_chunks, read_info


class ChainWalk:
    """The records of one snapshot's chain, from an iterator of log entries.

    A chain can only begin at the start of a segment (a fresh snapshot's commit rolls
    the log so that its records start a segment). So a record that does not follow ends
    the chain when it starts a segment; anywhere else it is damage or tampering inside
    the chain: with ``pass_breaks`` (a fetch) it and everything after it are served as
    they are, so that recovery names the record that does not follow; without (a listing)
    the walk stops there too, and ``broken`` says so.
    """

    def __init__(self, info: SnapshotInfo, *, pass_breaks: bool = False) -> None:
        self.tip = snapshot_tip(info.data_version, info.anchor)
        self.pass_breaks = pass_breaks
        self.stopped: LogEntry | None = None
        """The first record that did not follow (None: the walk reached the range's end)."""
        self.broken = False
        """That record does not start a segment: the chain is broken inside, not ended."""
        self.reason = ""

    def follow(self, entries: Iterator[LogEntry]) -> Iterator[LogEntry]:
        for e in entries:
            r = e.record
            d = decide(self.tip, r.data_version, Kind(r.kind))
            if d.link is None or d.link != r.link:
                self.stopped, self.broken = e, e.pos[1] != 0
                self.reason = (d.reason if d.link is None else
                               f"the record of data_version {r.data_version} links elsewhere")
                if self.broken and self.pass_breaks:
                    yield e
                    yield from entries
                return
            self.tip = advance(self.tip, r.data_version, Kind(r.kind), e.hash)
            yield e


def chain_stop(snapshots: list[SnapshotInfo], chosen: SnapshotInfo, log_end: Pos) -> Pos:
    """Where ``chosen``'s records end at the latest: the next fresh snapshot's start."""
    later = [s.start for s in snapshots if s.seq > chosen.seq and not s.anchored]
    return later[0] if later else log_end


@dataclass
class _Span:
    first: int = -1
    last: int = -1
    count: int = 0
    newest_ms: int = 0

    def add(self, e: LogEntry) -> None:
        dv = e.record.data_version
        self.first = dv if self.first < 0 else self.first
        self.last = dv
        self.count += 1
        self.newest_ms = e.record.time_ms


def _chunks_note(fs: FileLayer, info: SnapshotInfo) -> str:
    """'' when every chunk of the snapshot reads back and checks; else what is wrong."""
    try:
        for _ in iter_chunks(fs.open_read(info.path), info):
            pass
    except (StoreError, OSError) as exc:
        return str(exc)
    return ""


def _damaged_info(fs: FileLayer, path: Path, seq: int) -> SnapshotInfo | None:
    try:
        return read_info(fs, path, seq)
    except (Damage, OSError):
        return None


def list_states(fs: FileLayer, log: SegmentLog, snapshots: list[SnapshotInfo],
                damaged: list[tuple[int, Path]]) -> list[wire.RestorableState]:
    """Every kept snapshot (each chunk read and checked) with its chain's records, and every
    snapshot set aside as damaged since the oldest kept one with the records that follow it
    in the log (they belong to no restorable state); oldest first."""
    out: list[wire.RestorableState] = []
    oldest = snapshots[0].seq if snapshots else 0
    aside = sorted((seq, p) for seq, p in damaged if seq > oldest)
    orphans: dict[int, _Span] = {}
    for i, info in enumerate(snapshots):
        stop = chain_stop(snapshots, info, log.end())
        span, walk = _Span(), ChainWalk(info)
        ranges = log.open_range(info.start, stop) if info.start < stop else []
        entries = iter_ranges(ranges)
        try:
            for e in walk.follow(entries):
                span.add(e)
            nxt = snapshots[i + 1].seq if i + 1 < len(snapshots) else None
            between = [seq for seq, _ in aside if seq > info.seq and (nxt is None or seq < nxt)]
            if walk.stopped is not None and not walk.broken and between:
                rest = orphans.setdefault(between[-1], _Span())
                rest.add(walk.stopped)
                for e in entries:
                    rest.add(e)
        finally:
            for r in ranges:
                r.file.close()
        bad = _chunks_note(fs, info)
        reached = max(span.last, info.data_version)
        note = bad or ("" if walk.stopped is None else
                       f"a record after data_version {reached} does not follow ({walk.reason}):"
                       " the chain is broken there" if walk.broken else
                       f"its chain ends at data_version {reached}: {walk.reason}")
        out.append(wire.RestorableState(info.seq, bool(bad), info.data_version, info.time_ms,
                                        span.first, span.last, span.count, span.newest_ms,
                                        note))
    for seq, path in aside:
        got = _damaged_info(fs, path, seq)
        rest = orphans.get(seq, _Span())
        out.append(wire.RestorableState(
            seq, True, got.data_version if got else -1, got.time_ms if got else 0,
            rest.first, rest.last, rest.count, rest.newest_ms,
            f"the snapshot file {path.name} was found damaged and set aside"))
    out.sort(key=lambda s: s.generation)
    return out
