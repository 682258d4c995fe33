"""Serving one protocol session against the store, whatever carries the bytes.

The asyncssh daemon and ``cldcb-server stdio`` (under OpenSSH) both create a
:class:`SessionHandler` per session, feed it received bytes and give it a
:class:`Sink` to write to. Requests are answered strictly in order, each store
call runs in a worker thread (fsync blocks), and every store call of a client
runs under that client's lock:

- in-process, an :class:`asyncio.Lock` per client;
- across processes (several ``stdio`` sessions under sshd, or a daemon and
  sshd on one data directory), an ``flock`` on ``locks/<client_id>.lock``
  (:mod:`cldcb.store.locks`).

One writer per client: a writing session that authenticates bumps the
client's writer generation (in the lock file, under the lock) and closes the
older writer of this process with ``Error(SUPERSEDED)``; a writer of another
process notices the bumped generation at its next store call and is closed
the same way. Readers never take over. Each process keeps one
:class:`~cldcb.store.ClientStore` per client, which notices before each call
when another process changed the client's files and reloads them; a writer
whose generation and settings epoch are unchanged vouches that nobody did
(:meth:`~cldcb.store.ClientStore.vouch`), which spares those checks.

``AuthOk`` goes only once the client's store opened (and its writer took
over): store damage found at login (a damaged segment or ``settings.json``)
is logged at ERROR with the client id and answered with the store's own
message as ``Error(STORAGE)``, which the client's hello raises. A malformed
request (:class:`~cldcb.errors.BadRequest`, or any other client error) is
that client's error: answered with ``Error(BAD_REQUEST)`` and logged at
WARNING at most once per :data:`COMPLAINT_PERIOD` per client, so that no
client can flood the server's log.

An ``Ack`` is sent only after the store returned from ``append``, which
returns only once the record is fsynced; a ``SnapshotAck`` only after the
snapshot is visible. Each names what it answers (:mod:`cldcb.core.session`): the
store's ``Ack`` the record's data_version, kind and link, a ``ChunkAck`` the
chunk's snapshot id and index, a ``SnapshotAck`` the snapshot id and the
data_version its ``SnapshotBegin`` gave; the session puts in each one's MAC
(:mod:`cldcb.core.answermac`). A snapshot chunk's share of that MAC (hashing the whole
frame) is done in the worker thread that stores the chunk, not on the event loop.

Latency: a hop to a worker thread and back costs about 200 µs, as much as
the fsync itself. When the server is quiet (no store call in flight and no
other session made a request in the last :data:`QUIET_SECONDS`) a record
append or a status runs on the event loop thread instead; as soon as several
sessions are busy every store call goes to the worker threads
(:class:`~cldcb.server.workers.StorePool`), whose fsyncs the kernel runs in
parallel. Only a small record (:data:`HOT_PATH_BYTES`) runs on the hot path (on the event loop).
An idle session's append or status goes there straight from the
receiving callback and is answered from the pool's completion callback (no
task switch); requests that arrive meanwhile wait, in order, behind it.

Fairness: a session has at most one store call in a worker at a time (its requests are
answered in order, one after the other), so a heavy session's big appends queue behind
each other, not in front of other sessions' calls; and a session whose unanswered
requests reach :data:`BACKLOG` or :data:`BACKLOG_BYTES` stops being read until half
of them are answered (the SSH window then holds that client back, not the others).

A fetch is read from the store in batches of up to :data:`FETCH_BATCH_BYTES` sealed
bytes per worker call, each batch written to the transport in one piece, then drained
(the client's SSH window paces it); a store error met while reading a batch is raised
after the items read before it were sent.

A writer whose records come one after another keeps its client's ``flock``
from one record to the next (:class:`~cldcb.store.locks.Lease`), for 20 ms at
most and never across another store call of the session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cldcb.core import wire
from cldcb.core.session import Authenticated, Received, Role, ServerSession
from cldcb.core.wire import ErrorCode
from cldcb.errors import (
    BadRequest,
    CldcbError,
    QuotaExceeded,
    RecognitionKept,
    StoreError,
    Superseded,
)
from cldcb.server.workers import ClientLock, StorePool
from cldcb.store import (
    AppendResult,
    ClientStore,
    Deferred,
    Holding,
    SnapshotNeeded,
    Store,
    Stored,
)
from cldcb.store.frames import ChunkFrame, RecordFrame
from cldcb.store.locks import Lease, bump_generation, flocked, open_lock, read_counters

log = logging.getLogger("cldcb.server")

QUIET_SECONDS = 0.02
"""A call runs on the hot path (on the event loop) if no other session made a request
for this long."""
BACKLOG = 16
"""Requests of one session waiting to be served before its reading is paused: a client
that sends without waiting for answers is held back by the transport, so what the
server buffers for it stays bounded."""
BACKLOG_BYTES = 16 << 20
"""Sealed bytes of one session's unanswered requests (waiting or being stored) before its
reading is paused, whatever their number (16 records of 16 MiB would be 256 MiB): a client
streaming big records is held back by its own SSH window, not by the other sessions. Not
less than twice the daemon's SSH window (:data:`cldcb.transport.connection.SSH_WINDOW`): asyncssh
reopens the whole window as soon as one paused-for packet is delivered, whatever it still
holds undelivered, so each pause must last until a window's worth was answered, or what
it holds for the session grows with every pause."""
HOT_PATH_BYTES = 64 << 10
"""The largest record appended on the event loop thread; a bigger one always goes to a
worker, so that its write and fsync never hold up the other sessions' requests."""
FETCH_BATCH_BYTES = 1 << 20
"""Sealed bytes of fetched items read from the store in one worker call and sent in one
write (at least one item): a record is a few hundred bytes, and one call and one SSH packet
per record would cost far more than the record itself."""
_ZERO = bytes(32)
COMPLAINT_PERIOD = 60.0
"""A client's malformed requests are logged at most once per this many seconds."""


