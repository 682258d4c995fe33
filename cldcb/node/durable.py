"""Durable local files: replace a file atomically, fsync a directory.

What the client-side programs write on the node (the wrapper, lightningd's
config, server metadata, a recovered database) must be either the old file
or the new one after a crash, never a torn mix, and must survive a power
loss once the call returned. These helpers raise :class:`OSError`; callers
turn it into their own error that says what to do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(folder: Path | str) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: str | bytes, *, mode: int,
                 owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    The temporary file gets ``mode`` (and ``owner``, when running as root)
    before any byte is written, is fsynced, renamed over ``path``, and the
    folder is fsynced. On any failure the temporary file is removed and
    ``path`` is left as it was.
    """
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        view = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(folder)
