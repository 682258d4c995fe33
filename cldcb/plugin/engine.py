"""The backup engine: what the plugin does with each ``db_write`` hook call.

The promise: **lightningd never commits a change the backup does not already
hold.** The hook call is answered ``continue`` only once ``quorum`` servers
acknowledged (fsynced) the change; anything else is answered with a failure,
and lightningd stops without committing.

Each call ``(data_version, writes)``:

1. The first call waits until the servers' ``status`` are known (all of them,
   or ``quorum`` of them after a short grace) and takes the plugin's *head*
   from them: the tip most servers hold among those the call can follow
   (a plugin restart is not a first contact: the chain just continues).
2. :func:`~cldcb.core.dataversion.decide` against the head:

   - APPEND / REPLACE: the change is sealed once (one
     :class:`~cldcb.core.seal.RecordSealer` with a fresh ephemeral key per plugin
     process) and appended to the :class:`RecordLog`; every server link
     sends it to its server in parallel; a REPLACE names the head it
     supersedes (``replaces``, see :mod:`cldcb.core.seal`);
   - SNAPSHOT (first contact, a gap): a *blocking* snapshot. A consistent
     copy of the database is taken now (the call is pending, so it holds the
     last committed state), with a fresh random anchor; the log restarts at
     that anchor and the change goes on top as its first record. Every
     server needs that snapshot; the call waits until ``quorum`` of them hold
     the snapshot and the record. The uploads read the database in place
     while the call holds it still (:func:`~cldcb.plugin.snapshot.start_copy`),
     from the moment its data_version is read; a local copy is filled beside
     them only if something outlives the call (the mirror, which then takes
     that file, or servers beyond the quorum). The call is answered only after
     the fill ended and the database was let go.

3. While the call waits for ``quorum`` acknowledgements, servers that need a
   snapshot (they fell behind, or answered ``NeedSnapshot``) and servers that
   asked for compaction get a copy, anchored at the record that holds the
   copied state (``decision.link``). If the servers in step can still make
   the quorum, that copy is *not blocking*: with a usable local mirror
   (:mod:`cldcb.plugin.mirror`) it is asked of the mirror at the state before
   this call and nothing waits for it (one such copy at a time; it is handed
   to the servers that need it when it is done); without one it is taken
   inside this call. Either way it is uploaded in the background while records
   keep flowing, and a busy database (the exclusive-lock hazard) only means
   trying again at a later call. If they cannot, the copy is taken inside this
   call, the call waits for the catch-up to finish, and a busy database fails
   the call. Every copy taken inside a call while the mirror is not usable
   rebuilds the mirror, and so does a blocking snapshot's copy.
4. Servers that are unreachable are reconnected with backoff by their links
   while the call waits. If ``quorum`` is not reached within ``outage-limit``
   seconds (measured from the start of the call, or from the last progress
   of a snapshot the call waits for: the last time its upload got further than
   before), the call fails. A server whose acknowledgement does not match the
   change it answers (a protocol violation, see :mod:`cldcb.plugin.links`)
   counts for nothing.

A local copy of the database is always finished, and the database let go, before
the call is answered; every copy (of the database or of the mirror) is deleted once
no upload needs it (a blocking snapshot's copy is handed to the mirror instead).
Each change recorded is also handed to the mirror (a queue put).

The hot path (:mod:`cldcb.plugin.hotpath`, the engine's base class): when every
server is in step and idle and nothing else is due, the call is answered from
callbacks without a task switch; anything unusual hands it to the general path
above, which waits, reconnects, copies and enforces the outage limit from the
call's start. Both paths make the same records and the same answers.

The engine is its links' host (:class:`~cldcb.plugin.linkhost.LinkHost`): a link asks
of it only what that protocol names, and the engine reads a link's published state
(read-only properties) and tells it what to do (``nudge``, ``reserve``,
``start_compaction``, ``place``, ``send_now``), never setting its fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cldcb.core.dataversion import (
    Action,
    Kind,
    Tip,
    classify,
    decide,
    snapshot_tip,
)
from cldcb.core.ids import new_privkey, parse_node_id
from cldcb.core.seal import RecordSealer, item_hash, replaced_hash
from cldcb.errors import CldcbError, PluginError
from cldcb.plugin.hotpath import CONTINUE, HookResult, HotCall, HotPath
from cldcb.plugin.linkhost import Connector, LinkSettings, LinkView
from cldcb.plugin.links import ServerLink
from cldcb.plugin.mirror import Mirror
from cldcb.plugin.recordlog import Entry, RecordLog
from cldcb.plugin.snapshot import (
    CHUNK_SIZE,
    DatabaseBusy,
    LocalCopy,
    copy_database,
    start_copy,
)
from cldcb.plugin.wrapper import WrapperConfig

STARTUP_GRACE = 2.0
CALLS_RECENT = 0.5
"""Hook calls come (:meth:`Engine.calls_flowing`) while one is pending or the last one
ended at most this many seconds ago."""
LOG_LIMIT = 64 * 1024 * 1024
Emit = Callable[[str, str], None]


@dataclass
class _Hook:
    data_version: int
    copy_task: asyncio.Task[LocalCopy] | None = None
    fill_task: asyncio.Task[None] | None = None     # a blocking snapshot's copy, filling
    copy: LocalCopy | None = None
    copy_attempted: bool = False
    copy_blocking: bool = False
    copy_error: str | None = None
    anchor: bytes = b""
    next_seq: int = 0
    expected_dv: int = 0


class Engine(HotPath):
    """See the module docstring. Run :meth:`start`, then :meth:`db_write` per call."""

    def __init__(self, cfg: WrapperConfig, workdir: Path, connect: Connector, *,
                 emit: Emit | None = None, chunk_size: int = CHUNK_SIZE,
                 chunk_delay: float = 0.0, busy_timeout: float = 1.0,
                 startup_grace: float = STARTUP_GRACE, log_limit: int = LOG_LIMIT,
                 mirror_path: Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.workdir = workdir
        self.db_path = cfg.database_path(workdir)
        self.emit: Emit = emit or (lambda level, message: None)
        node_pub = parse_node_id(cfg.node_id)
        self.sealer = RecordSealer(node_pub, cfg.client_priv, new_privkey())
        self.quorum = cfg.effective_quorum
        self.outage_limit = cfg.outage_limit
        self.busy_timeout = busy_timeout
        self.startup_grace = startup_grace
        self.log_limit = log_limit
        settings = LinkSettings(connect, node_pub, cfg.client_priv, chunk_size, chunk_delay)
        self.links = [ServerLink(self, e, settings) for e in cfg.servers]
        self.log: RecordLog | None = None
        self.copies: list[LocalCopy] = []
        self.closing = False
        self.hook_blocking = False
        self._waiter: asyncio.Future[None] | None = None
        self._started = time.monotonic()
        self._progress_at = 0.0
        self.started_at = time.time()
        self.acked_dv: int | None = None
        self.last_hook_dv: int | None = None
        self.last_hook_result: str | None = None
        self.on_change: Callable[[], None] | None = None
        self._slow_running = False
        self._last_call_end = float("-inf")
        self.mirror_path = mirror_path
        self.mirror: Mirror | None = None
        self._mirror_task: asyncio.Task[None] | None = None
        self._mirror_seq: int | None = None     # next_seq of the copy asked of the mirror

    @property
    def busy(self) -> bool:
        """A call is in progress (lightningd waits for its answer)."""
        return self._hot is not None or self._slow_running

    # -- life --------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        if self.mirror_path is not None:
            def soon(callback: Callable[..., None], *args: object) -> None:
                with contextlib.suppress(RuntimeError):   # a thread outliving the loop
                    loop.call_soon_threadsafe(callback, *args)

            self.mirror = Mirror(self.mirror_path, self.db_path,
                                 notify=lambda level, message: soon(self.emit, level, message),
                                 on_state=lambda: soon(self.changed))
            self.mirror.start()
        for link in self.links:
            link.start()

    async def close(self, grace: float = 2.0) -> None:
        """Let in-flight writes finish for up to ``grace`` seconds, then stop everything."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                link.connected and self.log is not None and self.log.holds(link.pos)
                and link.pos != self.log.head_seq for link in self.links):
            await self._wait_change(0.05)
        self.closing = True
        self.stop_patience()
        await asyncio.gather(*(link.stop() for link in self.links), return_exceptions=True)
        if self.mirror is not None:
            await asyncio.to_thread(self.mirror.close)
        if self._mirror_task is not None:
            await asyncio.gather(self._mirror_task, return_exceptions=True)
        for c in self.copies:
            c.users = 0
            c.hook_done()
        self.copies.clear()

    async def wait_idle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until no call is in progress."""
        async with asyncio.timeout(timeout):
            while self.busy:
                if self._hot is not None:
                    await self.hot_finished()
                else:
                    await asyncio.sleep(0.05)

    def changed(self) -> None:
        """Something about a server changed: wake the pending call, note the status."""
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        self.hot_quorum_check()
        if self.on_change is not None:
            self.on_change()

    def progress(self) -> None:
        self._progress_at = time.monotonic()
        self.changed()

    def _wake_links(self) -> None:
        for link in self.links:
            link.nudge()

    async def _wait_change(self, timeout: float,
                           also: asyncio.Future[Any] | None = None) -> None:
        """Wait until :meth:`changed` is called, ``also`` is done, or ``timeout`` passed.

        Callers check the state before calling this without awaiting in between,
        so no change can be missed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not fut.done():
                fut.set_result(None)

        self._waiter = fut
        handle = loop.call_later(max(0.0, timeout), wake)
        if also is not None:
            also.add_done_callback(wake)
        try:
            await fut
        finally:
            handle.cancel()
            self._waiter = None
            if also is not None:
                also.remove_done_callback(wake)

    def may_compact(self, link: LinkView) -> bool:
        """Compactions take turns: records wait behind a compaction's chunks on its
        connection, so one starts only while no other runs, unless the other servers
        (in step, not uploading) hold the quorum without this one even then."""
        others = [other for other in self.links if other is not link]
        if not any(other.compacting for other in others):
            return True
        free = sum(1 for other in others if other.in_step() and not other.compacting
                   and not other.catching_up)
        return free >= self.quorum

    def usable_copy(self) -> LocalCopy | None:
        log = self.log
        for c in reversed(self.copies):
            if log is not None and log.holds(c.next_seq - 1) and c.alive:
                return c
        return None

    # -- the hook --------------------------------------------------------------------------
    async def db_write(self, data_version: int, writes: list[str]) -> HookResult:
        """Handle one call (the hot path if it can, see the module docstring)."""
        while self._hot is not None:
            await self.hot_finished()
        answer: asyncio.Future[HookResult] = asyncio.get_running_loop().create_future()
        if self.db_write_now(data_version, writes,
                             lambda r: None if answer.done() else answer.set_result(r)):
            return await answer
        started = time.monotonic()
        self.last_hook_dv = data_version
        self._slow_running = True
        try:
            result = await self._db_write(data_version, writes, started)
        except CldcbError as exc:
            result = HookResult(False, str(exc))
        finally:
            self._slow_running = False
        self._ended(data_version, result)
        return result

    def calls_flowing(self) -> bool:
        """A call is pending, or one ended within :data:`CALLS_RECENT` seconds (background
        uploads pace themselves meanwhile: see :data:`cldcb.plugin.links.BACKGROUND_PAUSE`)."""
        return self.busy or time.monotonic() - self._last_call_end < CALLS_RECENT

    def _ended(self, data_version: int, result: HookResult) -> None:
        self._last_call_end = time.monotonic()
        self.last_hook_result = "continue" if result.ok else f"fail: {result.message}"
        if result.ok:
            self.acked_dv = data_version
        else:
            self.emit("broken", f"db_write {data_version} refused: {result.message}")
        self.hook_blocking = False
        self._trim()
        self.changed()

    # -- what the hot path asks of the engine (see cldcb.plugin.hotpath) ----------------
    def _seal(self, dv: int, kind: Kind, link: bytes, writes: list[str],
              replaces: bytes) -> bytes:
        """The change sealed once (the same bytes go to every server); SealError if a
        statement is not text. ``replaces``: see :func:`replaced_hash`."""
        return self.sealer.seal_change(dv, kind, link, writes, int(time.time() * 1000),
                                       replaces)

    def _record(self, dv: int, kind: Kind, link: bytes, sealed: bytes,
                writes: list[str]) -> Entry:
        """Append the sealed change to the record log as the chain's next tip (``link``:
        the one :func:`decide` or :func:`next_link` gave; the tip is what
        :func:`advance` makes of it), and hand it to the mirror (a queue put)."""
        log = self.log
        assert log is not None
        entry = log.append(dv, kind, link, sealed, Tip(dv, kind, item_hash(sealed), link))
        if self.mirror is not None:
            self.mirror.feed(entry.seq, dv, kind, writes)
        return entry

    async def _general(self, hot: HotCall) -> HookResult:
        hook = _Hook(hot.data_version, anchor=hot.link, next_seq=hot.seq,
                     expected_dv=hot.data_version if hot.kind is Kind.PRAGMA
                     else hot.data_version - 1)
        try:
            return await self._await_quorum(hook, hot.seq, hot.started + self.outage_limit)
        except CldcbError as exc:
            return HookResult(False, str(exc))
        finally:
            await self._hook_cleanup(hook)

    # -- the general path ----------------------------------------------------------------
    async def _db_write(self, dv: int, writes: list[str], started: float) -> HookResult:
        kind = classify(writes)
        deadline = started + self.outage_limit
        if not await self._ensure_log(dv, kind, deadline):
            return HookResult(False, self._outage_text(dv, "reading the servers' status"))
        log = self.log
        assert log is not None
        hook = _Hook(dv, expected_dv=dv if kind is Kind.PRAGMA else dv - 1)
        try:
            decision = decide(log.head, dv, kind)
            if decision.action is Action.SNAPSHOT:
                level = "info" if log.head is None else "unusual"   # a gap, or backwards
                self.emit(level, f"db_write {dv}: blocking snapshot ({decision.reason})")
                self.hook_blocking = True
                copy = await self._copy(hook, blocking=True, fill_later=True)
                anchor = secrets.token_bytes(32)
                base = snapshot_tip(copy.data_version, anchor)
                decision = decide(base, dv, kind)
                if decision.action is not Action.APPEND or decision.link is None:
                    copy.hook_done()
                    raise PluginError(
                        f"the database holds data_version {copy.data_version}, which change "
                        f"{dv} cannot follow ({decision.reason}); is the `database =` line of "
                        "the wrapper this node's database?")
                seq = log.reset(base)
                copy.anchor, copy.next_seq, copy.fresh = anchor, seq + 1, True
                self._rebuild_mirror(copy)
                self.copies.append(copy)
                hook.copy = copy
                for server in self.links:
                    if server.connected:
                        server.reserve(copy)
                self._wake_links()
            assert decision.link is not None
            entry = self._record(dv, kind, decision.link,
                                 self._seal(dv, kind, decision.link, writes,
                                            replaced_hash(log.head, decision)), writes)
            hook.anchor, hook.next_seq = entry.link, entry.seq
            self._wake_links()
            return await self._await_quorum(hook, entry.seq, deadline)
        finally:
            await self._hook_cleanup(hook)

    @staticmethod
    async def _hook_cleanup(hook: _Hook) -> None:
        """The call ends: let its copy finish (it must not outlive the call, nor its hold on
        the database) and let go."""
        for task in (hook.copy_task, hook.fill_task):
            if task is not None and not task.done():
                try:
                    await task
                except (CldcbError, OSError):
                    pass
        if hook.copy is not None:
            await asyncio.to_thread(hook.copy.let_go)   # the database goes before the answer
            hook.copy.hook_done()

    def _holders(self, seq: int) -> int:
        log = self.log
        assert log is not None
        n = 0
        for link in self.links:          # (a loop: this runs for every acknowledgement)
            pos = link.pos
            if pos is not None and pos >= seq and log.holds(pos):
                n += 1
        return n

    def _viable(self) -> int:
        """Servers that can hold this call's record without a new copy."""
        return sum(1 for link in self.links if not (link.connected and link.needs_copy))

    async def _await_quorum(self, hook: _Hook, seq: int, deadline: float) -> HookResult:
        while True:
            if hook.copy_task is not None and hook.copy_task.done():
                self._copy_done(hook)
            wanting = [link for link in self.links if link.connected and link.needs_copy]
            compacting = [link for link in self.links if link.compaction_due()]
            if (wanting or compacting) and not hook.copy_attempted and hook.copy is None:
                hook.copy_attempted = True
                hook.copy_blocking = self._viable() < self.quorum
                self.hook_blocking = hook.copy_blocking
                if not hook.copy_blocking and self._copy_from_mirror(hook):
                    continue
                hook.copy_task = asyncio.ensure_future(self._copy(hook, hook.copy_blocking))
                continue
            if hook.copy is not None and not hook.copy.fresh and compacting:
                for link in compacting:
                    if link.compaction_due():         # (compactions take turns)
                        link.start_compaction(hook.copy)
            if hook.copy_error is not None and self._viable() < self.quorum:
                return HookResult(False, hook.copy_error)
            fill = hook.fill_task
            filling = fill is not None and not fill.done()
            if fill is not None and not filling and (fill.cancelled() or fill.exception()):
                why = "cancelled" if fill.cancelled() else fill.exception()
                return HookResult(False, f"the copy of the database for the snapshot did not "
                                  f"finish: {why}")
            if hook.copy is not None and hook.copy.failed is not None:
                return HookResult(False, "the database could not be read for the snapshot: "
                                  f"{hook.copy.failed}")
            if self._viable() < self.quorum:
                self.hook_blocking = True
            if self._holders(seq) >= self.quorum and hook.copy_task is None and not filling:
                return CONTINUE
            now = time.monotonic()
            limit = max(deadline, self._progress_at + self.outage_limit)
            if now >= limit:
                return HookResult(False, self._outage_text(hook.data_version, "waiting"))
            await self._wait_change(min(limit - now, 1.0),
                                    hook.fill_task if filling else hook.copy_task)

    async def _copy(self, hook: _Hook, blocking: bool, fill_later: bool = False) -> LocalCopy:
        """A copy of the database; with ``fill_later`` it may still be filling (in
        ``hook.fill_task``) when it is returned."""
        started = time.monotonic()
        try:
            if fill_later:
                copy = await asyncio.to_thread(start_copy, self.db_path, self.workdir,
                                               busy_timeout=self.busy_timeout,
                                               keep=self._copy_outlives_call())
            else:
                copy = await asyncio.to_thread(copy_database, self.db_path, self.workdir,
                                               busy_timeout=self.busy_timeout)
        except DatabaseBusy as exc:
            what = "the blocking snapshot" if blocking else "a background snapshot"
            msg = f"cannot copy the database for {what}: {exc}"
            if blocking:
                raise DatabaseBusy(msg + "; lightningd must stop now: at its next start it "
                                   "commits a small batch first and the snapshot succeeds") \
                    from None
            self.emit("unusual", msg + "; trying again at a later call")
            raise
        if copy.filling is not None:
            hook.fill_task = asyncio.ensure_future(self._fill(copy, started))
        else:
            self._copied(copy, started, "")
        return copy

    def _copy_outlives_call(self) -> bool:
        """Whether a blocking snapshot needs a local copy (else it is read in place): for
        the mirror's rebuild, or for servers beyond the quorum that may still be
        uploading it when the call is answered."""
        return self.mirror is not None or self.quorum < len(self.links)

    async def _fill(self, copy: LocalCopy, started: float) -> None:
        if not copy.has_file:
            self.emit("debug", f"reading the database in place at data_version "
                               f"{copy.data_version} ({copy.size} bytes): no local copy")
            return
        await asyncio.to_thread(copy.fill)
        self._copied(copy, started, ", while it was uploaded")

    def _copied(self, copy: LocalCopy, started: float, how: str) -> None:
        self.emit("debug", f"copied the database at data_version {copy.data_version} "
                           f"({copy.size} bytes) in {time.monotonic() - started:.2f} s{how}")

    def _copy_done(self, hook: _Hook) -> None:
        task, hook.copy_task = hook.copy_task, None
        assert task is not None
        try:
            copy = task.result()
        except DatabaseBusy as exc:
            hook.copy_error = str(exc)
            return
        except (CldcbError, OSError) as exc:
            hook.copy_error = f"cannot copy the database: {exc}"
            self.emit("unusual", hook.copy_error)
            return
        if copy.data_version != hook.expected_dv:
            hook.copy_error = (f"the database copy holds data_version {copy.data_version}, "
                               f"not {hook.expected_dv} as the chain says; not using it")
            self.emit("unusual", hook.copy_error)
            copy.hook_done()
            return
        copy.anchor, copy.next_seq = hook.anchor, hook.next_seq
        hook.copy = copy
        self.copies.append(copy)
        if self.mirror is not None and not self.mirror.usable:
            self._rebuild_mirror(copy)
        for link in self.links:
            if link.connected and link.needs_copy:
                link.reserve(copy)
        self._wake_links()

    # -- the mirror (see cldcb.plugin.mirror) -------------------------------------------------
    def _rebuild_mirror(self, copy: LocalCopy) -> None:
        """Rebuild the mirror from ``copy`` (a copy of lightningd's database), which is
        kept until the mirror's thread has read it."""
        mirror, loop = self.mirror, self._loop
        if mirror is None or loop is None:
            return
        if copy.fresh:           # a blocking snapshot's copy: the mirror takes its file
            mirror.rebuild(copy.path, copy.data_version, copy.next_seq, lambda: None,
                           ready=copy.wait_ready, handover=copy.bequeath())
            return
        copy.acquire()
        mirror.rebuild(copy.path, copy.data_version, copy.next_seq,
                       lambda: loop.call_soon_threadsafe(copy.release), ready=copy.wait_ready)

    def _copy_from_mirror(self, hook: _Hook) -> bool:
        """Ask the mirror for the copy this call needs (state ``hook.expected_dv``); no
        call waits for it. False when the mirror cannot be asked (then the database is
        copied in this call, as without a mirror)."""
        mirror = self.mirror
        if mirror is None:
            return False
        if self._mirror_task is not None:
            return True                       # one is coming
        if not mirror.usable:
            self.emit("info", "the mirror is not usable: copying the database in this call")
            return False
        future = mirror.snapshot(hook.expected_dv, self.workdir)   # queued behind the change
        self._mirror_seq = hook.next_seq
        self._mirror_task = asyncio.get_running_loop().create_task(
            self._mirror_copy_done(asyncio.wrap_future(future), hook.anchor, hook.next_seq))
        return True

    async def _mirror_copy_done(self, future: asyncio.Future[LocalCopy], anchor: bytes,
                                next_seq: int) -> None:
        started = time.monotonic()
        try:
            copy = await future
        except CldcbError as exc:
            self.emit("unusual", f"no snapshot from the mirror ({exc}); trying again at a "
                                 "later call")
            return
        finally:
            self._mirror_task = None
            self._mirror_seq = None
            self.changed()
        self.emit("info", f"snapshot of the mirror at data_version {copy.data_version} "
                          f"({copy.size} bytes) held in {time.monotonic() - started:.2f} s; "
                          "no hook call waited for it")
        log = self.log
        copy.anchor, copy.next_seq = anchor, next_seq
        if self.closing or log is None or not log.holds(next_seq - 1):
            copy.hook_done()                  # too late: the log moved past it
            return
        self.copies.append(copy)
        for link in self.links:
            if link.connected and link.needs_copy:
                link.reserve(copy)
        for link in self.links:
            if link.compaction_due():
                link.start_compaction(copy)
        copy.hook_done()
        self._wake_links()
        self.changed()

    def _outage_text(self, dv: int, doing: str) -> str:
        parts = []
        for link in self.links:
            if link.connected:
                parts.append(f"{link.name}: {link.violation or link.state}")
            else:
                parts.append(f"{link.name}: {link.last_error or 'not connected'}")
        return (f"change {dv} is not held by {self.quorum} server(s) after "
                f"{self.outage_limit:g} s ({doing}; {'; '.join(parts)}): lightningd must stop "
                "so that it never commits a change the backup does not hold; bring the "
                "server(s) back and start lightningd again")

    # -- the head ----------------------------------------------------------------------------
    async def _ensure_log(self, dv: int, kind: Kind, deadline: float) -> bool:
        while self.log is None:
            known = [link for link in self.links if link.has_status]
            now = time.monotonic()
            if len(known) == len(self.links) or (
                    len(known) >= self.quorum and now - self._started >= self.startup_grace):
                self._choose_head(known, dv, kind)
                break
            if now >= deadline:
                return False
            await self._wait_change(min(deadline - now, 0.2))
        return True

    def _choose_head(self, known: list[ServerLink], dv: int, kind: Kind) -> None:
        tips: dict[bytes, Tip] = {}
        count: dict[bytes, int] = {}
        for link in known:
            if link.status_tip is not None:
                tips[link.status_tip.hash] = link.status_tip
                count[link.status_tip.hash] = count.get(link.status_tip.hash, 0) + 1
        head = None
        if tips:
            def score(h: bytes) -> tuple[bool, int, int]:
                t = tips[h]
                return (decide(t, dv, kind).action is not Action.SNAPSHOT, count[h],
                        t.data_version)
            head = tips[max(tips, key=score)]
        self.log = RecordLog(head)
        for link in self.links:
            link.place()
        held = f"data_version {head.data_version}" if head else "nothing"
        self.emit("info", f"backup holds {held} ({len(known)} of {len(self.links)} "
                          "server(s) answered)")
        self._wake_links()

    def _trim(self) -> None:
        log = self.log
        if log is None:
            return
        self.copies = [c for c in self.copies if c.alive]
        pins = [log.head_seq]
        for link in self.links:
            if link.connected and log.holds(link.pos):
                assert link.pos is not None
                pins.append(link.pos)
        for c in self.copies:
            if log.holds(c.next_seq - 1):
                pins.append(c.next_seq - 1)
        if self._mirror_seq is not None and log.holds(self._mirror_seq - 1):
            pins.append(self._mirror_seq - 1)
        log.trim(min(pins), self.log_limit)

    # -- status ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "running": not self.closing,
                "written_at": time.time(), "started_at": self.started_at,
                "data_version": self.acked_dv, "last_hook_data_version": self.last_hook_dv,
                "last_hook_result": self.last_hook_result, "quorum": self.quorum,
                "outage_limit": self.outage_limit,
                "servers": [link.describe() for link in self.links],
                "mirror": (self.mirror.describe() if self.mirror is not None
                           else {"state": "off"})}