class Sink(Protocol):
    """Where a session's bytes go (an SSH channel, stdout)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None:
        """Stop delivering received bytes (the client then waits on the SSH window)."""

    def resume_reading(self) -> None: ...


def now_ms() -> int:
    return int(time.time() * 1000)


class ServerCore:
    """What all sessions of one server process share."""

    def __init__(self, data_dir: Path, server_priv: bytes, *, threads: int = 16) -> None:
        self.data_dir = data_dir
        self.server_priv = server_priv
        self.store = Store.open(data_dir)
        self.pool = StorePool(asyncio.get_running_loop(), threads)
        self._locks: dict[str, ClientLock] = {}
        self.writers: dict[str, SessionHandler] = {}
        self.handlers: set[SessionHandler] = set()
        self.stopping = False
        self.inflight = 0
        self._last_other: dict[int, float] = {}
        self._last: tuple[int, float] = (0, 0.0)
        self._complaints: dict[str | None, tuple[float, int]] = {}

    def complain(self, client_id: str | None, text: str) -> None:
        """Log a client's malformed request at WARNING, once per :data:`COMPLAINT_PERIOD`
        per client (the next line counts those left out)."""
        now = time.monotonic()
        last, left_out = self._complaints.get(client_id, (-COMPLAINT_PERIOD, 0))
        if now - last < COMPLAINT_PERIOD:
            self._complaints[client_id] = (last, left_out + 1)
            return
        more = f" ({left_out} more in the last {now - last:.0f} s)" if left_out else ""
        log.warning("client %s: bad request: %s%s", client_id, text, more)
        self._complaints[client_id] = (now, 0)

    def forget(self, session: object) -> None:
        self._last_other.pop(id(session), None)

    def quiet(self, session: object) -> bool:
        """Note a request of ``session``; whether it may run on the hot path (the event loop)."""
        now = time.monotonic()
        who, when = self._last
        if who != id(session):
            self._last_other[id(session)] = when  # the latest request by anyone else
        self._last = (id(session), now)
        return self.inflight == 0 and now - self._last_other.get(id(session), 0.0) > QUIET_SECONDS

    def lock(self, client_id: str) -> ClientLock:
        lk = self._locks.get(client_id)
        if lk is None:
            lk = self._locks[client_id] = ClientLock()
        return lk

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.pool.run(fn, *args)

    def is_registered(self, client_id: str) -> bool:
        return self.store.is_registered(client_id)

    def close(self) -> None:
        self.pool.close()
        self.store.close()


def _weight(msg: wire.Message) -> int:
    """What a request weighs against :data:`BACKLOG_BYTES`: its sealed bytes."""
    return len(getattr(msg, "sealed", b""))


def _store_call(msg: wire.Write | wire.StatusRequest) -> Callable[[Any], wire.Message]:
    """The store call answering a record append or a status request (in a worker), and
    its answer."""
    if isinstance(msg, wire.Write):
        t = now_ms()
        return lambda cs: _append_answer(cs.append(msg.data_version, msg.kind, msg.link,
                                                   msg.sealed, t))
    return lambda cs: _status_answer(cs.status())


def _append_answer(result: AppendResult) -> wire.Ack | wire.NeedSnapshot:
    """The answer to a ``Write`` the store took (``Ack``) or refused (``NeedSnapshot``)."""
    if type(result) is Stored:
        return wire.Ack(result.data_version, result.kind, result.link, result.want_snapshot)
    if type(result) is SnapshotNeeded:
        return wire.NeedSnapshot(result.data_version, result.reason)
    raise AssertionError(f"{result} is no answer: only a hot-path append defers")


def _status_answer(held: Holding) -> wire.Status:
    """The ``Status`` of what the store holds for the client: the tip's link is 32 zero
    bytes when the tip is a snapshot's anchor (see :mod:`cldcb.store`)."""
    t = held.tip
    return wire.Status(
        has_tip=t is not None, tip_data_version=t.data_version if t else 0,
        tip_kind=int(t.kind) if t else 0, tip_hash=t.hash if t else _ZERO,
        tip_link=t.link if t else _ZERO, tip_time=held.tip_time if t else 0,
        snapshot_data_version=held.snapshot_data_version, snapshot_time=held.snapshot_time,
        bytes_used=held.bytes_used, quota=held.quota or 0, append_only=held.append_only,
        want_snapshot=held.want_snapshot, generations=held.generations)


