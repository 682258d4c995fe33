"""The plugin's in-memory log of sealed records, shared by every server link.

Each change is sealed once; the same bytes go to every server. The log holds
the records that some server may still need: a server in step needs the ones
after the record it holds, a server being caught up by a snapshot needs the
ones after the snapshot's position (the plugin buffers them while the
snapshot uploads). Positions are sequence numbers that only grow, also
across :meth:`RecordLog.reset` (a snapshot with a fresh anchor starts a new
chain), so an old position can never be mistaken for a new one.

The *base* is the position the log starts from: the tip a server held when
the plugin started, or a snapshot's anchor. Entries after it are the records
sealed since. :meth:`trim` forgets records no server needs any more (and
anything beyond a memory bound: a server that needed those is caught up by a
snapshot instead).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cldcb.core.dataversion import Kind, Tip


@dataclass(frozen=True)
class Entry:
    """One sealed record and the tip it makes."""

    seq: int
    data_version: int
    kind: Kind
    link: bytes
    sealed: bytes
    tip: Tip

    @property
    def hash(self) -> bytes:
        return self.tip.hash


class RecordLog:
    """Records after a base position; see the module docstring."""

    def __init__(self, base: Tip | None, seq: int = 0) -> None:
        self._entries: deque[Entry] = deque()
        self._bytes = 0
        self._next = seq
        self.base: Tip | None = base
        self.base_seq = seq
        self._by_hash: dict[bytes, int] = {}
        if base is not None:
            self._by_hash[base.hash] = seq
        self._next = seq + 1

    @property
    def head(self) -> Tip | None:
        """The newest tip: the last record's, or the base."""
        return self._entries[-1].tip if self._entries else self.base

    @property
    def head_seq(self) -> int:
        return self._entries[-1].seq if self._entries else self.base_seq

    @property
    def next_seq(self) -> int:
        """The position :meth:`append` gives the next record."""
        return self._next

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, data_version: int, kind: Kind, link: bytes, sealed: bytes,
               tip: Tip) -> Entry:
        entry = Entry(self._next, data_version, kind, link, sealed, tip)
        self._next += 1
        self._entries.append(entry)
        self._bytes += len(sealed)
        self._by_hash[tip.hash] = entry.seq
        return entry

    def reset(self, base: Tip) -> int:
        """Start a new chain at ``base`` (a fresh snapshot's anchor); returns its position."""
        self._entries.clear()
        self._bytes = 0
        self._by_hash = {base.hash: self._next}
        self.base = base
        self.base_seq = self._next
        self._next += 1
        return self.base_seq

    def position(self, tip_hash: bytes | None) -> int | None:
        """The position of the record (or base) whose hash is ``tip_hash``, if in the log."""
        if tip_hash is None:
            return None
        return self._by_hash.get(tip_hash)

    def holds(self, seq: int | None) -> bool:
        """True if a server at position ``seq`` can be brought up to date from this log."""
        return seq is not None and self.base_seq <= seq <= self.head_seq

    def tip_at(self, seq: int) -> Tip | None:
        if seq == self.base_seq:
            return self.base
        for e in self._entries:
            if e.seq == seq:
                return e.tip
        return None

    def after(self, seq: int, limit: int = 64) -> list[Entry]:
        """At most ``limit`` entries after position ``seq`` (which must be held)."""
        if not self._entries:
            return []
        start = seq + 1 - self._entries[0].seq
        if start < 0:
            raise ValueError(f"position {seq} is no longer in the log")
        out = []
        for i in range(start, min(start + limit, len(self._entries))):
            out.append(self._entries[i])
        return out

    def trim(self, keep_from: int, max_bytes: int) -> None:
        """Forget records up to ``keep_from`` (which becomes the base), and beyond
        ``max_bytes`` the oldest ones whatever is kept."""
        while self._entries and (self._entries[0].seq <= keep_from
                                 or self._bytes > max_bytes and len(self._entries) > 1):
            e = self._entries.popleft()
            self._bytes -= len(e.sealed)
            old_base = self.base
            if old_base is not None and self._by_hash.get(old_base.hash) == self.base_seq:
                del self._by_hash[old_base.hash]
            self.base = e.tip
            self.base_seq = e.seq
