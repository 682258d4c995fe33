"""A rebuild's replay in a process of its own, so that it has an interpreter lock of its own.

Why: a rebuild verifies the fetched records on its event loop (Python work: AEAD, the
chain, the wire codec) while the records verified before are replayed (SQLite work). In
one process the two share one interpreter lock, and the replay takes it back after every
SQLite call (four per change): each time the event loop holds it, the replay waits for
the interpreter's switch interval, so the two ran one after the other rather than side by
side. In a child process each has a core.

:class:`ReplayProcess` is what :func:`cldcb.node.restore.rebuild` drives from its worker
thread (blocking pipe I/O there, never on the event loop): :meth:`~ReplayProcess.open`,
:meth:`~ReplayProcess.apply` (a batch of verified changes), :meth:`~ReplayProcess.finish`,
:meth:`~ReplayProcess.close`, as its in-thread twin ``restore._Replay``. The child
(``python -P -m cldcb.node.replay_process``, started at once so that its start overlaps
the snapshot's download; ``-P`` keeps the working folder off its ``sys.path``, so a
``cldcb`` wherever recovery runs is not what it imports) runs a
:class:`~cldcb.node.replay.Replayer` in its fast mode; its rules, results and errors are
the Replayer's, unchanged.

The protocol, on the child's stdin and stdout (pipes; the parent is its only peer, so the
frames are :mod:`marshal` data: tuples, lists, strings, integers): a frame is a 4-byte
big-endian length and that many bytes. Requests: ``("open", path)``, ``("apply",
[(data_version, kind, writes), ...])``, ``("finish",)``. One answer per request, in order:
``("ok", value)`` (the data_version for open and finish, the number of changes applied so
far for apply) or ``("error", message)``; after an error the child answers nothing more:
it closes the database (which keeps exactly what the Replayer's docstring says) and exits.
At the end of its stdin it closes the database and exits. At most :data:`AHEAD` apply
requests wait for their answer, so the parent is never more than that many batches ahead
(memory stays bounded; a failure is seen within that many batches).

Its stderr goes nowhere: whatever it has to say goes through the answers (a ReplayError's
text, which never holds a statement's values); a child that dies without answering is
reported with its exit status.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cldcb.core.seal import Change
from cldcb.errors import RecoveryError, ReplayError
from cldcb.node.replay import Replayer

AHEAD = 4
"""Apply requests that may wait for their answer."""
STOP_SECONDS = 10.0
"""How long :meth:`ReplayProcess.close` waits for the child to exit before killing it."""
_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30


def _send(out: BinaryIO, message: tuple[Any, ...]) -> None:
    data = marshal.dumps(message)
    out.write(_LENGTH.pack(len(data)))
    out.write(data)
    out.flush()


def _receive(source: BinaryIO) -> tuple[Any, ...] | None:
    """The next frame (None at the end of the stream)."""
    head = source.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes")
    data = source.read(size)
    if len(data) < size:
        return None
    message = marshal.loads(data)
    if not isinstance(message, tuple) or not message:
        raise ValueError("a frame that is not a request")
    return message


class ReplayProcess:
    """The parent's end: a child process replaying into one database file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._waiting = 0               # requests sent, answer not read yet
        self._applied = 0
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "cldcb.node.replay_process"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            raise RecoveryError(f"cannot start the replay process ({sys.executable}: "
                                f"{exc.strerror or exc}); check the Python installation "
                                "cldcb runs from") from None

    def _request(self, *message: Any) -> None:
        assert self._proc.stdin is not None
        try:
            _send(self._proc.stdin, message)
        except (BrokenPipeError, ValueError):   # ValueError: our end already closed
            self._answer()                      # its error, or its exit status
            raise self._ended() from None
        self._waiting += 1

    def _answer(self) -> Any:
        assert self._proc.stdout is not None
        try:
            answer = _receive(self._proc.stdout)
        except (ValueError, EOFError, TypeError) as exc:
            raise RecoveryError(f"the replay process answered nonsense ({exc})") from None
        if answer is None:
            raise self._ended()
        self._waiting -= 1
        if answer[0] == "error" and len(answer) == 2:
            raise ReplayError(str(answer[1]))
        if answer[0] != "ok" or len(answer) != 2:
            raise RecoveryError("the replay process answered nonsense")
        return answer[1]

    def _ended(self) -> RecoveryError:
        try:
            status = self._proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            return RecoveryError("the replay process stopped answering")
        return RecoveryError(f"the replay process ended unexpectedly (exit status {status}); "
                             "try again, and report it if it happens again")

    def open(self) -> int:
        """Open the database (the downloaded snapshot); its data_version."""
        self._request("open", os.fspath(self._path))
        return int(self._answer())

    def apply(self, changes: list[Change], done: Callable[[int], None] | None) -> None:
        """Send a batch of verified changes; ``done(applied)`` as the child reports them."""
        self._request("apply", [(c.data_version, int(c.kind), tuple(c.writes))
                                for c in changes])
        while self._waiting > AHEAD:
            self._applied = int(self._answer())
            if done is not None:
                done(self._applied)

    def finish(self, done: Callable[[int], None] | None = None) -> int:
        """Commit, fsync, the data_version reached (after every batch was applied)."""
        self._request("finish")
        while self._waiting > 1:
            self._applied = int(self._answer())
            if done is not None:
                done(self._applied)
        return int(self._answer())

    def close(self) -> None:
        """End the child (it closes the database first); kill it if it does not exit."""
        proc = self._proc
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(source: BinaryIO, out: BinaryIO) -> int:
    replayer: Replayer | None = None
    applied = 0
    try:
        while (request := _receive(source)) is not None:
            verb = request[0]
            if verb == "open" and replayer is None:
                replayer = Replayer(Path(request[1]), durable=False)
                _send(out, ("ok", replayer.data_version))
            elif verb == "apply" and replayer is not None:
                for data_version, kind, writes in request[1]:
                    replayer.apply(data_version, kind, writes)
                applied += len(request[1])
                _send(out, ("ok", applied))
            elif verb == "finish" and replayer is not None:
                _send(out, ("ok", replayer.finish()))
            else:
                _send(out, ("error", f"the replay process got a request it cannot take "
                                     f"({str(verb)[:20]!r})"))
                return 2
    except (ReplayError, RecoveryError) as exc:
        _send(out, ("error", str(exc)))
        return 1
    except (ValueError, EOFError, TypeError) as exc:
        _send(out, ("error", f"the replay process got a malformed request ({exc})"))
        return 2
    finally:
        if replayer is not None:
            with contextlib.suppress(ReplayError):
                replayer.close()
    return 0


def main() -> int:
    """The child: serve requests from stdin until its end."""
    with contextlib.suppress(BrokenPipeError):
        return _serve(sys.stdin.buffer, sys.stdout.buffer)
    return 1


if __name__ == "__main__":
    sys.exit(main())
