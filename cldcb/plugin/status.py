"""``<lightning-dir>/<network>/cldcb-status.json``: the plugin's state for people and monitors.

Replaced atomically (write a temporary file, fsync, rename) at most once a
second while something changed, and once more at exit with ``running``
false. Layout (version 1)::

    {
      "version": 1,
      "pid": 1234,                       # the plugin's process id
      "running": true,                   # false once the plugin exited cleanly
      "written_at": 1767225600.123,      # unix time of writing
      "started_at": 1767225500.0,
      "data_version": 2525,              # newest change held by quorum servers (null: none yet)
      "last_hook_data_version": 2525,    # newest db_write call answered
      "last_hook_result": "continue",    # or "fail: <why>"
      "quorum": 1,
      "outage_limit": 300,
      "servers": [
        {"address": "203.0.113.5:29735", "server_id": "52…",
         "connected": true,
         "state": "in-step",             # connecting | in-step | catching-up | behind | down
         "last_acked_data_version": 2525,  # null: nothing acknowledged by this plugin run
         "last_ack_at": 1767225600.1,
         "lag": 0,                       # data_versions behind data_version (null: unknown)
         "snapshot": null,               # or {"kind": "catch-up"|"compaction"|"blocking",
                                         #     "data_version": N, "bytes_sent": n, "bytes": N}
         "last_error": null}             # or why it is down; a protocol violation (an
                                         # ack naming another change) stays until an
                                         # Ack that matches comes
      ]
    }

No secret ever appears in it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STATUS_NAME = "cldcb-status.json"
VERSION = 1


def write_status_file(path: Path, status: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``status`` as JSON (mode 0644)."""
    data = json.dumps({"version": VERSION, **status}, indent=1, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_status_file(path: Path) -> dict[str, Any]:
    """Parse a status file (for ``cldcb-client status`` and tests)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


class StatusWriter:
    """Writes the status at most once per ``interval`` seconds while it is dirty."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._last = 0.0
        self.dirty = True
        self.errors = 0

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.dirty and now - self._last >= self.interval

    def taken(self, now: float | None = None) -> None:
        """The current state was just taken for writing (call before :meth:`write`)."""
        self._last = time.monotonic() if now is None else now
        self.dirty = False

    def write(self, status: dict[str, Any], now: float | None = None) -> bool:
        """Write now (whatever the interval); False if the file could not be written.
        Safe to run in a thread after :meth:`taken`."""
        if now is not None:
            self.taken(now)
        try:
            write_status_file(self.path, status)
            return True
        except OSError:
            self.errors += 1
            return False
