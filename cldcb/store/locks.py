"""A client's lock file: ``DATA_DIR/locks/<client_id>.lock`` (see :mod:`cldcb.store`).

Every store call on a client runs under an exclusive ``flock`` of this file,
in whatever process it runs (the daemon, ``stdio`` sessions under sshd, the
``add``/``remove`` commands). The file holds two big-endian u64 counters,
read and written only under the lock:

- bytes 0–8, the **writer generation**: bumped by each writing session that
  authenticates; a writer whose generation is no longer the file's was taken
  over and must stop;
- bytes 8–16, the **settings epoch**: bumped by ``add`` (when the settings
  change) and ``remove``.

A writer that finds both counters as they were at its previous call knows no
other process changed the client's files in between, and the store skips the
checks that look for such changes (:meth:`~cldcb.store.ClientStore.vouch`).
A short or missing file reads as zeros.

A writer streaming records on an event loop may keep the lock between them
(:class:`Lease`): others wait at most :attr:`Lease.HOLD` seconds for it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCKS = "locks"


def lock_path(data_dir: Path, client_id: str) -> Path:
    return data_dir / LOCKS / f"{client_id}.lock"


def open_lock(data_dir: Path, client_id: str) -> int:
    """Open (creating it and its folder if needed) the client's lock file."""
    path = lock_path(data_dir, client_id)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class flocked:  # noqa: N801 - used like a function: ``with flocked(fd) as fd:``
    """Hold the exclusive lock on ``fd``, waiting for it. (A class rather than a generator
    context manager: it is taken for every record.)"""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self._fd

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class Lease:
    """The lock of ``fd`` kept by one streaming writer from one record to the next.

    Taking the lock for every record costs three system calls (lock, read the
    counters, unlock) on the path every change takes. A writer that answers its
    records on an event loop keeps it instead for up to :attr:`HOLD` seconds:
    :meth:`hold` takes it without waiting (None if another holds it)
    and reads the counters once; while it is held nobody else can change them or
    the client's files, so the records that follow need neither. The holder calls
    :meth:`release` once :meth:`due` (so another process, an admin command or a
    session under sshd, waits at most that long) and before any other use of the
    lock file.
    """

    HOLD = 0.02

    __slots__ = ("_fd", "counters", "_since")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.counters: tuple[int, int] | None = None
        self._since = 0.0

    def hold(self, now: float) -> tuple[int, int] | None:
        """Take the lock at ``now`` if not held yet; the counters, or None (nothing taken)
        when another holds the lock."""
        counters = self.counters
        if counters is None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            try:
                counters = self.counters = read_counters(self._fd)
            except BaseException:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                raise
            self._since = now
        return counters

    def release(self) -> None:
        if self.counters is not None:
            self.counters = None
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def due(self, now: float) -> float:
        """Seconds until the lock must be let go (0: now; also when not held)."""
        if self.counters is None:
            return 0.0
        return max(0.0, self._since + self.HOLD - now)


def read_counters(fd: int) -> tuple[int, int]:
    """``(writer generation, settings epoch)``; call under the lock."""
    raw = os.pread(fd, 16, 0)
    gen = int.from_bytes(raw[:8], "big") if len(raw) >= 8 else 0
    epoch = int.from_bytes(raw[8:16], "big") if len(raw) >= 16 else 0
    return gen, epoch


def _write_counters(fd: int, gen: int, epoch: int) -> None:
    os.pwrite(fd, gen.to_bytes(8, "big") + epoch.to_bytes(8, "big"), 0)


def bump_generation(fd: int) -> int:
    """A new writer: the next generation, written; call under the lock."""
    gen, epoch = read_counters(fd)
    _write_counters(fd, gen + 1, epoch)
    return gen + 1


@contextmanager
def locked(data_dir: Path, client_id: str) -> Iterator[None]:
    """Hold the client's lock (waiting for it) around a store call."""
    fd = open_lock(data_dir, client_id)
    try:
        with flocked(fd):
            yield
    finally:
        os.close(fd)


@contextmanager
def settings_change(data_dir: Path, client_id: str) -> Iterator[None]:
    """Change a client's settings or folder under its lock, then bump the settings epoch,
    so that every process's writer checks the files again at its next call."""
    fd = open_lock(data_dir, client_id)
    try:
        with flocked(fd):
            try:
                yield
            finally:
                gen, epoch = read_counters(fd)
                _write_counters(fd, gen, epoch + 1)
    finally:
        os.close(fd)
