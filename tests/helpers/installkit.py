"""Helpers for the install tests: the CLI on a pseudo-terminal, and secret scans.

- :func:`run_cli`: ``cldcb-client …`` as a subprocess with stdin not a terminal;
- :class:`PtyRun`: the same on a pseudo-terminal that is the child's
  controlling terminal (so ``getpass`` reads from it, as for a person),
  with ``expect``/``send``;
- :func:`process_leaks` / :func:`file_leaks`: where a secret shows up in the
  command line or environment of this test's processes (this process and
  all its descendants, read from /proc), or in files under some folders.
  Findings name the place, never the secret.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

_BESIDE = Path(sys.executable).parent / "cldcb-client"
CLIENT = [str(_BESIDE) if _BESIDE.exists() else shutil.which("cldcb-client") or "cldcb-client"]
# Make the pty the controlling terminal of a new session, then exec the command.
_CTTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
         "os.execvp(sys.argv[1], sys.argv[1:])")


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for cldcb-client: a test HOME, no agent, no ssh config of ours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "CLDCB_SERVER_DIR")}
    env.update(HOME=str(home), **extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLIENT, *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=timeout)


class PtyRun:
    """A command on a new pseudo-terminal (its controlling terminal)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        self.master = master
        self.proc = subprocess.Popen([sys.executable, "-c", _CTTY, *argv], stdin=slave,
                                     stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.output = ""
        self._seen = 0

    @classmethod
    def cli(cls, *args: str, env: dict[str, str] | None = None) -> PtyRun:
        return cls([*CLIENT, *args], env)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.output += data.decode("utf-8", "replace")
        return True

    def expect(self, pattern: str, timeout: float = 60) -> str:
        """Wait until ``pattern`` (a regex) appears after what was matched last."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.output, self._seen)
            if m:
                self._seen = m.end()
                return m.group(0)
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)):
                m = rx.search(self.output, self._seen)
                if m:
                    self._seen = m.end()
                    return m.group(0)
                raise AssertionError(f"{pattern!r} did not appear; output:\n{self.output}")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        while self._read(0.05):
            if not select.select([self.master], [], [], 0)[0]:
                break
        code = self.proc.wait(max(1.0, deadline - time.monotonic()))
        os.close(self.master)
        return code


# --- secrets -------------------------------------------------------------------------

def secret_forms(*secrets: bytes | str) -> list[bytes]:
    """Each secret as it could leak: text, and for keys also lower/upper hex and raw."""
    forms: list[bytes] = []
    for s in secrets:
        if isinstance(s, str):
            forms.append(s.encode())
        else:
            forms += [s, s.hex().encode(), s.hex().upper().encode()]
    return forms


def process_children() -> dict[int, list[int]]:
    """Every process's children (pid → pids), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(root: int) -> set[int]:
    children = process_children()
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def process_leaks(forms: Iterable[bytes], extra_pids: Iterable[int] = ()) -> list[str]:
    """``pid comm: cmdline|environ`` for every process of this test (and ``extra_pids``
    with their descendants) whose command line or environment holds a secret."""
    forms = list(forms)
    pids = _descendants(os.getpid())
    for pid in extra_pids:
        pids |= _descendants(pid)
    found = []
    for pid in sorted(pids):
        for what in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{what}").read_bytes()
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if any(f in data for f in forms):
                found.append(f"{pid} {comm}: {what}")
    return found


def scanned_pids(extra_pids: Iterable[int] = ()) -> set[int]:
    pids = _descendants(os.getpid())
    for pid in extra_pids:
        pids |= _descendants(pid)
    return pids


def file_leaks(roots: Iterable[Path], forms: Iterable[bytes],
               allowed: Iterable[Path] = ()) -> list[Path]:
    """Files under ``roots`` (other than ``allowed``) holding a secret."""
    forms = list(forms)
    ok = {Path(p).resolve() for p in allowed}
    found = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                if path.is_symlink() or path.resolve() in ok or not path.is_file():
                    continue
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if any(f in data for f in forms):
                    found.append(path)
    return found


def text_leaks(texts: dict[str, str], forms: Iterable[bytes]) -> list[str]:
    """Names of the ``texts`` (logs, outputs) that hold a secret."""
    forms = list(forms)
    return [name for name, text in texts.items()
            if any(f in text.encode("utf-8", "replace") for f in forms)]
