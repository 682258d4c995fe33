"""The rebuild's replay in a process of its own, off the GIL of the process that receives.

Recovery receives, decrypts and verifies records on its event loop (Python work: asyncssh,
the AEAD, the chain) while the records before are replayed (Python work too, around each
SQLite call). In one process the two share one GIL, so they take turns on one core. A
:class:`ReplayProcess` runs the :class:`~cldcb.replay.Replayer` (fast mode,
``durable=False``) in a child Python process instead, so the replay runs on a core of its
own: on a 1 GiB + 100,000 records recovery (``bench/recover.py``) this made the whole
recovery about 3 s shorter (see the README's performance table).

The child is ``python -P -m cldcb.replayproc`` (the same interpreter, ``-P``: the current
folder is not put on its module path); the calls and their answers travel pickled over its
stdin and stdout. The child is started when the ReplayProcess is made (its start overlaps
the snapshot's download); each call (:meth:`open`, :meth:`apply`, :meth:`finish`) waits
for its answer and is made from the rebuild's worker thread (:class:`cldcb.restore.Pipeline`),
so the event loop keeps receiving and verifying meanwhile. The child gets the database's
path and the verified changes' ``(data_version, kind, statements)``, never a key.

Errors: a :class:`~cldcb.errors.CldcbError` raised in the child (a
:class:`~cldcb.errors.ReplayError` naming the record) is raised again here as a
ReplayError with the same message; a child that dies or cannot be started raises
ReplayError. :meth:`close` closes the child's database (as :meth:`Replayer.close
<cldcb.replay.Replayer.close>` does: a pending batch rolled back, the kept changes
committed) and waits for the child to end, so the file can be removed afterwards; a child
that does not end in :data:`CLOSE_TIMEOUT` seconds is killed. A child whose parent dies
sees the end of its stdin and ends.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from cldcb.dataversion import Kind
from cldcb.errors import CldcbError, ReplayError

CLOSE_TIMEOUT = 60.0
"""Seconds :meth:`ReplayProcess.close` waits for the child to close its database and end."""

Item = tuple[int, int, Sequence[str]]
"""One change as the child takes it: (data_version, kind, statements)."""


class ReplayProcess:
    """A :class:`~cldcb.replay.Replayer` in a child process (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._applied = 0
        flags = ["-P"] if sys.version_info >= (3, 11) else []
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, *flags, "-m", "cldcb.replayproc"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            raise ReplayError(f"cannot start the replay process ({exc.strerror or exc}); "
                              "check that this Python can run programs") from None

    @property
    def pid(self) -> int | None:
        """The child's process id (None once closed)."""
        return None if self._proc is None else self._proc.pid

    def _call(self, *request: Any) -> Any:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise ReplayError("the replay process is closed")
        try:
            pickle.dump(request, proc.stdin, pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            status, value = pickle.load(proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            raise ReplayError(f"the replay process ended unexpectedly ({_ended(proc)}); "
                              "try again, and report it if it happens again") from None
        if status == "error":
            raise ReplayError(str(value))
        return value

    def open(self) -> int:
        """Open the database (a restored snapshot); its data_version."""
        return int(self._call("open", str(self._path)))

    def apply(self, changes: Sequence[Any], done: Callable[[int], None] | None) -> None:
        """Apply verified changes (:class:`~cldcb.seal.Change`) in order; ``done(n)`` with
        the count applied so far."""
        items = [(c.data_version, int(c.kind), c.writes) for c in changes]
        self._call("apply", items)
        self._applied += len(items)
        if done is not None:
            done(self._applied)

    def finish(self) -> int:
        """:meth:`Replayer.finish <cldcb.replay.Replayer.finish>` in the child."""
        return int(self._call("finish"))

    def close(self) -> None:
        """Close the child's database and wait for the child to end (killed past
        :data:`CLOSE_TIMEOUT`)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()      # end of input: the child closes its database, ends
            proc.wait(CLOSE_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


def _ended(proc: subprocess.Popen[bytes]) -> str:
    """How a child whose answers stopped ended (it is given a moment to be reaped)."""
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The child's loop: answer each pickled call until the end of ``requests``."""
    from cldcb.replay import Replayer

    replayer: Replayer | None = None
    try:
        while True:
            try:
                request = pickle.load(requests)
            except EOFError:
                return
            try:
                value: Any = None
                if request[0] == "open":
                    replayer = Replayer(Path(request[1]), durable=False)
                    value = replayer.data_version
                elif replayer is None:
                    raise ReplayError("the replay process was not opened")
                elif request[0] == "apply":
                    for data_version, kind, writes in request[1]:
                        replayer.apply(data_version, Kind(kind), writes)
                elif request[0] == "finish":
                    value = replayer.finish()
                answer: tuple[str, Any] = ("ok", value)
            except CldcbError as exc:
                answer = ("error", str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
                answer = ("error", f"the replay failed: {type(exc).__name__}: {exc}")
            pickle.dump(answer, answers, pickle.HIGHEST_PROTOCOL)
            answers.flush()
    finally:
        if replayer is not None:
            replayer.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent decides; it closes stdin
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                       # nothing else may write into the answers
    sys.stdout = sys.stderr
    with answers:
        serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
