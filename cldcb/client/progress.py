"""Progress of long work on stderr: a snapshot's download, then the records' replay.

On a terminal: one line, rewritten at most every :data:`TTY_INTERVAL` seconds.
Without one (a log, a pipe): plain lines at a lower rate that does not depend
on speed: the download at each :data:`STEP` of the snapshot (and at least every
:data:`QUIET_MAX` seconds when a step takes longer), the replay every
:data:`QUIET_MAX` seconds; and the last value of each phase when it ends.
"""

from __future__ import annotations

import sys
import time

import click

from cldcb.node import restore

TTY_INTERVAL = 0.2
STEP = 0.1
"""Without a terminal, a download line at each tenth of the snapshot."""
QUIET_MAX = 10.0
"""Without a terminal, seconds at most between two lines while work goes on."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressPrinter:
    """Download and replay progress of one server (``name``) on stderr; see the module."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tty = _stderr_is_terminal()
        self._last = 0.0
        self._next_step = 0.0           # the fraction of the snapshot due a line
        self._pending = ""
        self._phase = ""
        self.progress = restore.Progress(download=self._download, replay=self._replay)

    def _download(self, done: int, total: int) -> None:
        part = done / total if total else 1.0
        stepped = part >= self._next_step
        if stepped:
            self._next_step = (int(part / STEP + 1e-9) + 1) * STEP
        self._show("download", f"{self.name}: snapshot {100 * part:5.1f}% ({_mib(done)} of "
                   f"{_mib(total)} MiB)", final=done >= total, stepped=stepped)

    def _replay(self, records: int) -> None:
        self._show("replay", f"{self.name}: verified and replayed {records} records")

    def _show(self, phase: str, text: str, final: bool = False, stepped: bool = False) -> None:
        if phase != self._phase:
            self._end_phase()
            self._phase = phase
            self._last = 0.0
        self._pending = text
        now = time.monotonic()
        due = (now - self._last >= TTY_INTERVAL if self.tty
               else stepped or now - self._last >= QUIET_MAX)
        if final or due:
            self._emit(now)

    def _emit(self, now: float) -> None:
        if self.tty:
            sys.stderr.write("\r" + self._pending + "\x1b[K")
            sys.stderr.flush()
        else:
            click.echo(self._pending, err=True)
        self._pending = ""
        self._last = now

    def _end_phase(self) -> None:
        if self._pending:
            self._emit(time.monotonic())
        if self._phase and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def done(self) -> None:
        self._end_phase()
        self._phase = ""
        self._next_step = 0.0
