"""Real Core Lightning nodes for tests and benches, on loopback, with a fake chain.

- :func:`find_lightningd`: the ``lightningd`` binary from ``CLDCB_LIGHTNINGD``
  (a path) or PATH; :func:`require_lightningd` skips a test without one, with a
  reason that says how to get one, and fails it under ``CI=true``.
- :class:`Chain`: the shared fake regtest chain (``tests/data/cln/chainlib.py``,
  served to each node by the backend plugin ``fakechain.py``); blocks are
  mined with ``chainctl.py``.
- :class:`RealNode`: one ``lightningd --network=regtest`` in its own
  lightning-dir, on a loopback port, with its own log. :meth:`RealNode.start`
  waits (bounded) until ``getinfo`` answers; :meth:`RealNode.stop` asks for
  ``stop`` and waits for the process to exit; :meth:`RealNode.kill` sends
  SIGKILL to lightningd alone (a crash: its plugins see their stdin close).
  Every node runs in a process group of its own, so that :meth:`RealNode.close`
  can end lightningd and every plugin it started, by pid, whatever happened.
- :class:`RealCln`: what a test holds (the ``realcln`` fixture in
  ``conftest.py``): it makes nodes and the chain under the test's folder,
  closes them all at the end, also on failure, and hands the tails of the
  nodes' logs to the failure report.

Every wait is bounded. Databases are compared with the ``sqlite3`` program's
``.dump`` (:func:`dump`), never Python's ``iterdump``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cldcb.node.rpc import LightningdNotRunning, LightningRpc, RpcTransportError
from helpers.environment import DATA, missing, require_tool
from helpers.servers import free_port

NETWORK = "regtest"
CLN_DATA = DATA / "cln"
FAKECHAIN = CLN_DATA / "fakechain.py"
CHAINCTL = CLN_DATA / "chainctl.py"
ENV_VAR = "CLDCB_LIGHTNINGD"
HOW_TO_GET = (f"set {ENV_VAR} to a lightningd binary (for example: unpack "
              "../shared/cln/core-lightning-*.tar.xz and point it at "
              "core-lightning/bin/lightningd) or put lightningd on PATH")


def find_lightningd() -> Path | None:
    """``$CLDCB_LIGHTNINGD`` if set (it must be an executable), else ``lightningd`` on PATH."""
    given = os.environ.get(ENV_VAR)
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(f"{ENV_VAR}={given} is not an executable file")
        return path
    found = shutil.which("lightningd")
    return Path(found) if found else None


def require_lightningd() -> Path:
    path = find_lightningd()
    if path is None:
        missing(f"no real lightningd: {HOW_TO_GET}")
    return path


def dump(db: Path) -> bytes:
    """The ``sqlite3`` program's ``.dump`` of ``db`` (read-only)."""
    sqlite = require_tool("sqlite3")
    out = subprocess.run([sqlite, f"file:{db}?mode=ro", ".dump"], capture_output=True,
                         check=True, timeout=120)
    return out.stdout


