"""What a server link and its host (the engine) may ask of each other, and nothing more.

A link (:class:`cldcb.plugin.links.ServerLink`) is given its :class:`LinkSettings` once
and asks its host only what :class:`LinkHost` names; the host reads the link's
published state (:class:`LinkView`, read-only) and tells it what to do through the
link's methods, never by setting its fields. Neither module imports the other: this
one is all they share (besides the record log and the local copies).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cldcb.core import wire
from cldcb.core.dataversion import Tip
from cldcb.errors import CldcbError
from cldcb.plugin.recordlog import RecordLog
from cldcb.plugin.snapshot import LocalCopy, SnapshotTarget
from cldcb.plugin.wrapper import ServerEntry
from cldcb.transport.connection import WriteAnswer


class ServerConnection(SnapshotTarget, Protocol):
    """The part of :class:`cldcb.transport.connection.Connection` the plugin uses."""

    @property
    def is_closed(self) -> bool: ...

    async def status(self) -> wire.Status: ...

    async def write(self, data_version: int, kind: int, link: bytes,
                    sealed: bytes) -> wire.Ack | wire.NeedSnapshot: ...

    def write_nowait(self, data_version: int, kind: int, link: bytes, sealed: bytes,
                     done: Callable[[WriteAnswer], None]) -> None: ...

    def abort(self, exc: CldcbError) -> None: ...

    async def close(self) -> None: ...


Connector = Callable[[ServerEntry], Awaitable[ServerConnection]]


class LinkHost(Protocol):
    """What a link may ask of its host (the engine), and all of it: a link imports
    nothing of the engine.

    - :attr:`log`: the record log the link sends from (None until the host chose
      the head); the link reads it (``holds``, ``position``, ``after``,
      ``head_seq``, ``head``) and never changes it.
    - :attr:`closing`: the plugin is stopping; the link stops reconnecting.
    - :attr:`hook_blocking`: a hook call waits for snapshots: a catch-up uploads at
      full speed (the larger window, no chunk delay) and says "blocking".
    - :meth:`emit`: a line for lightningd's log (``level``, ``message``); never a key.
    - :meth:`changed`: the link's published state changed (a position, a connection,
      a copy wanted, a snapshot's progress): the host re-reads what it needs.
    - :meth:`progress`: as :meth:`changed`, and a catch-up's upload got further than
      ever before with its copy (the outage limit of a call waiting for it is put off).
    - :meth:`hot_trouble`: a hot-path write this link sent cannot be answered by its
      callback (a failure, ``NeedSnapshot``, a violation, the connection dropped).
    - :meth:`usable_copy`: a local copy whose position the log still holds, for a
      catch-up (the link acquires it), or None.
    - :meth:`may_compact`: compactions take turns among the host's links: may
      ``link``, wanting one and otherwise due, start its compaction now?
    - :meth:`calls_flowing`: hook calls come now (one is pending or ended a moment
      ago): a background upload paces itself.
    """

    @property
    def log(self) -> RecordLog | None: ...

    @property
    def closing(self) -> bool: ...

    @property
    def hook_blocking(self) -> bool: ...

    def emit(self, level: str, message: str) -> None: ...

    def changed(self) -> None: ...

    def progress(self) -> None: ...

    def hot_trouble(self) -> None: ...

    def usable_copy(self) -> LocalCopy | None: ...

    def may_compact(self, link: LinkView) -> bool: ...

    def calls_flowing(self) -> bool: ...


@dataclass(frozen=True)
class LinkSettings:
    """What every link of a plugin is given once: how to connect, and how to seal and
    pace its snapshot uploads."""

    connect: Connector
    node_pub: bytes
    client_priv: bytes
    chunk_size: int
    chunk_delay: float


class LinkView(Protocol):
    """A link's published state, as its host reads it (none of it is the host's to set).

    ``pos``: the log position the server holds (None: nothing the log knows);
    ``needs_copy``: it needs a snapshot and no usable copy is there for it;
    ``has_status``/``status_tip``: it answered ``status``, holding that tip;
    ``catching_up``/``compacting``: a snapshot job of that kind runs;
    ``violation``: its last protocol violation, until an Ack that matches;
    ``in_step()``: connected and holding a position the log still holds;
    ``streaming()``: the host may send the next record itself (the hot path);
    ``compaction_due()``: it wants a compaction and may start one now.
    """

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def has_status(self) -> bool: ...

    @property
    def status_tip(self) -> Tip | None: ...

    @property
    def pos(self) -> int | None: ...

    @property
    def needs_copy(self) -> bool: ...

    @property
    def catching_up(self) -> bool: ...

    @property
    def compacting(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def violation(self) -> str | None: ...

    @property
    def state(self) -> str: ...

    def in_step(self) -> bool: ...

    def streaming(self) -> bool: ...

    def compaction_due(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...
