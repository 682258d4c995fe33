"""Named crash points, for tests that kill the server at every step that matters.

Code that writes durable state calls :func:`crashpoint` with a name before and
after each write, fsync, rename and directory fsync. Normally that costs one
comparison: the environment is read once, at import.

When the environment variable ``CLDCB_CRASHPOINT`` equals the name (or
``name@N``: the N-th time that point is reached, counting from 1), the process:

1. appends ``name`` and a newline to the file named by ``CLDCB_CRASHPOINT_LOG``
   (if set), flushes and fsyncs it, so a test can assert the point was
   reached;
2. kills itself with ``SIGKILL``: no ``finally`` blocks, no ``atexit``, no
   buffered output flushed. Whatever the process had written is in the page
   cache, which is what a process crash (not a power failure) leaves behind.
"""

from __future__ import annotations

import os
import signal

ENV = "CLDCB_CRASHPOINT"
LOG_ENV = "CLDCB_CRASHPOINT_LOG"


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, sep, count = value.partition("@")
    if sep and count.isdigit() and int(count) >= 1:
        return name, int(count)
    return value, 1


_target: tuple[str, int] | None = _parse(os.environ.get(ENV))
_hits = 0


def reload() -> None:
    """Read the environment again (for tests that change it in-process)."""
    global _target, _hits
    _target = _parse(os.environ.get(ENV))
    _hits = 0


def crashpoint(name: str) -> None:
    """Crash here if ``CLDCB_CRASHPOINT`` names this point; otherwise do nothing."""
    if _target is None or _target[0] != name:
        return
    global _hits
    _hits += 1
    if _hits < _target[1]:
        return
    log = os.environ.get(LOG_ENV)
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, name.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
