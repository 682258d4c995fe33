"""Worker threads for store calls, and the per-client lock of one server process.

Store calls block (fsync), so they run in worker threads. :class:`StorePool`
hands results back to the event loop in batches: a worker that finishes a
call queues the result and wakes the loop only if no wake-up is already
pending, so under load one wake-up delivers many answers (an executor future
per call costs a wake-up, two futures and a condition variable each).

:class:`ClientLock` is an asyncio lock that can also be taken without
awaiting (:meth:`ClientLock.try_acquire`), for the callback paths of the
session handler.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

Done = Callable[[bool, Any], None]
"""Called on the loop with ``(True, result)`` or ``(False, exception)``."""


class StorePool:
    """``threads`` worker threads; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Done] | None] = \
            queue.SimpleQueue()
        self._done: deque[tuple[Done, bool, Any]] = deque()
        self._wake_pending = False
        self._threads = [threading.Thread(target=self._work, name=f"store-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], Any], done: Done) -> None:
        """Run ``fn()`` in a worker; ``done`` gets its outcome on the loop, later."""
        self._jobs.put((fn, done))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker, awaited."""
        fut = self._loop.create_future()

        def done(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        self.submit(lambda: fn(*args), done)
        return await fut

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, done = job
            try:
                outcome: tuple[Done, bool, Any] = (done, True, fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome = (done, False, exc)
            self._done.append(outcome)
            del job, fn, done, outcome      # an idle worker holds no request's bytes
            # Appended before the flag is read, and _deliver clears the flag before
            # it drains: a result is never left behind without a wake-up on its way.
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:   # the loop is closed: nobody waits any more
                    return

    def _deliver(self) -> None:
        self._wake_pending = False
        while self._done:
            done, ok, value = self._done.popleft()
            done(ok, value)

    def close(self) -> None:
        """Let queued calls finish, then stop the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


class ClientLock:
    """An asyncio lock (``async with``) that the loop can also take synchronously."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        if self._held or self._waiters:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut                      # release() hands the lock over: _held stays
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()             # handed over, but we are gone: pass it on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)       # the lock goes straight to this waiter
                return
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
