"""Progress of long work (recover's and verify's snapshot download): steady, not 0% then 100%.

Without a terminal (a log, a pipe) the lines come at each tenth of the snapshot, however
fast it goes; the chunks here arrive with no time between them, as from a fast server.
"""

from __future__ import annotations

import re

import pytest

from cldcb.client.progress import ProgressPrinter

MIB = 1024 * 1024


def test_download_progress_without_a_terminal_is_steady(
        capsys: pytest.CaptureFixture[str]) -> None:
    total = 12 * MIB + 12345                      # a snapshot of several MiB, 1 MiB chunks
    printer = ProgressPrinter("backup.example:29735")
    done = 0
    printer.progress.download(0, total)
    while done < total:
        done = min(total, done + MIB)
        printer.progress.download(done, total)
    for n in range(1, 5):
        printer.progress.replay(n)
    printer.done()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err          # plain lines, not a rewritten one
    percents = [float(p) for p in re.findall(r"snapshot +([\d.]+)%", err)]
    assert percents[0] == 0.0 and percents[-1] == 100.0
    assert percents == sorted(percents) and len(set(percents)) == len(percents)
    steps = [b - a for a, b in zip(percents, percents[1:], strict=False)]
    assert len(percents) >= 10 and max(steps) <= 20.0, err   # no jump from 0% to 100%
    assert len(percents) <= 14, err                         # and not a line per chunk
    assert err.rstrip().endswith("verified and replayed 4 records")
