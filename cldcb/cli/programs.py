"""Where cldcb's programs are on this host, as the absolute commands others run.

Other programs start cldcb's programs from a command written down once: lightningd
runs the plugin through the wrapper (``exec '/abs/cldcb-plugin' "$0"``), sshd runs the
server from ``authorized_keys`` forced commands and the ``Subsystem`` line, systemd
from ``ExecStart``. None of them may depend on the PATH of the session that runs them
(another cldcb installation may come first there), so each is written with an absolute
path:

- :func:`find_program`: ``NAME`` beside the running cldcb program (the folder of
  ``sys.argv[0]``, e.g. pipx's ``~/.local/bin``), else beside the Python running it (a
  virtual environment's ``bin``), else on PATH; made absolute, symlinks kept (pipx
  and ``/usr/local/bin`` links stay valid across upgrades); None when not found.
- :func:`running_server_command`: the command that runs the ``cldcb-server`` now
  running: its own path when it was started as the ``cldcb-server`` program, else
  ``PYTHON -m cldcb.server.admin``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SERVER_PROGRAM = "cldcb-server"
PROGRAMS = ("cldcb-client", SERVER_PROGRAM, "cldcb-plugin")


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_program(name: str) -> str | None:
    """The absolute path of cldcb's program ``name`` on this host, or None."""
    argv0 = Path(sys.argv[0] if sys.argv else "")
    for folder in (argv0.parent if argv0.name in PROGRAMS else None,
                   Path(sys.executable).parent):
        if folder is not None and _runnable(folder / name):
            return os.path.abspath(folder / name)
    found = shutil.which(name)
    return os.path.abspath(found) if found else None


def running_server_command() -> list[str]:
    """The command (program and arguments) that runs the cldcb-server now running."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == SERVER_PROGRAM and _runnable(Path(argv0)):
        return [os.path.abspath(argv0)]
    return [sys.executable, "-m", "cldcb.server.admin"]
