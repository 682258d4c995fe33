"""The store's view of the file system: a small interface a test can replace.

Every write, fsync, truncate, rename, unlink, mkdir and directory fsync of the
store goes through a :class:`FileLayer`, so a test can record their order or
make them fail (``ENOSPC``, ``EIO``, short writes). :class:`OsFileLayer` is
the real one. Reads go through it too (``open_read``), but nothing depends on
intercepting them.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cldcb.errors import StoreError
from cldcb.store.crashpoints import crashpoint


class FileLayer(Protocol):
    """What the store does to files. Methods raise OSError like the os module."""

    def open_read(self, path: Path) -> BinaryIO: ...

    def open_write(self, path: Path, *, create: bool = False, exclusive: bool = False,
                   truncate: bool = False) -> int: ...

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int: ...

    def pwrite_durable(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """``pwrite``, its data on stable storage when it returns (as with fdatasync)."""
        ...

    def fsync(self, fd: int, *, data_only: bool = False) -> None: ...

    def truncate(self, fd: int, size: int) -> None: ...

    def close(self, fd: int) -> None: ...

    def rename(self, src: Path, dst: Path) -> None: ...

    def unlink(self, path: Path) -> None: ...

    def mkdir(self, path: Path) -> None: ...

    def fsync_dir(self, path: Path) -> None: ...

    def writeback(self, fd: int, offset: int, length: int, *, wait: bool) -> None:
        """Start writing ``length`` bytes at ``offset`` to the disk (``wait``: and wait
        until they are written). Not a durability point (no metadata, no cache flush:
        only fsync is); it keeps a large file's dirty pages from piling up."""
        ...

    def listdir(self, path: Path) -> list[str]: ...

    def size(self, path: Path) -> int: ...

    def exists(self, path: Path) -> bool: ...


_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def _find_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None                   # not Linux: writeback is left to the kernel
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range: Any = _find_sync_file_range()


class OsFileLayer:
    """The real file system (POSIX)."""

    def open_read(self, path: Path) -> BinaryIO:
        return open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - caller closes

    def open_write(self, path: Path, *, create: bool = False, exclusive: bool = False,
                   truncate: bool = False) -> int:
        flags = os.O_WRONLY | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        if exclusive:
            flags |= os.O_EXCL
        if truncate:
            flags |= os.O_TRUNC
        return os.open(path, flags, 0o600)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pwrite_durable(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """One ``pwritev(RWF_DSYNC)`` where the kernel has it (Linux ≥ 4.7): the write and
        its data sync in one call, measurably quicker than pwrite then fdatasync."""
        global _RWF_DSYNC
        if _RWF_DSYNC:
            try:
                return os.pwritev(fd, [data], offset, _RWF_DSYNC)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                _RWF_DSYNC = 0            # an old kernel or a file system without it
        n = os.pwrite(fd, data, offset)
        os.fdatasync(fd)
        return n

    def fsync(self, fd: int, *, data_only: bool = False) -> None:
        """``data_only``: fdatasync (data, and the size if it changed; not the times)."""
        if data_only:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def writeback(self, fd: int, offset: int, length: int, *, wait: bool) -> None:
        """``sync_file_range`` (Linux); nothing elsewhere. Its errors are left to the
        fsync that makes the file durable, which reports them too."""
        if _sync_file_range is None or length <= 0:
            return
        flags = _SYNC_FILE_RANGE_WRITE
        if wait:
            flags |= _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WAIT_AFTER
        _sync_file_range(fd, offset, length, flags)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def size(self, path: Path) -> int:
        return os.stat(path).st_size

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)


def write_all(fs: FileLayer, fd: int, data: bytes | memoryview, offset: int, *,
              durable: bool = False) -> None:
    """Write all of ``data`` at ``offset``, going on after short writes; ``durable``: on
    stable storage when this returns (:meth:`FileLayer.pwrite_durable`)."""
    write = fs.pwrite_durable if durable else fs.pwrite
    done = write(fd, data, offset)
    if done == len(data):
        return                                        # the usual case: all at once
    if done <= 0:
        raise OSError(errno.EIO, "a write made no progress")
    view = memoryview(data)
    while done < len(view):
        n = write(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        done += n


def io_error(exc: OSError, what: str, after: str = "") -> StoreError:
    """A StoreError for an OSError during ``what``, saying what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = "the server's disk is full; free some space on it"
    elif exc.errno == errno.EIO:
        cause = "the server's disk reported an I/O error; check it (dmesg, SMART)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = (f"{exc.strerror}: check that the data directory is writable by the "
                 "user cldcb-server runs as")
    else:
        cause = exc.strerror or str(exc)
    return StoreError(f"{what} failed: {cause}" + (f" ({after})" if after else ""))


def replace_file(fs: FileLayer, path: Path, data: bytes, point: str) -> None:
    """Durably make ``path`` hold ``data``: temp file, fsync, rename, fsync the folder.

    Raises OSError; crash points are ``<point>.before_write``, ``.after_write``,
    ``.after_fsync``, ``.after_rename`` and ``.after_fsync_dir``.
    """
    tmp = path.with_name(path.name + ".tmp")
    crashpoint(point + ".before_write")
    fd = fs.open_write(tmp, create=True, truncate=True)
    try:
        write_all(fs, fd, data, 0)
        crashpoint(point + ".after_write")
        fs.fsync(fd)
    finally:
        fs.close(fd)
    crashpoint(point + ".after_fsync")
    fs.rename(tmp, path)
    crashpoint(point + ".after_rename")
    fs.fsync_dir(path.parent)
    crashpoint(point + ".after_fsync_dir")


def ensure_dir(fs: FileLayer, path: Path, point: str) -> None:
    """Create folder ``path`` if missing, and fsync its parent so it stays."""
    if fs.exists(path):
        return
    crashpoint(point + ".before_mkdir")
    try:
        fs.mkdir(path)
    except FileExistsError:
        return
    crashpoint(point + ".after_mkdir")
    fs.fsync_dir(path.parent)
    crashpoint(point + ".after_fsync_dir")
