"""The hot path: a ``db_write`` call answered from callbacks, without a task switch.

When every server is in step and idle and nothing else is due (no copy wanted,
no compaction due), :meth:`HotPath.db_write_now` handles the call from the caller
(the plugin's stdin callback): the change is sealed once and sent to every server
(:meth:`~cldcb.plugin.links.ServerLink.send_now`), appended to the record log while
the servers store it, and the call is answered from the connections' receiving
callbacks once ``quorum`` servers acknowledged it (:meth:`HotPath.hot_quorum_check`,
run on every change a link reports).

Anything unusual hands the call to the general path (:meth:`HotPath.hot_trouble`):
a write that fails, ``NeedSnapshot``, a violation, a dropped connection (the links
say so), or no quorum within :data:`HOT_PATIENCE` seconds (one timer serves call
after call). The general path (:mod:`cldcb.plugin.engine`) then waits, reconnects,
copies and enforces the outage limit from the call's start; both paths make the
same records and the same answers.

:class:`HotPath` is the engine's base class: it owns the hot call's state and asks
of the engine only what its abstract members name (the record log, the links, the
sealing and recording of a change, who holds a position, and the general path).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cldcb.core.dataversion import (
    Action,
    DataVersionError,
    Kind,
    classify,
    decide,
    next_link,
)
from cldcb.core.seal import ZERO_HASH, replaced_hash
from cldcb.errors import SealError
from cldcb.plugin.links import ServerLink
from cldcb.plugin.recordlog import Entry, RecordLog

HOT_PATIENCE = 1.0
"""A hot-path call without quorum after this many seconds goes to the general path."""


@dataclass(frozen=True)
class HookResult:
    ok: bool
    message: str = ""


CONTINUE = HookResult(True)
"""The usual answer (one instance, as HookResult is frozen)."""


@dataclass
class HotCall:
    """The call on the hot path (at most one at a time)."""

    data_version: int
    kind: Kind
    seq: int
    link: bytes
    started: float
    done: Callable[[HookResult], None]
    handed_over: bool = False
    finished: asyncio.Future[HookResult] | None = None    # made for whoever waits


class HotPath:
    """See the module docstring. The engine fills in the abstract members."""

    log: RecordLog | None
    links: Sequence[ServerLink]
    quorum: int
    closing: bool
    last_hook_dv: int | None

    def __init__(self) -> None:
        self._hot: HotCall | None = None
        self._patience: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hand_over_task: asyncio.Task[None] | None = None

    # -- what the hot path asks of the engine --------------------------------------------
    @property
    def busy(self) -> bool:
        """A call is in progress (on either path)."""
        raise NotImplementedError

    def _seal(self, dv: int, kind: Kind, link: bytes, writes: list[str],
              replaces: bytes) -> bytes:
        """The change sealed once (the same bytes go to every server); SealError if a
        statement is not text."""
        raise NotImplementedError

    def _record(self, dv: int, kind: Kind, link: bytes, sealed: bytes,
                writes: list[str]) -> Entry:
        """Append the sealed change to the record log (and hand it to the mirror)."""
        raise NotImplementedError

    def _holders(self, seq: int) -> int:
        """How many servers hold log position ``seq``."""
        raise NotImplementedError

    async def _general(self, hot: HotCall) -> HookResult:
        """The general path's answer to a call handed over from the hot path."""
        raise NotImplementedError

    def _ended(self, data_version: int, result: HookResult) -> None:
        """A call ended (either path): note the result."""
        raise NotImplementedError

    # -- the hot path ------------------------------------------------------------------
    def db_write_now(self, data_version: int, writes: list[str],
                     done: Callable[[HookResult], None]) -> bool:
        """Start a call on the hot path; ``done`` gets its result (later, from a callback).

        Returns False, having done nothing, when the call needs the general path
        (the engine's ``db_write``): a call in progress, a server not in step or not
        idle, a snapshot or compaction due, a change the chain cannot simply take."""
        log, loop = self.log, self._loop
        if log is None or loop is None or self.busy or self.closing:
            return False
        if not all(link.streaming() for link in self.links):
            return False
        kind = classify(writes)
        link = next_link(log.head, data_version, kind)     # the usual case: the next change
        replaces = ZERO_HASH
        if link is None:
            try:
                decision = decide(log.head, data_version, kind)
            except DataVersionError:
                return False
            link = decision.link
            if decision.action is Action.SNAPSHOT or link is None:
                return False
            replaces = replaced_hash(log.head, decision)
        started = time.monotonic()
        try:
            sealed = self._seal(data_version, kind, link, writes, replaces)
        except SealError:
            return False                      # the general path answers the malformed call
        seq = log.next_seq
        # The sends come first: the servers start on the change at once, and the
        # bookkeeping below runs while they store it (no callback of theirs can run
        # before this method returns to the event loop).
        sent = all([server.send_now(seq, data_version, kind, link, sealed)
                    for server in self.links])
        self._record(data_version, kind, link, sealed, writes)
        self.last_hook_dv = data_version
        hot = HotCall(data_version, kind, seq, link, started, done)
        self._hot = hot
        if self._patience is None:
            self._patience = loop.call_later(HOT_PATIENCE, self._patience_check)
        if not sent:
            self.hot_trouble()
        return True

    def hot_quorum_check(self) -> None:
        """Answer the hot call if ``quorum`` servers hold it now (run on every change)."""
        hot = self._hot
        if hot is not None and not hot.handed_over and self._holders(hot.seq) >= self.quorum:
            self._hot_end(hot, CONTINUE)

    def _patience_check(self) -> None:
        """A hot-path call without quorum after :data:`HOT_PATIENCE` goes to the general
        path. One timer serves call after call (re-armed for the current call's remaining
        time), rather than a timer made and cancelled per call."""
        self._patience = None
        hot = self._hot
        if hot is None or hot.handed_over:
            return
        left = hot.started + HOT_PATIENCE - time.monotonic()
        if left <= 0:
            self.hot_trouble()
        else:
            self._patience = asyncio.get_running_loop().call_later(left, self._patience_check)

    def hot_trouble(self) -> None:
        """The hot-path call cannot end by itself: hand it to the general path."""
        hot = self._hot
        if hot is None or hot.handed_over:
            return
        hot.handed_over = True
        self._hand_over_task = asyncio.get_running_loop().create_task(self._hand_over(hot))

    async def _hand_over(self, hot: HotCall) -> None:
        self._hot_end(hot, await self._general(hot))

    def _hot_end(self, hot: HotCall, result: HookResult) -> None:
        self._hot = None
        hot.done(result)             # answer lightningd first; the bookkeeping can wait
        self._ended(hot.data_version, result)
        if hot.finished is not None:
            hot.finished.set_result(result)

    async def hot_finished(self) -> None:
        """Wait until the hot call in progress (if any) ended."""
        hot = self._hot
        if hot is not None:
            if hot.finished is None:
                hot.finished = asyncio.get_running_loop().create_future()
            await asyncio.shield(hot.finished)

    def stop_patience(self) -> None:
        if self._patience is not None:
            self._patience.cancel()
            self._patience = None
