"""Fetch a client's backup from one server, verify all of it, rebuild the database.

The shared core of ``cldcb-client recover`` and ``cldcb-client verify``
(DESIGN sections 4 and 6). Given a :class:`~cldcb.transport.connection.Connection` (a
READER session of the client) and the node key, :func:`rebuild`:

1. sends ``Fetch`` (the newest state, or the state at one data_version);
2. opens the snapshot's sealed manifest (:class:`~cldcb.core.seal.SnapshotOpener`),
   then each chunk in order; the plaintext is written to the output file by
   the rebuild's worker thread (a :class:`Pipeline`) while the next chunks are
   received and opened; ``finish`` checks the chunk count and total size the
   manifest names; from then on a thread of its own writes the snapshot's
   pages to disk (an fsync of the file) while the records are replayed;
3. checks that the snapshot is the state its manifest names
   (``vars.data_version``);
4. opens every record with :class:`~cldcb.core.seal.ChainVerifier` (its AEAD tag,
   its place in the chain: link to its effective predecessor, starting from
   the snapshot's anchor) on the event loop, and hands the verified changes,
   in batches of :data:`REPLAY_BATCH`, to the worker thread, which passes
   them to a :class:`~cldcb.node.replay_process.ReplayProcess` (``isolated``,
   the default: a child process started at the beginning of the download, so
   that the replay and the verification each have a core and an interpreter
   lock) or applies them itself (``isolated=False``), with
   :class:`~cldcb.node.replay.Replayer` in its fast mode (``durable=False``:
   large transactions, one fsync in ``finish``). So receiving, verifying and
   replaying overlap; nothing unverified is ever applied, and the first
   failure stops the rest;
5. checks the ``FetchEnd`` count, runs ``PRAGMA integrity_check`` and checks
   that ``vars.data_version`` equals the newest record's.

Memory is bounded whatever the backup's size: at most
:data:`PIPELINE_DEPTH` jobs wait for the worker thread, and while they do the
connection stops reading once :data:`~cldcb.transport.connection.FETCH_QUEUE_BYTES`
were received and not taken (the server then waits on the SSH window).
``Progress.replay`` is called from the worker thread.

Any failure raises (a :class:`~cldcb.errors.ChainError` names the record:
its position in the fetched stream, counted from 0, and its data_version)
and removes the output file. The output file is scratch until
:func:`install` moves it into place: :func:`temp_path` makes it in the
destination's folder, :func:`install` hard-links it to the destination,
which fails if the destination exists (an existing database is never
replaced, not even by a race), then removes the temporary name and fsyncs
the folder.

``at`` (verify): the server sends the newest complete snapshot at or before
``at`` and the records up to ``at``; records past ``at`` are ignored, and the
result must be exactly at ``at``.

After a failed :func:`rebuild` the connection may still be mid-fetch: close
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import sqlite3
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cldcb.core import wire
from cldcb.core.dataversion import Kind, Tip
from cldcb.core.seal import ChainVerifier, Change, EcdhKey, SnapshotOpener
from cldcb.errors import ChainError, RecoveryError, ReplayError, SealError
from cldcb.node.durable import fsync_dir
from cldcb.node.nodedb import connect_ro, read_data_version
from cldcb.node.replay import Replayer
from cldcb.node.replay_process import ReplayProcess

_SIDE_FILES = ("-journal", "-wal", "-shm")
PIPELINE_DEPTH = 8
"""Jobs (a chunk to write, a batch of records to replay) queued for the rebuild's thread."""
SWITCH_INTERVAL = 0.0005
"""The interpreter's thread switch interval while a rebuild runs (Python's default is
5 ms): the worker thread lets go of the GIL in every SQLite call and must get it back
after each, while the event loop's thread verifies records without waiting on anything;
at 5 ms per hand-over the replay would crawl."""
REPLAY_BATCH = 256
"""Verified records handed to the rebuild's thread in one job."""
_counter = itertools.count()


class Fetcher(Protocol):
    """What :func:`rebuild` needs of a connection
    (:class:`~cldcb.transport.connection.Connection`)."""

    def fetch(self, at_data_version: int = -1, *,
              generation: int | None = None) -> AsyncIterator[wire.Message]: ...