class SessionHandler:
    """Drives one :class:`ServerSession`: bytes in, store calls, bytes out."""

    def __init__(self, core: ServerCore, sink: Sink, *, forced_client_id: str | None = None,
                 allow_anonymous: bool = True, peer: str = "?") -> None:
        self.core = core
        self.sink = sink
        self.peer = peer
        self.session = ServerSession(core.server_priv, os.urandom(32),
                                     is_registered=core.is_registered,
                                     forced_client_id=forced_client_id,
                                     allow_anonymous=allow_anonymous, confirm_auth=True,
                                     hash_lock=threading.Lock())   # absorb runs in a thread
        self._queue: asyncio.Queue[Authenticated | Received | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._gen = 0
        self._upload: Any = None
        self._upload_id = -1
        self._upload_dv = -1
        self._lock_fd: int | None = None
        self._lease: Lease | None = None
        self._lease_timer: asyncio.TimerHandle | None = None
        self._idle = False
        self._held: list[wire.Message] | None = None    # behind a call in a worker
        self._paused = False
        self._in_worker: asyncio.Future[None] | None = None
        self._in_worker_bytes = 0
        self._unanswered = 0        # sealed bytes of requests received, not yet answered
        self.client_id: str | None = None
        self.role = Role.READER
        self.done = asyncio.Event()

    # -- feeding ---------------------------------------------------------------------
    def start(self) -> None:
        self.core.handlers.add(self)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        write = self.session.write_in(data)           # nearly every request of a writer
        if write is not None:
            self._unanswered += len(write.sealed)
            if not self._answer_on_hot_path(write):
                self._queue.put_nowait(Received(write))
                self._backlog_check()
            elif self._held is not None or self._paused:
                self._backlog_check()
            return
        events = self.session.receive_data(data)
        self._flush()
        for ev in events:
            if isinstance(ev, Received):
                self._unanswered += _weight(ev.message)
                if self._answer_on_hot_path(ev.message):
                    continue
            self._queue.put_nowait(ev)
        if self.session.closed:
            self._queue.put_nowait(None)
        self._backlog_check()

    def _backlog_check(self) -> None:
        waiting = self._queue.qsize() + len(self._held or ())
        if not self._paused and (waiting >= BACKLOG or self._unanswered >= BACKLOG_BYTES):
            self._paused = True
            self.sink.pause_reading()
        elif self._paused and waiting <= BACKLOG // 2 \
                and self._unanswered <= BACKLOG_BYTES // 2:
            self._paused = False
            self.sink.resume_reading()

    def _answer_on_hot_path(self, msg: wire.Message) -> bool:
        """Answer a record append or a status without the serving task; True if taken.

        Only when this session is idle (no queued or running request, so order is
        kept) and the client's lock is free. When the server is quiet (see
        :meth:`ServerCore.quiet`) the store call runs right here: it costs less than
        any hop. Otherwise it goes to a worker thread and is answered from the
        pool's callback; requests arriving meanwhile are held behind it.
        """
        if self._held is not None:
            self._held.append(msg)
            return True
        core = self.core
        if not isinstance(msg, (wire.Write, wire.StatusRequest)) or self.client_id is None \
                or not self._idle or not self._queue.empty() or core.stopping:
            return False
        lock = core.lock(self.client_id)
        if not lock.try_acquire():
            self._release_lease()        # the other session of this client may wait for it
            return False
        if core.quiet(self) and _weight(msg) <= HOT_PATH_BYTES:
            try:
                taken = self._hot_path(msg)
            except Exception as exc:  # noqa: BLE001 - answered like every request
                self._answer_error(exc)
                taken = True
            lock.release()
            if not taken:
                return False  # the lock is another process's, or the log must grow: queue it
            self._unanswered -= _weight(msg)
            self._answered()
            return True
        core.inflight += 1
        self._held = []
        self._in_worker_bytes = _weight(msg)
        self._in_worker = asyncio.get_running_loop().create_future()
        core.pool.submit(self._locked(_store_call(msg)), self._worker_done)
        return True

    def _worker_done(self, ok: bool, value: Any) -> None:
        assert self.client_id and self._held is not None and self._in_worker is not None
        self.core.inflight -= 1
        self.core.lock(self.client_id).release()
        self._unanswered -= self._in_worker_bytes
        if ok:
            self.session.send(value)
        else:
            self._answer_error(value)
        held, self._held = self._held, None
        self._in_worker.set_result(None)
        self._in_worker = None
        self._answered()
        for msg in held:
            if self.session.closed:
                break
            if not self._answer_on_hot_path(msg):
                self._queue.put_nowait(Received(msg))
        if self._paused:
            self._backlog_check()

    def _answered(self) -> None:
        self._flush()
        if self.session.closed:
            self._queue.put_nowait(None)

    def _answer_error(self, exc: BaseException) -> None:
        """The ``Error`` (or the end of the session) a failed request is answered with."""
        if isinstance(exc, Superseded):
            self.session.refuse(ErrorCode.SUPERSEDED,
                                "a newer session of this client took over as writer")
        elif isinstance(exc, QuotaExceeded):
            self.session.send(wire.Error(int(ErrorCode.QUOTA), str(exc)))
        elif isinstance(exc, RecognitionKept):
            self.session.send(wire.Error(int(ErrorCode.KEPT), str(exc)))
        elif isinstance(exc, BadRequest) or (isinstance(exc, CldcbError)
                                             and not isinstance(exc, StoreError)):
            self.core.complain(self.client_id, str(exc))
            self.session.send(wire.Error(int(ErrorCode.BAD_REQUEST), str(exc)))
        elif isinstance(exc, StoreError):
            log.error("client %s: store error: %s", self.client_id, exc)
            self.session.send(wire.Error(int(ErrorCode.STORAGE), str(exc)))
        else:
            log.error("client %s: internal error", self.client_id, exc_info=exc)
            self.session.send(wire.Error(int(ErrorCode.INTERNAL),
                                         "internal server error; see the server's log"))

    def connection_lost(self) -> None:
        self.session.closed = True
        self._queue.put_nowait(None)

    def _flush(self) -> None:
        out = self.session.data_to_send()
        if out:
            self.sink.write(out)

    # -- serving ---------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while True:
                self._idle = True
                item = await self._queue.get()
                self._idle = False
                if self._paused:
                    self._backlog_check()
                if item is None or self.session.closed:
                    break
                if isinstance(item, Authenticated):
                    await self._on_auth(item)
                else:
                    try:
                        await self._handle(item.message)
                    except Exception as exc:  # noqa: BLE001 - every failure gets an answer
                        self._answer_error(exc)
                    self._unanswered -= _weight(item.message)
                    if self._paused:
                        self._backlog_check()
                self._flush()
                await self.sink.drain()
                if self.session.closed:
                    break
        finally:
            self._flush()
            await self._cleanup()

    async def _cleanup(self) -> None:
        if self._in_worker is not None:      # its worker still uses the lock file
            await asyncio.shield(self._in_worker)
        await self._abort_upload()
        self.core.forget(self)
        self._release_lease()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.client_id and self.core.writers.get(self.client_id) is self:
            del self.core.writers[self.client_id]
        self.core.handlers.discard(self)
        self.sink.close()
        self.done.set()

    async def _on_auth(self, ev: Authenticated) -> None:
        """Open the client's store (a writer takes over), then ``AuthOk``; what fails is
        answered (the store's message) and ends the session."""
        self.client_id, self.role = ev.client_id, ev.role
        log.info("session from %s: %s %s", self.peer, ev.client_id or "anonymous",
                 ev.role.name.lower())
        if ev.client_id is not None:
            try:
                await self._open_client(ev.client_id, ev.role)
            except Exception as exc:  # noqa: BLE001 - answered, and the session ends
                self._answer_error(exc)
                self.session.closed = True
                return
        self.session.accept()

    async def _open_client(self, client_id: str, role: Role) -> None:
        if role == Role.WRITER:
            old = self.core.writers.get(client_id)
            self.core.writers[client_id] = self
            if old is not None and old is not self:
                old.supersede()
            async with self.core.lock(client_id):
                self._gen = await self.core.run(self._take_over)
        async with self.core.lock(client_id):
            await self.core.run(self._touch)

    def supersede(self) -> None:
        """Close this (older) writer: a newer session of its client took over."""
        self.session.refuse(ErrorCode.SUPERSEDED,
                            "a newer session of this client took over as writer")
        self._flush()
        self._release_lease()            # the newer writer takes the lock to take over
        self.connection_lost()

    def _lock_file(self) -> int:
        """The client's lock file, opened once per session (calls never overlap)."""
        if self._lock_fd is None:
            assert self.client_id
            self._lock_fd = open_lock(self.core.store.data_dir, self.client_id)
        return self._lock_fd

    def _take_over(self) -> int:
        with flocked(self._lock_file()) as fd:
            return bump_generation(fd)

    def _touch(self) -> None:
        with flocked(self._lock_file()):
            self.core.store.client(self.client_id).touch(now_ms())

    def _locked(self, fn: Callable[[Any], Any]) -> Callable[[], Any]:
        """``fn(client_store)`` under the cross-process lock, as a call to make later (in a
        worker thread, which waits for a lock another process holds)."""
        self._release_lease()
        lock_fd = self._lock_file()

        def call() -> Any:
            with flocked(lock_fd) as fd:
                return fn(self._store_under(read_counters(fd)))
        return call

    def _store_under(self, counters: tuple[int, int]) -> ClientStore:
        """The client's store, under its lock whose ``counters`` were just read: a writer
        that was taken over raises Superseded; one that was not vouches for the call
        (see :mod:`cldcb.store.locks`)."""
        cs = self.core.store.client(self.client_id)
        if self.role == Role.WRITER:
            if counters[0] != self._gen:
                raise Superseded()
            cs.vouch(counters)
        return cs

    def _hot_path(self, msg: wire.Write | wire.StatusRequest) -> bool:
        """Answer a record append or a status right here, on the event loop, under the
        lock taken without waiting; True if answered. False, nothing done, if another
        process holds the lock or the log must grow first (the store's
        :data:`~cldcb.store.Deferred`). The answer leaves before the lock is let
        go (this is the path every change of a streaming writer takes), and the lock is
        kept for the next record while they come one after another (a
        :class:`~cldcb.store.locks.Lease`, let go by :meth:`_lease_check`)."""
        if self._lease is None:
            self._lease = Lease(self._lock_file())
        lease = self._lease
        counters = lease.hold(time.monotonic())
        if counters is None:
            return False
        try:
            cs = self._store_under(counters)
            if type(msg) is wire.Write:
                result = cs.append(msg.data_version, msg.kind, msg.link, msg.sealed, now_ms(),
                                   hot_path=True)
                if type(result) is Stored:
                    self.sink.write(self.session.ack(result.data_version, result.kind,
                                                     result.link, result.want_snapshot))
                elif result is Deferred.LOG_MUST_GROW:
                    lease.release()
                    return False
                else:
                    self.session.send(_append_answer(result))
                    self._flush()
            else:
                self.session.send(_status_answer(cs.status()))
                self._flush()
        except BaseException:
            lease.release()
            raise
        if self._lease_timer is None:
            self._lease_timer = asyncio.get_running_loop().call_later(Lease.HOLD,
                                                                      self._lease_check)
        return True

    def _lease_check(self) -> None:
        """Let the kept lock go once it is due (:meth:`Lease.due`), else look again then."""
        self._lease_timer = None
        lease = self._lease
        if lease is None:
            return
        wait = lease.due(time.monotonic())
        if wait <= 0:
            lease.release()
        else:
            self._lease_timer = asyncio.get_running_loop().call_later(wait, self._lease_check)

    def _release_lease(self) -> None:
        """Let the kept lock go now: before any other use of the lock file."""
        if self._lease is not None:
            self._lease.release()

    async def _store(self, fn: Callable[[Any], Any], *,
                     hot: wire.Write | wire.StatusRequest | None = None) -> Any:
        """``fn(client_store)`` under the client's locks. ``hot``: the request ``fn``
        answers; if the server is quiet it is answered by :meth:`_hot_path` instead, and
        None is returned (unless it could not take it: ``fn`` then)."""
        assert self.client_id
        core = self.core
        async with core.lock(self.client_id):
            if hot is not None and core.quiet(self) and _weight(hot) <= HOT_PATH_BYTES \
                    and self._hot_path(hot):
                return None  # (else another process holds the lock, or the log must grow)
            core.inflight += 1
            try:
                return await core.run(self._locked(fn))
            finally:
                core.inflight -= 1

    async def _handle(self, msg: wire.Message) -> None:
        s = self.session
        if self.core.stopping and isinstance(msg, (wire.Write, wire.SnapshotBegin,
                                                   wire.SnapshotChunk, wire.SnapshotEnd)):
            s.refuse(ErrorCode.SHUTTING_DOWN, "the server is stopping; reconnect shortly")
            return
        if isinstance(msg, wire.ListRecognitions):
            entries, next_after = await self.core.run(
                self.core.store.recognition_page, msg.after,
                min(msg.max_count, wire.RECOGNITION_PAGE))
            s.send(wire.Recognitions(entries, next_after))
        elif isinstance(msg, wire.PutRecognition):
            assert self.client_id
            await self.core.run(self.core.store.put_recognition, self.client_id, msg.entry)
            s.send(wire.Ok())
        elif isinstance(msg, (wire.StatusRequest, wire.Write)):
            answer = await self._store(_store_call(msg), hot=msg)
            if answer is not None:                      # (else the hot path answered it)
                s.send(answer)
        elif isinstance(msg, wire.SnapshotBegin):
            await self._abort_upload()
            t = now_ms()
            self._upload = await self._store(
                lambda cs: cs.begin_snapshot(msg.data_version, msg.anchor, t))
            self._upload_id, self._upload_dv = msg.snapshot_id, msg.data_version
            s.send(wire.Ok())
        elif isinstance(msg, wire.SnapshotChunk):
            up = self._current_upload(msg.snapshot_id)

            def add(cs: ClientStore) -> None:
                s.absorb()            # the answer MAC's hashing of the chunk, off the loop
                up.add_chunk(msg.index, msg.sealed)
            await self._store(add)
            s.send(wire.ChunkAck(msg.snapshot_id, msg.index))
        elif isinstance(msg, wire.SnapshotEnd):
            up = self._current_upload(msg.snapshot_id)
            t = now_ms()
            await self._store(lambda cs: up.commit(msg.chunk_count, msg.manifest, t))
            self._upload = None
            s.send(wire.SnapshotAck(msg.snapshot_id, self._upload_dv))
        elif isinstance(msg, wire.Fetch):
            await self._fetch(msg.at_data_version)
        elif isinstance(msg, wire.FetchGeneration):
            await self._fetch(-1, msg.generation)
        elif isinstance(msg, wire.ListStates):
            states = await self._store(lambda cs: cs.states())
            s.send(wire.States([st.encode() for st in states]))
        else:
            s.send(wire.Error(int(ErrorCode.BAD_REQUEST), f"unexpected {type(msg).__name__}"))

    def _current_upload(self, snapshot_id: int) -> Any:
        if self._upload is None or snapshot_id != self._upload_id:
            raise BadRequest(f"no snapshot upload {snapshot_id} in progress; "
                             "send SnapshotBegin first")
        return self._upload

    async def _abort_upload(self) -> None:
        if self._upload is not None:
            up, self._upload = self._upload, None
            await self.core.run(up.abort)

    async def _fetch(self, at: int, generation: int | None = None) -> None:
        plan = await self._store(lambda cs: cs.fetch(at, generation=generation))
        s = self.session
        if plan is None:
            s.send(wire.Error(int(ErrorCode.NOT_FOUND), "this server holds no complete "
                              "snapshot for this client" + ("" if generation is None else
                                                            f" numbered {generation}")))
            return
        try:
            snap = plan.snapshot
            s.send(wire.FetchSnapshot(snap.data_version, snap.anchor, snap.chunk_count,
                                      snap.manifest, snap.time_ms))
            count = 0
            for records, source in ((False, plan.chunks()), (True, plan.records())):
                while True:
                    items, failed = await self._store(lambda _cs, src=source: _take(src))
                    if self.session.closed:
                        return
                    if records:
                        for r in items:
                            s.send(wire.FetchRecord(r.data_version, r.kind, r.link, r.sealed,
                                                    r.time_ms))
                        count += len(items)
                    else:
                        for c in items:
                            s.send(wire.FetchChunk(c.index, c.sealed))
                    self._flush()
                    if failed is not None:
                        raise failed    # after the items read before it, as one by one
                    if not items:
                        break
                    del items
                    await self.sink.drain()
            s.send(wire.FetchEnd(count))
        finally:
            await self._store(lambda _cs: plan.close())


_Item = TypeVar("_Item", ChunkFrame, RecordFrame)


def _take(items: Iterator[_Item], limit: int = FETCH_BATCH_BYTES
          ) -> tuple[list[_Item], Exception | None]:
    """The next items of a fetch, up to ``limit`` sealed bytes (at least one item; none
    at the end), and the error that stopped reading them, if one did."""
    out: list[_Item] = []
    size = 0
    try:
        for item in items:
            out.append(item)
            size += len(item.sealed)
            if size >= limit:
                break
    except Exception as exc:  # noqa: BLE001 - raised by the caller once `out` is sent
        return out, exc
    return out, None
