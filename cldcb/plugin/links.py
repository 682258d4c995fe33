"""One server as the plugin sees it: its connection, what it holds, and its driver task.

A :class:`ServerLink` runs one task for the life of the plugin. The task
connects (with backoff), asks for ``status`` and then brings the server up
to the plugin's record log, forever:

- the server holds a position of the log: send the records after it, in
  order, pipelined (responses come back in order); each ``Ack`` moves the
  position on and wakes the pending hook;
- the server holds nothing the log knows (first contact, a gap, it fell
  behind while the log moved on, or it answered ``NeedSnapshot``): it needs a
  snapshot. If the host has a usable local copy (one whose position is
  still in the log) the task uploads it and continues with the records after
  it (a *catch-up*); otherwise it says so and waits: copies are taken inside
  a hook call, where the database cannot change under the reader, or asked
  of the local mirror from one (see :mod:`cldcb.plugin.engine`).

Compaction (the server asked for a fresh snapshot) runs as a second task on
the same connection, so records keep flowing while it uploads. A background
upload (a compaction, a catch-up no call waits for) pauses
:data:`BACKGROUND_PAUSE` after each chunk while hook calls come, leaving the
CPU to them; a catch-up a call waits for goes at full speed. Compactions
take turns (:meth:`ServerLink.compaction_due` asks the host): a record waits
behind the chunks on a compacting server's connection, so while one server
compacts the others answer the changes, unless they alone cannot make the
quorum anyway. A catch-up and a compaction are the two kinds of one
:class:`SnapshotJob`, uploaded by one routine (:meth:`ServerLink._upload`).

Acknowledgements count only when they match (:mod:`cldcb.core.session`): an
``Ack`` must name the data_version, kind and link of the record it answers, a
``ChunkAck`` its chunk's index, a ``SnapshotAck`` the snapshot's id and
data_version, and each must carry the session's MAC (which only the server key's
holder can make: :mod:`cldcb.core.answermac`). Anything else is a protocol violation
(:class:`~cldcb.errors.AckMismatch`, :class:`~cldcb.errors.ForgedAnswer`): the
position does not move, the connection is dropped at once (whatever else waits
on it fails, nothing more received on it is taken), the log says so, and the
status file shows it as
the server's last error until an ``Ack`` that matches comes. The link
reconnects after :data:`RECONNECT_MAX`; meanwhile the server counts for
nothing, and a call that needs it fails at the outage limit.

The hot path (:mod:`cldcb.plugin.hotpath`; :meth:`ServerLink.streaming`,
:meth:`ServerLink.send_now`): while the task is parked with nothing to send and
the server holds the log's head, the engine sends a new record itself, from the hook call, and
the answer is taken in the connection's receiving callback, so a change
costs no task switch. The task stays parked; it only wakes when something
needs it (a failure, ``NeedSnapshot``, or a record it must send itself),
and it never sends while such a write is in flight (``inflight``).

A link imports nothing of the engine: it asks its host only what
:class:`~cldcb.plugin.linkhost.LinkHost` names, and publishes its state read-only
(:class:`~cldcb.plugin.linkhost.LinkView`); the host tells it what to do through its
methods (:meth:`ServerLink.nudge`, :meth:`~ServerLink.reserve`,
:meth:`~ServerLink.start_compaction`, :meth:`~ServerLink.place`,
:meth:`~ServerLink.send_now`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cldcb.core import wire
from cldcb.core.dataversion import Kind, Tip
from cldcb.core.seal import ZERO_HASH
from cldcb.core.session import check_ack
from cldcb.errors import AckMismatch, CldcbError, TransportError
from cldcb.plugin.linkhost import LinkHost, LinkSettings, ServerConnection
from cldcb.plugin.snapshot import (
    BACKGROUND_WINDOW,
    WINDOW,
    LocalCopy,
    SnapshotAborted,
    upload_snapshot,
)
from cldcb.plugin.wrapper import ServerEntry
from cldcb.transport.connection import WriteAnswer
from cldcb.transport.proxy import DIRECT, Patience, Proxy, patience

RECONNECT_MIN = 0.1
RECONNECT_MAX = 2.0
CATCHUP_BACKOFF_MAX = 60.0
COMPACTION_RETRY = 30.0
COMPACTION_MIN_INTERVAL = 5.0
"""A server asks for compaction when its log outgrew the last snapshot; for a small
database that is every few hundred changes. Compaction is for the server's storage and
recovery time, never for safety, so it waits at least this long after the last snapshot
(each one costs a copy inside a hook and delays the writes queued behind its end)."""
WATCH_INTERVAL = 0.5
BACKGROUND_PAUSE = 0.01
"""Seconds a background upload (a compaction, a catch-up no call waits for) waits after
each chunk while hook calls come (:meth:`LinkHost.calls_flowing`). Its reading, sealing
and sending, and the server's storing, took about 13 ms of CPU per 1 MiB chunk on the
2-core test machine: at full speed one upload kept both cores busy, and the hook path
(the plugin's event loop, the server answering the record) waited for a core. A 1 GiB
upload takes up to about 10 s longer while calls come; none waits at all when none do."""


@dataclass
class SnapshotJob:
    """One snapshot upload of a link: a *catch-up* (the server holds nothing the log
    knows; ``blocking`` when a hook call waits for it) or a *compaction* (the server
    asked for a fresh snapshot; uploaded beside the records)."""

    kind: str                    # "catch-up", "blocking" or "compaction"
    copy: LocalCopy
    sent: int = 0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "data_version": self.copy.data_version,
                "bytes_sent": self.sent, "bytes": self.copy.size}


def tip_from_status(st: wire.Status) -> Tip | None:
    """The tip a ``Status`` describes (a snapshot anchor has a zero link)."""
    if not st.has_tip:
        return None
    return Tip(st.tip_data_version, Kind(st.tip_kind), st.tip_hash, st.tip_link,
               is_snapshot=st.tip_link == ZERO_HASH)


class ServerLink:
    """See the module docstring."""

    def __init__(self, host: LinkHost, entry: ServerEntry, settings: LinkSettings) -> None:
        self.host = host
        self.entry = entry
        self.settings = settings
        self.name = entry.address
        self.conn: ServerConnection | None = None
        self._connected = False
        self._has_status = False
        self._status_tip: Tip | None = None
        self._pos: int | None = None         # log position the server holds
        self.held_dv: int | None = None
        self._needs_copy = False
        self.reserved: LocalCopy | None = None
        self.sent_seq = -1                   # newest log position written to this server
        self.want_ignored_until = -1         # acks up to here predate the last compaction
        self._catch_up: SnapshotJob | None = None
        self._compaction: SnapshotJob | None = None
        self._compaction_task: asyncio.Task[None] | None = None
        self.wants_compaction = False
        self.compaction_retry_at = 0.0
        self.last_snapshot_at = float("-inf")
        self.catchup_backoff = 0.0
        self.next_copy_at = 0.0
        self._last_error: str | None = None
        self._violated: str | None = None    # the last AckMismatch, until an Ack matches
        self.last_ack_dv: int | None = None
        self.last_ack_at: float | None = None
        self.wake = asyncio.Event()
        self.idle = False                    # the task is parked: nothing to send
        self.inflight = 0                    # writes sent by send_now, not answered yet
        self.failure: BaseException | None = None   # for the task to raise (then reconnect)
        self._progress: tuple[LocalCopy | None, int] = (None, 0)    # the most sent of a copy
        self.task: asyncio.Task[None] | None = None
        self._was_down_logged = False

    # -- published state: what the host reads (it changes none of it) -----------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def has_status(self) -> bool:
        """The server answered ``status`` at least once."""
        return self._has_status

    @property
    def status_tip(self) -> Tip | None:
        """The tip the server held when it last answered ``status``."""
        return self._status_tip

    @property
    def pos(self) -> int | None:
        """The log position the server holds (None: nothing the log knows)."""
        return self._pos

    @property
    def needs_copy(self) -> bool:
        """The server needs a snapshot and no usable copy is there for it."""
        return self._needs_copy

    @property
    def catching_up(self) -> bool:
        return self._catch_up is not None

    @property
    def compacting(self) -> bool:
        return self._compaction is not None

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def violation(self) -> str | None:
        """The server's last protocol violation, until an Ack that matches comes."""
        return self._violated

    def in_step(self) -> bool:
        log = self.host.log
        return self._connected and log is not None and log.holds(self._pos)

    @property
    def state(self) -> str:
        if not self._connected:
            return "down" if self._last_error else "connecting"
        if self._catch_up is not None:
            return "catching-up"
        if self.in_step():
            return "in-step"
        return "behind"

    def describe(self) -> dict[str, Any]:
        head = self.host.log.head if self.host.log is not None else None
        lag = None
        if head is not None and self.held_dv is not None:
            lag = max(0, head.data_version - self.held_dv)
        job = self._catch_up or self._compaction
        via = self._route()
        return {"address": self.entry.address, "server_id": self.entry.server_id,
                "route": f"via {via}" if via else "direct", "connected": self._connected,
                "state": self.state,
                "last_acked_data_version": self.last_ack_dv, "last_ack_at": self.last_ack_at,
                "lag": lag, "snapshot": job.describe() if job is not None else None,
                "last_error": self._last_error}

    # -- what the host asks of the link -------------------------------------------------
    def nudge(self) -> None:
        """Something for the driver task to look at (a new record, a copy, a new log)."""
        self.wake.set()

    @property
    def patience(self) -> Patience:
        """Backoff of this server's route: :data:`RECONNECT_MIN` to :data:`RECONNECT_MAX`
        direct, slower with jitter through a proxy (see cldcb.transport.proxy)."""
        via = self._route()
        if via is not None:
            return patience(via)
        return replace(DIRECT, reconnect_min=RECONNECT_MIN, reconnect_max=RECONNECT_MAX)

    def _route(self) -> Proxy | None:
        try:
            return self.entry.route()
        except CldcbError:              # the plugin checked every spec before starting
            return None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"link {self.name}")

    async def stop(self) -> None:
        for t in (self._compaction_task, self.task):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        await self._drop()

    # -- the driver ----------------------------------------------------------------------
    async def _run(self) -> None:
        patience = self.patience
        delay = patience.reconnect_min
        while not self.host.closing:
            try:
                conn = await self.settings.connect(self.entry)
            except CldcbError as exc:
                self._down(str(exc))
                await asyncio.sleep(delay)
                delay = patience.next_delay(delay)
                continue
            self.conn = conn
            watch = asyncio.get_running_loop().create_task(self._watch(conn))
            try:
                st = await conn.status()
                self._connected = True
                delay = patience.reconnect_min
                self._on_status(st)
                await self._sync(conn)
            except (CldcbError, OSError) as exc:
                if isinstance(exc, AckMismatch):
                    self._violation(conn, exc)   # (a forged answer fails the connection)
                    delay = patience.reconnect_max  # a server that lied is not hurried back
                self._down(str(exc) or type(exc).__name__)
            finally:
                watch.cancel()
                await self._drop()
            await asyncio.sleep(delay)

    async def _watch(self, conn: ServerConnection) -> None:
        """Wake the driver when an idle connection is lost, so that it reconnects (and the
        status file says so) before the next change needs it."""
        while not conn.is_closed:
            await asyncio.sleep(WATCH_INTERVAL)
        self.wake.set()

    def _down(self, reason: str) -> None:
        self._last_error = reason
        if not self._was_down_logged:
            self._was_down_logged = True
            self.host.emit("unusual", f"server {self.name}: {reason}; reconnecting")
        self.host.changed()

    async def _drop(self) -> None:
        self._connected = False
        self.failure = None
        if self.inflight:
            self.inflight = 0
            self.host.hot_trouble()
        if self.reserved is not None:
            self.reserved.release()
            self.reserved = None
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        self.host.changed()

    def _on_status(self, st: wire.Status) -> None:
        tip = tip_from_status(st)
        self._status_tip = tip
        self._has_status = True
        self.held_dv = tip.data_version if tip is not None else None
        if st.want_snapshot:
            self.wants_compaction = True
        log = self.host.log
        if log is not None:
            self._pos = log.position(tip.hash if tip is not None else None)
        if self._was_down_logged or self._last_error is None:
            held = f"holds data_version {tip.data_version}" if tip else "holds nothing yet"
            self.host.emit("info", f"server {self.name}: connected, {held}")
        self._was_down_logged = False
        self._last_error = self._violated
        self.host.changed()

    def place(self) -> None:
        """Find this server's position once the engine created its log."""
        log = self.host.log
        if log is not None and self._has_status:
            tip = self._status_tip
            self._pos = log.position(tip.hash if tip is not None else None)

    async def _sync(self, conn: ServerConnection) -> None:
        host = self.host
        while True:
            self.wake.clear()
            if self.failure is not None:
                exc, self.failure = self.failure, None
                raise exc
            if conn.is_closed:
                raise TransportError(f"connection to {self.name} lost")
            if self.inflight:                 # send_now's answer wakes us
                await self.wake.wait()
                continue
            log = host.log
            if log is None:
                await self.wake.wait()
                continue
            if not log.holds(self._pos):
                self._pos = None
                copy = self._take_reserved()
                if copy is None and time.monotonic() >= self.next_copy_at:
                    copy = host.usable_copy()
                    if copy is not None:
                        copy.acquire()
                if copy is None:
                    if not self._needs_copy:
                        self._needs_copy = True
                        host.changed()
                    await self._wait(self.next_copy_at)
                    continue
                self._needs_copy = False
                await self._catch_up_with(conn, copy)
                continue
            self._needs_copy = False
            assert self._pos is not None
            entries = log.after(self._pos)
            if not entries:
                self.idle = True
                try:
                    await self.wake.wait()
                finally:
                    self.idle = False
                continue
            if len(entries) == 1:          # the usual case: one change, no extra task
                e = entries[0]
                self.sent_seq = e.seq
                res = await conn.write(e.data_version, int(e.kind), e.link, e.sealed)
                self._answered(e.seq, e.data_version, e.kind, e.link, res)
                continue
            tasks = [(e, asyncio.ensure_future(conn.write(e.data_version, int(e.kind), e.link,
                                                          e.sealed))) for e in entries]
            self.sent_seq = entries[-1].seq
            try:
                for e, t in tasks:
                    if not self._answered(e.seq, e.data_version, e.kind, e.link, await t):
                        break
            finally:
                rest = [t for _, t in tasks if not t.done()]
                if rest:
                    await asyncio.gather(*rest, return_exceptions=True)
                for _, t in tasks:
                    if t.done() and not t.cancelled():
                        t.exception()

    def _answered(self, seq: int, data_version: int, kind: Kind, link: bytes,
                  res: wire.Ack | wire.NeedSnapshot) -> bool:
        """Take the server's answer to the write of record ``seq`` (``data_version``,
        ``kind``, ``link``); False on NeedSnapshot, AckMismatch (see :meth:`_violation`)
        on an Ack that names another write."""
        host = self.host
        if isinstance(res, wire.Ack):
            try:
                check_ack(res, data_version, kind, link)
            except AckMismatch as exc:
                self._violation(self.conn, exc)
                raise
            if self._violated is not None:
                self._violated = self._last_error = None    # it answers honestly again
            self._pos = seq
            self.held_dv = data_version
            if res.want_snapshot and self._compaction is None and seq > self.want_ignored_until:
                self.wants_compaction = True
            host.changed()                  # a hot-path call this completes is answered here
            self.last_ack_dv = data_version
            self.last_ack_at = time.time()
            self.catchup_backoff = 0.0
            self.next_copy_at = 0.0
            return True
        self._pos = None
        self._last_error = (f"asked for a snapshot at data_version {res.data_version}: "
                           f"{res.reason}")
        host.emit("info", f"server {self.name}: {self._last_error}")
        host.changed()
        return False

    # -- the hot path (see the module docstring) -----------------------------------------
    def streaming(self) -> bool:
        """True if the engine may send the next record itself (:meth:`send_now`)."""
        log = self.host.log
        conn = self.conn
        return (self.idle and self.inflight == 0 and self._connected and conn is not None
                and not conn.is_closed and log is not None and self._pos == log.head_seq
                and not self._needs_copy and self._catch_up is None
                and not self.compaction_due())

    def send_now(self, seq: int, data_version: int, kind: Kind, link: bytes,
                 sealed: bytes) -> bool:
        """Send the record the engine is about to append at position ``seq`` from the hook
        call; False (nothing sent) if the connection is gone."""
        conn = self.conn
        assert conn is not None
        try:
            conn.write_nowait(data_version, int(kind), link, sealed,
                              lambda res: self._answer_now(conn, seq, data_version, kind,
                                                           link, res))
        except (CldcbError, OSError):
            self.wake.set()                   # the task finds the broken connection
            return False
        self.inflight += 1
        self.sent_seq = seq
        return True

    def _answer_now(self, conn: ServerConnection, seq: int, data_version: int, kind: Kind,
                    link: bytes, res: WriteAnswer) -> None:
        if conn is not self.conn:             # an answer from a connection already dropped
            return
        self.inflight -= 1
        if isinstance(res, AckMismatch):      # an Ack without the session's MAC
            self._violation(conn, res)
        if isinstance(res, BaseException):
            # the task raises it, as if its own write had failed (then reconnects)
            self.failure = res
            self.wake.set()
            self.host.hot_trouble()
            return
        try:
            answered = self._answered(seq, data_version, kind, link, res)
        except AckMismatch:
            answered = False                  # (the task raises it: see _violation)
        if not answered:
            self.wake.set()
            self.host.hot_trouble()
        elif not self.idle:
            self.wake.set()

    def _violation(self, conn: ServerConnection | None, exc: AckMismatch) -> None:
        """The server acknowledged something it was not sent (``exc`` says what). Drop the
        connection now (whatever waits on it fails with ``exc``; the task raises it and
        reconnects), log it, and show it as the last error until an Ack matches."""
        if conn is None or conn is not self.conn or self.failure is exc:
            return                            # (a connection already dropped; told already)
        self._violated = self._last_error = str(exc)
        self._was_down_logged = True          # logged here, not again by _down
        self.failure = exc
        self.host.emit("unusual", f"server {self.name}: {exc}")
        conn.abort(exc)
        self.wake.set()
        self.host.changed()

    async def _wait(self, until: float) -> None:
        timeout = until - time.monotonic()
        if timeout <= 0:
            await self.wake.wait()
            return
        try:
            async with asyncio.timeout(timeout):     # (wait_for may swallow a cancel)
                await self.wake.wait()
        except TimeoutError:
            pass

    def reserve(self, copy: LocalCopy) -> None:
        """Keep ``copy`` for this server (it needs a snapshot and the hook may end first)."""
        if self.reserved is copy:
            return
        if self.reserved is not None:
            self.reserved.release()
        copy.acquire()
        self.reserved = copy

    def _take_reserved(self) -> LocalCopy | None:
        copy, self.reserved = self.reserved, None
        log = self.host.log
        if copy is not None and (log is None or not log.holds(copy.next_seq - 1)):
            copy.release()
            return None
        return copy

    async def _upload(self, conn: ServerConnection, job: SnapshotJob,
                      **hooks: Callable[..., Any]) -> None:
        """Upload ``job``'s copy to the server (both kinds of snapshot job): a catch-up
        that a hook call waits for (``blocking``) at full speed, the others beside the
        records. ``hooks``: ``still_wanted`` and ``before_end`` of
        :func:`upload_snapshot`. The copy is released and the job ended here."""
        host, copy, cfg = self.host, job.copy, self.settings
        background = job.kind != "blocking"
        if job.kind == "compaction":
            what = "compaction snapshot"
            host.emit("info", f"server {self.name}: {what} at data_version "
                              f"{copy.data_version} ({copy.size} bytes) uploading in the "
                              "background")
        else:
            what = "snapshot"
            host.emit("info", f"server {self.name}: sending a {what} at data_version "
                              f"{copy.data_version} ({copy.size} bytes, {job.kind})")
        started = time.monotonic()

        def progress(sent: int, total: int) -> None:
            # a catch-up getting further with this copy than before is progress for the
            # call waiting for it: an upload begun again (the connection was lost or
            # dropped) does not put the limit off; a compaction is no call's progress
            job.sent = sent
            if job.kind != "compaction" and sent > self._progress[1]:
                self._progress = (copy, sent)
                host.progress()
            else:
                host.changed()

        try:
            await upload_snapshot(conn, copy, node_pub=cfg.node_pub, client_priv=cfg.client_priv,
                                  chunk_size=cfg.chunk_size,
                                  window=BACKGROUND_WINDOW if background else WINDOW,
                                  chunk_delay=self._pause if background else 0.0,
                                  on_progress=progress, **hooks)
        except AckMismatch as exc:
            self._violation(conn, exc)
            raise
        finally:
            copy.release()
            if job is self._catch_up:
                self._catch_up = None
            if job is self._compaction:
                self._compaction = None
        self.last_snapshot_at = time.monotonic()
        # This snapshot is the one the server asked for (by holding nothing the log knows,
        # or by asking for compaction): only an Ack of a later write may ask again.
        self.wants_compaction = False
        host.emit("info", f"server {self.name}: {what} at data_version {copy.data_version} "
                          f"is durable ({time.monotonic() - started:.1f} s)")

    def _pause(self) -> float:
        """After each chunk of a background upload (see :data:`BACKGROUND_PAUSE`)."""
        if self.settings.chunk_delay:
            return self.settings.chunk_delay          # (the tests' slow uploads)
        return BACKGROUND_PAUSE if self.host.calls_flowing() else 0.0

    async def _catch_up_with(self, conn: ServerConnection, copy: LocalCopy) -> None:
        """Upload ``copy`` (acquired for this link; released here) and move on after it."""
        host = self.host
        job = SnapshotJob("blocking" if host.hook_blocking else "catch-up", copy)
        self._catch_up = job
        self.catchup_backoff = min(max(1.0, self.catchup_backoff * 2), CATCHUP_BACKOFF_MAX)
        self.next_copy_at = time.monotonic() + self.catchup_backoff
        if self._progress[0] is not copy:
            self._progress = (copy, 0)
        host.changed()

        def wanted() -> bool:
            log = host.log
            return log is not None and log.holds(copy.next_seq - 1)

        try:
            await self._upload(conn, job, still_wanted=wanted)
        except SnapshotAborted:
            raise TransportError(f"snapshot to {self.name} abandoned: a newer one is needed") \
                from None
        self._pos = copy.next_seq - 1
        self.held_dv = copy.data_version
        self.want_ignored_until = max(self.want_ignored_until, self.sent_seq)
        host.changed()

    # -- compaction ----------------------------------------------------------------------
    def start_compaction(self, copy: LocalCopy) -> None:
        conn = self.conn
        if conn is None:
            return
        copy.acquire()
        self._compaction = job = SnapshotJob("compaction", copy)
        self._compaction_task = asyncio.get_running_loop().create_task(
            self._compact(conn, job), name=f"compaction {self.name}")

    async def _compact(self, conn: ServerConnection, job: SnapshotJob) -> None:
        def before_end() -> None:
            # writes answered before the server sees SnapshotEnd may still ask for one
            self.want_ignored_until = self.sent_seq

        try:
            await self._upload(conn, job, before_end=before_end)
        except AckMismatch:
            self.compaction_retry_at = time.monotonic() + COMPACTION_RETRY   # (told already)
        except (CldcbError, OSError) as exc:
            self.compaction_retry_at = time.monotonic() + COMPACTION_RETRY
            self.host.emit("unusual", f"server {self.name}: compaction snapshot failed "
                                      f"({exc}); will try again later")
        finally:
            self._compaction_task = None
            self.host.changed()

    def compaction_due(self) -> bool:
        if not self.wants_compaction:
            return False                  # the usual case, asked before every change
        now = time.monotonic()
        return (self._compaction is None and self.in_step()
                and now >= self.compaction_retry_at
                and now - self.last_snapshot_at >= COMPACTION_MIN_INTERVAL
                and self.host.may_compact(self))