@dataclass
class Progress:
    """Progress callbacks, each optional.

    ``download(done, total)``: plaintext snapshot bytes opened so far, and the
    snapshot's size; ``replay(records)``: records verified and applied so far (called
    from the rebuild's worker thread).
    """

    download: Callable[[int, int], None] | None = None
    replay: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Rebuilt:
    """A database rebuilt and verified from one server's backup (still at ``path``)."""

    source: str
    path: Path
    data_version: int
    snapshot_data_version: int
    snapshot_time_ms: int
    newest_time_ms: int
    """When the plugin saw the newest record (the snapshot's time when there is none)."""
    records: int
    snapshot_bytes: int
    received_bytes: int
    """Sealed bytes received (chunks, manifest and records)."""
    tip: Tip | None = None
    """Where the verified chain ends (the newest record, or the snapshot's anchor)."""
    replaced: frozenset[bytes] = frozenset()
    """Hashes of the uncommitted batches the chain replaced (see
    :attr:`cldcb.core.seal.ChainVerifier.replaced`)."""


def temp_path(dest: Path, tag: str = "") -> Path:
    """A fresh scratch name beside ``dest`` (same folder, so :func:`install` can link it)."""
    suffix = f"-{tag}" if tag else ""
    return dest.with_name(f".{dest.name}.cldcb-{os.getpid()}-{next(_counter)}{suffix}.tmp")


