"""What the store's calls answer: results of its own, which the server maps to wire messages.

The store knows records, snapshots and chains, not the protocol: :meth:`ClientStore.append`
returns :class:`Stored`, :class:`SnapshotNeeded` or, on the hot path, :data:`Deferred`;
:meth:`ClientStore.status` a :class:`Holding`. :mod:`cldcb.server.handler` turns each into
its answer (``Ack``, ``NeedSnapshot``, ``Status``) or, for :data:`Deferred`, makes the same
call off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cldcb.core.dataversion import Tip


@dataclass(frozen=True, slots=True)
class Stored:
    """The record is held: written and fsynced by this call, or already held (a resend of
    the tip). It names the record as the request gave it; ``want_snapshot``: see
    "Records and the chain" in :mod:`cldcb.store`."""

    data_version: int
    kind: int
    link: bytes
    want_snapshot: bool


@dataclass(frozen=True, slots=True)
class SnapshotNeeded:
    """The record does not continue the chain held (first contact, a gap, a link that is
    not the one the data_version rules name): nothing was stored; ``reason`` says why."""

    data_version: int
    reason: str


class Deferred(Enum):
    """A hot-path append (``hot_path=True``) that the hot path must not take: nothing was
    done; the same call without ``hot_path`` (in a worker thread) takes it."""

    LOG_MUST_GROW = "the log must grow first (a new segment, or more zero-filled tail)"


AppendResult = Stored | SnapshotNeeded | Deferred
"""What :meth:`~cldcb.store.ClientStore.append` returns."""


@dataclass(frozen=True, slots=True)
class Holding:
    """What the server holds for one client (:meth:`~cldcb.store.ClientStore.status`).

    ``tip`` is None when nothing is held; a snapshot's anchor when a fresh snapshot has no
    record after it yet (``tip.is_snapshot``); ``tip_time`` is when it was received.
    ``snapshot_data_version`` is -1 without a complete snapshot; ``quota`` None: none."""

    tip: Tip | None
    tip_time: int
    snapshot_data_version: int
    snapshot_time: int
    bytes_used: int
    quota: int | None
    append_only: bool
    want_snapshot: bool
    generations: int