def data_version(db: Path) -> int:
    """``vars.data_version``. Not read-only: after lightningd was killed mid-transaction
    its rollback journal is hot, and only a connection that may write can roll it back
    (as lightningd's next start would); a read-only one fails with "attempt to write a
    readonly database"."""
    conn = sqlite3.connect(db, timeout=60)
    try:
        row = conn.execute("SELECT intval FROM vars WHERE name = 'data_version'").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             every: float = 0.2) -> Any:
    """Call ``check`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@dataclass
class Chain:
    """The fake regtest chain shared by nodes through ``FAKECHAIN_DIR``."""

    folder: Path

    def ctl(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, str(CHAINCTL), "--dir", str(self.folder), *args],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"chainctl {' '.join(args)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def mine(self, n: int, address: str | None = None) -> int:
        """Mine ``n`` blocks (paying ``address`` if given); the new height."""
        args = ["mine", str(n)] + (["--address", address] if address else [])
        return int(self.ctl(*args)["height"])

    def height(self) -> int:
        return int(self.ctl("info")["height"])


@dataclass
class RealNode:
    """One real lightningd on regtest in ``lightning_dir``."""

    name: str
    lightning_dir: Path
    lightningd: Path
    chain: Chain
    #: ``--developer --dev-bitcoind-poll=1``: blocks are seen within a second; fresh
    #: tables get STRICT (so such a database is not a production one's, which only
    #: matters against recorded traces)
    developer: bool = True
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def network_dir(self) -> Path:
        return self.lightning_dir / NETWORK

    @property
    def database(self) -> Path:
        return self.network_dir / "lightningd.sqlite3"

    @property
    def log_path(self) -> Path:
        """Beside the lightning-dir, so that it outlives a wiped node."""
        return self.lightning_dir.parent / f"{self.name}.log"

    @property
    def stdout_path(self) -> Path:
        return self.lightning_dir.parent / f"{self.name}.stdout"

    @property
    def rpc(self) -> LightningRpc:
        return LightningRpc.for_node(self.lightning_dir, NETWORK, timeout=120.0)

    def call(self, method: str, **params: Any) -> Any:
        return self.rpc.call(method, params)

    def args(self) -> list[str]:
        args = [str(self.lightningd), f"--network={NETWORK}",
                f"--lightning-dir={self.lightning_dir}", "--disable-plugin=bcli",
                f"--plugin={FAKECHAIN}", f"--bind-addr=127.0.0.1:{self.port}",
                "--announce-addr-discovered=false", "--disable-dns",
                f"--log-file={self.log_path}", "--log-level=debug"]
        if self.developer:
            args += ["--developer", "--dev-bitcoind-poll=1"]
        return args

    def start(self, wait: bool = True, timeout: float = 60.0) -> RealNode:
        """Start lightningd; with ``wait``, until ``getinfo`` answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.network_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FAKECHAIN_DIR=str(self.chain.folder))
        env.pop("CLDCB_SERVER_DIR", None)
        self.starts += 1
        with open(self.stdout_path, "ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, env=env, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise AssertionError(f"lightningd {self.name} exited with "
                                     f"{self.proc and self.proc.returncode} before it was "
                                     f"ready:\n{self.tail()}")
            try:
                return self.rpc.getinfo()
            except (LightningdNotRunning, RpcTransportError):
                time.sleep(0.1)
        raise AssertionError(f"lightningd {self.name} not ready after {timeout} s")

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lightningd {self.name} still running after {timeout} s:\n"
                                 f"{self.tail()}") from None

    def stop(self, timeout: float = 60.0) -> int:
        """``stop`` over RPC, then wait until lightningd exited (bounded)."""
        if not self.running():
            return self.proc.returncode if self.proc else 0
        try:
            self.call("stop")
        except (LightningdNotRunning, RpcTransportError):
            pass  # it went away while answering: wait for it below
        code = self.wait_exit(timeout)
        self._end_group()
        return code

    def kill(self) -> int:
        """SIGKILL lightningd alone (its plugins see their stdin close, as in a crash)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        code = self.wait_exit(30)
        self._end_group(grace=10.0)
        return code

    def _end_group(self, grace: float = 10.0) -> None:
        """Wait for what lightningd started to go, then SIGKILL whatever is left of its
        process group (plugins, subdaemons): nothing outlives the node."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """End lightningd and everything it started, by pid, without asking."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self._end_group(grace=0)

    def tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.log_path, self.stdout_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} of {self.name} (last {len(text)} lines)\n"
                             + "\n".join(text))
        return "\n".join(parts)

    # --- what tests ask of a node -----------------------------------------------------

    def node_id(self) -> str:
        return self.rpc.node_id()

    def newaddr(self) -> str:
        return str(self.call("newaddr", addresstype="bech32")["bech32"])

    def wait_blockheight(self, height: int, timeout: float = 90.0) -> None:
        self.rpc.call("waitblockheight", {"blockheight": height, "timeout": int(timeout)},
                      timeout=timeout + 10)

    def workload(self, tag: str, rounds: int = 10) -> None:
        """Real RPC calls that write: invoices, datastore (every mode), addresses,
        delinvoice, deldatastore."""
        for i in range(rounds):
            self.call("invoice", amount_msat=1000 * (i + 1), label=f"{tag}-inv{i}",
                      description=f"{tag} invoice {i}")
            self.call("datastore", key=[tag, f"k{i}"], string=f"value {i} " * (i * 20 + 1))
            self.call("datastore", key=[tag, f"k{i}"], string="again",
                      mode="create-or-append")
            if i % 3 == 0:
                self.newaddr()
        self.call("datastore", key=[tag, "k0"], hex="00ff" * 300, mode="must-replace")
        self.call("delinvoice", label=f"{tag}-inv1", status="unpaid")
        self.call("deldatastore", key=[tag, "k2"])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie member still counts; reap our direct child if it is one.
    return any(_in_group(pid, pgid) for pid in _pids())


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _in_group(pid: int, pgid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[2]) == pgid and fields[0] != "Z"


class RealCln:
    """Nodes and a chain under one folder; :meth:`close` ends them all."""

    def __init__(self, root: Path, lightningd: Path) -> None:
        self.root = root
        self.lightningd = lightningd
        self.chain = Chain(root / "chain")
        self.chain.folder.mkdir(parents=True, exist_ok=True)
        self.nodes: list[RealNode] = []
        self._lock = threading.Lock()

    def node(self, name: str, developer: bool = True,
             lightning_dir: Path | None = None) -> RealNode:
        """A node (not started) in ``lightning_dir`` (default: a new folder ``name``)."""
        folder = lightning_dir or self.root / name
        (folder / NETWORK).mkdir(parents=True, exist_ok=True)
        node = RealNode(name, folder, self.lightningd, self.chain, developer=developer)
        with self._lock:
            self.nodes.append(node)
        return node

    def tails(self) -> str:
        return "\n".join(n.tail() for n in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