def remove_stale_scratch(dest: Path) -> list[Path]:
    """Remove the scratch files of earlier runs that were killed (their pid is gone)."""
    removed = []
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.cldcb-*"):
        pid = p.name[len(dest.name) + 8:].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discard(path: Path) -> None:
    """Remove a scratch database and any side file SQLite may have left beside it."""
    for name in ("", *_SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{name}")


def refuse_existing(dest: Path) -> None:
    """Raise RecoveryError if ``dest`` (or a journal of it) exists."""
    for name in ("", *_SIDE_FILES):
        if os.path.lexists(f"{dest}{name}"):
            raise RecoveryError(
                f"{dest}{name} already exists; it was left alone (recovery never "
                "overwrites a database). If this node's database is really lost, move "
                "the old files out of the way and run recover again")


def install(tmp: Path, dest: Path) -> None:
    """Move the verified database ``tmp`` to ``dest``; never replaces an existing file."""
    refuse_existing(dest)
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise RecoveryError(f"{dest} appeared while recovering; it was left alone and the "
                            "recovered database was not written") from None
    except OSError as exc:
        raise RecoveryError(f"cannot write {dest}: {exc.strerror or exc}; check the "
                            "folder's permissions and free space") from None
    os.unlink(tmp)
    fsync_dir(dest.parent)


def _create(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    folder = path.parent.stat()
    if os.geteuid() == 0 and (folder.st_uid, folder.st_gid) != (0, 0):
        # Recovery run as root for a node run by another user: the node must own it.
        os.fchown(fd, folder.st_uid, folder.st_gid)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def check_database(path: Path, data_version: int) -> None:
    """``PRAGMA integrity_check`` says ok and ``vars.data_version`` is ``data_version``."""
    try:
        con = connect_ro(path)
    except sqlite3.Error as exc:
        raise ReplayError(f"cannot open the rebuilt database: {exc}") from None
    try:
        rows = [r[0] for r in con.execute("PRAGMA integrity_check")]
        if rows != ["ok"]:
            shown = "; ".join(str(r) for r in rows[:3])
            raise ReplayError(f"the rebuilt database fails PRAGMA integrity_check ({shown}"
                              f"{'; …' if len(rows) > 3 else ''})")
        held = read_data_version(con)
    except sqlite3.Error as exc:
        raise ReplayError(f"cannot check the rebuilt database: {exc}") from None
    finally:
        con.close()
    if held != data_version:
        raise ReplayError(f"the rebuilt database is at data_version {held}, not at "
                          f"{data_version}, the newest record's")


async def rebuild(conn: Fetcher, node: EcdhKey, client_pub: bytes, path: Path, *,
                  at: int = -1, generation: int | None = None, source: str = "",
                  progress: Progress | None = None, isolated: bool = True) -> Rebuilt:
    """Fetch from ``conn`` and rebuild into the new file ``path`` (see the module doc);
    ``generation``: of that snapshot generation (a fallback), not the newest;
    ``isolated``: replay in a child process (False: in the rebuild's thread)."""
    try:
        fetched = conn.fetch(at) if generation is None else conn.fetch(at, generation=generation)
        return await rebuild_from(fetched, node, client_pub, path, at=at,
                                  source=source or str(getattr(conn, "spec", "")),
                                  progress=progress, isolated=isolated)
    except BaseException:
        discard(path)
        raise


async def rebuild_from(messages: AsyncIterator[wire.Message], node: EcdhKey,
                       client_pub: bytes, path: Path, *, at: int = -1, source: str = "",
                       progress: Progress | None = None, isolated: bool = True) -> Rebuilt:
    """:func:`rebuild` from a stream of fetch answers (``FetchSnapshot`` first)."""
    progress = progress or Progress()
    where = f"{source}: " if source else ""
    try:
        it = aiter(messages)
        first = await anext(it, None)
        if not isinstance(first, wire.FetchSnapshot):
            raise SealError(f"{where}the fetch did not start with a snapshot")
        received = len(first.manifest)
        if at >= 0 and first.data_version > at:
            raise RecoveryError(f"{where}sent a snapshot at data_version {first.data_version} "
                                f"for a fetch at data_version {at}")
        try:
            opener = SnapshotOpener(node, client_pub, first.data_version, first.manifest)
        except SealError as exc:
            raise SealError(f"{where}{exc}") from None
        manifest = opener.manifest
        if manifest.chunk_count != first.chunk_count:
            raise SealError(f"{where}announced {first.chunk_count} chunks for the snapshot at "
                            f"data_version {manifest.data_version}, its manifest says "
                            f"{manifest.chunk_count}")
        with Pipeline() as pipe, contextlib.ExitStack() as stack:
            replay: _Replay | ReplayProcess = ReplayProcess(path) if isolated else _Replay(path)
            pipe.at_exit(replay.close)
            msg, written, received = await _download(it, opener, path, progress, where,
                                                     received, pipe)
            writeback = _Writeback(path)
            stack.callback(writeback.abandon)
            start = await pipe.call(replay.open)
            if start != manifest.data_version:
                raise SealError(f"{where}the snapshot holds data_version {start}, its "
                                f"manifest says {manifest.data_version}")
            verifier = ChainVerifier(node, client_pub, manifest.data_version, manifest.anchor)
            count = 0
            newest_ms = manifest.time_ms
            past = False
            batch: list[Change] = []
            while isinstance(msg, wire.FetchRecord):
                count += 1
                received += len(msg.sealed)
                past = past or 0 <= at < msg.data_version
                if not past:
                    change = _open_record(verifier, msg, where)
                    batch.append(change)
                    newest_ms = change.time_ms
                    if len(batch) >= REPLAY_BATCH:
                        await pipe.submit(replay.apply, batch, progress.replay)
                        batch = []
                msg = await anext(it, None)
            if batch:
                await pipe.submit(replay.apply, batch, progress.replay)
            if not isinstance(msg, wire.FetchEnd):
                raise SealError(f"{where}the fetch ended early (got "
                                f"{type(msg).__name__ if msg else 'nothing'} after "
                                f"{count} records): try again")
            if msg.record_count != count:
                raise SealError(f"{where}sent {count} records but says it sent "
                                f"{msg.record_count}")
            data_version = await pipe.call(replay.finish, progress.replay)
            await writeback.wait()
        reached = verifier.tip.data_version
        if data_version != reached:
            raise ReplayError(f"{where}the rebuilt database is at data_version {data_version}, "
                              f"not at {reached}, the newest record's")
        if at >= 0 and reached != at:
            raise RecoveryError(f"{where}holds this client's backup only up to data_version "
                                f"{reached}, not {at}: it is behind")
        check_database(path, reached)
    except ReplayError as exc:
        if where and not str(exc).startswith(where):
            raise ReplayError(f"{where}{exc}") from None
        raise
    return Rebuilt(source=source, path=path, data_version=reached,
                   snapshot_data_version=manifest.data_version,
                   snapshot_time_ms=manifest.time_ms, newest_time_ms=newest_ms,
                   records=verifier.position, snapshot_bytes=written,
                   received_bytes=received, tip=verifier.tip,
                   replaced=frozenset(verifier.replaced))


async def _download(it: AsyncIterator[wire.Message], opener: SnapshotOpener, path: Path,
                    progress: Progress, where: str, received: int,
                    pipe: Pipeline) -> tuple[wire.Message | None, int, int]:
    """Write the snapshot's chunks to ``path`` (in ``pipe``'s thread, while the next ones
    are received and opened); return the message after them."""
    total = opener.manifest.total_size
    written = 0
    fd = _create(path)
    try:
        if progress.download:
            progress.download(0, total)
        while True:
            msg = await anext(it, None)
            if not isinstance(msg, wire.FetchChunk):
                break
            received += len(msg.sealed)
            try:
                data = opener.open_chunk(msg.index, msg.sealed)
            except SealError as exc:
                raise SealError(f"{where}{exc}") from None
            written += len(data)
            await pipe.submit(_write_all, fd, data)
            del data
            if progress.download:
                progress.download(written, total)
        try:
            opener.finish()
        except SealError as exc:
            raise SealError(f"{where}{exc}") from None
        await pipe.wait()
    except BaseException:
        pipe.halt()                     # no write may follow the close of fd
        raise
    finally:
        os.close(fd)
    return msg, written, received


class _Writeback:
    """The downloaded snapshot written to disk by a thread of its own (an fsync of the
    file) while the records are replayed: the replay's final fsync then has only the
    pages the records changed left to write, not the whole snapshot (about 1 s per GiB
    off the rebuild's critical path, since the disk and the replay's CPU work overlap)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._done = asyncio.get_running_loop().run_in_executor(None, _fsync_file, path)

    async def wait(self) -> None:
        """Until the snapshot is on disk; RecoveryError if it cannot be written."""
        try:
            await self._done
        except OSError as exc:
            raise RecoveryError(f"cannot write the rebuilt database {self._path} to disk: "
                                f"{exc.strerror or exc}; check the disk and its free "
                                "space") from None

    def abandon(self) -> None:
        """No one waits for it (the rebuild failed): its outcome is dropped."""
        self._done.add_done_callback(lambda f: f.cancelled() or f.exception())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Pipeline:
    """Jobs run in order in one worker thread, at most ``depth`` of them waiting: the
    event loop receives and opens the next items while the thread writes or replays the
    ones before (SQLite and file writes let other threads run). Memory stays bounded: a
    full pipeline makes :meth:`submit` wait (and the connection's reading pauses while
    what it received is not taken).

    A failed job fails every later one (they do not run); its exception is raised by the
    :meth:`submit`, :meth:`wait` or :meth:`call` that awaits it. On leaving the ``with``
    block the jobs not started are dropped, the ``at_exit`` callables run in the thread
    (say, closing the SQLite connection it opened), and the thread ends.
    """

    def __init__(self, depth: int = PIPELINE_DEPTH) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cldcb-rebuild")
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._depth = depth
        self._failed = False
        self._exits: list[Callable[[], None]] = []

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._failed:
            raise RecoveryError("stopped: an earlier step of the rebuild failed")
        try:
            return fn(*args)
        except BaseException:
            self._failed = True
            raise

    def _start(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut = asyncio.wrap_future(self._pool.submit(self._run, fn, *args))
        self._pending.append(fut)
        return fut

    async def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; waits while ``depth`` jobs are queued."""
        self._start(fn, *args)
        while len(self._pending) > self._depth:
            await self._pending.popleft()

    async def wait(self) -> None:
        """Until every queued job has run (raises the first failure)."""
        while self._pending:
            await self._pending.popleft()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` after the queued jobs; its result."""
        fut = self._start(fn, *args)
        await self.wait()
        return fut.result()

    def at_exit(self, fn: Callable[[], None]) -> None:
        self._exits.append(fn)

    def halt(self) -> None:
        """Drop the queued jobs and wait (blocking) for the running one to end."""
        self._failed = True
        self._pool.submit(lambda: None).result()
        for fut in self._pending:
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()         # raised by the first failure, awaited there
        self._pending.clear()

    def __enter__(self) -> Pipeline:
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.halt()
            for fn in self._exits:
                self._pool.submit(fn).result()
        finally:
            self._pool.shutdown(wait=True)
            sys.setswitchinterval(self._interval)


class _Replay:
    """The :class:`~cldcb.node.replay.Replayer` of a rebuild, used only in its pipeline's thread
    (an SQLite connection stays in the thread that opened it)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._replayer: Replayer | None = None
        self._applied = 0

    def open(self) -> int:
        self._replayer = Replayer(self._path, durable=False)
        return self._replayer.data_version

    def apply(self, changes: list[Change], done: Callable[[int], None] | None) -> None:
        assert self._replayer is not None
        for change in changes:
            self._replayer.apply(change.data_version, change.kind, change.writes)
        self._applied += len(changes)
        if done is not None:
            done(self._applied)

    def finish(self, done: Callable[[int], None] | None = None) -> int:
        assert self._replayer is not None
        return self._replayer.finish()

    def close(self) -> None:
        if self._replayer is not None:
            self._replayer.close()
            self._replayer = None


def _open_record(verifier: ChainVerifier, msg: wire.FetchRecord, where: str) -> Change:
    pos = verifier.position
    try:
        kind = Kind(msg.kind)
    except ValueError:
        raise ChainError(f"{where}record #{pos} (data_version {msg.data_version}) has an "
                         f"unknown kind {msg.kind}", position=pos,
                         data_version=msg.data_version) from None
    try:
        change, _ = verifier.open(msg.data_version, kind, msg.link, msg.sealed)
    except ChainError as exc:
        raise ChainError(f"{where}{exc}", position=exc.position,
                         data_version=exc.data_version) from None
    return change
