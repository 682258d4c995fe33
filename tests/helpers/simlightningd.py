"""A simulated lightningd, faithful where the backup plugin can tell the difference.

What it does like Core Lightning v26.06 (see ``traces/README.md``):

- starts the plugin by running the wrapper's path (argv[0] is that path) with
  the working directory ``<lightning-dir>/<network>`` and
  ``LIGHTNINGD_PLUGIN=1``, ``LIGHTNINGD_VERSION`` in the environment, stdin
  and stdout as pipes; JSON-RPC 2.0 messages separated by blank lines, ids
  like ``"cln:db_write#64"``;
- ``getmanifest`` first (60 s to answer), then ``db_write`` calls **before**
  ``init`` (the schema and migrations), then ``init`` with the configuration
  object (``lightning-dir`` is the network folder, ``rpc-file``,
  ``network``, ``startup``, ``feature_set``), then the rest;
- a real SQLite database with ``PRAGMA foreign_keys = ON``; each normal
  batch: ``BEGIN``, its statements, the hook call **with the transaction
  open**, ``COMMIT`` on ``{"result": "continue"}``, ``ROLLBACK`` and stop on
  anything else (a lightningd ``fatal()``). PRAGMA-only calls run outside any
  transaction (the hook first, then the statements);
- when the plugin dies: an important plugin stops the node without committing
  the pending batch; a non-important one is forgotten and the node goes on
  committing with no hook at all;
- ``shutdown`` notification on stop, then up to 30 s for the plugin to exit;
- ``cache_size`` (pages) makes big transactions spill SQLite's page cache and
  take the EXCLUSIVE lock before COMMIT: the hazard of DESIGN section 5.

A trace (``tests/helpers/traces.py``) is played with :meth:`SimLightningd.run_trace`,
which also replays the trace's crashes: a normal batch followed by another
normal batch with the same data_version was never committed (lightningd died
between the hook and COMMIT), so the simulator rolls it back and restarts
the node (and its plugin) there.

Run as a program to play a trace against a wrapper::

    cd tests && python -m helpers.simlightningd --lightning-dir DIR --wrapper PATH \
        --trace cln-channels
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cldcb.core.dataversion import Kind, classify
from cldcb.node.jsonrpc import MessageDecoder, encode

LIGHTNINGD_VERSION = "v26.06"
MANIFEST_TIMEOUT = 60.0
DEFAULT_INIT_AFTER = 5


class NodeStopped(Exception):
    """The simulated lightningd stopped (a refused hook, an important plugin died)."""

    def __init__(self, reason: str, data_version: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.data_version = data_version


class HookTimeout(Exception):
    """The plugin did not answer a hook call in time: a hang, as far as a test is concerned."""


@dataclass
class Call:
    """One hook call as the simulator saw it."""

    index: int
    data_version: int
    kind: Kind
    sent_at: float
    answered_at: float | None = None
    outcome: str = ""              # committed | refused | plugin-died | no-hook
    answer: Any = None

    @property
    def latency(self) -> float | None:
        return None if self.answered_at is None else self.answered_at - self.sent_at


@dataclass
class LogLine:
    at: float
    level: str
    message: str


class PluginProcess:
    """The plugin as lightningd runs it: one thread pumps both pipes, like lightningd's
    event loop (a request is written while whatever the plugin writes is read, so a
    full pipe can never deadlock the two)."""

    def __init__(self, wrapper: Path, cwd: Path, env: dict[str, str], stderr_path: Path,
                 on_log: Callable[[LogLine], None]) -> None:
        self._stderr = open(stderr_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(wrapper)], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr)
        self.pid = self.proc.pid
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        self._decoder = MessageDecoder()
        self._responses: dict[Any, dict[str, Any]] = {}
        self._eof = False
        self._in_closed = False
        self._on_log = on_log
        self._next_id = 0
        self.notifications: list[dict[str, Any]] = []

    def _read_once(self) -> None:
        try:
            data = os.read(self._out, 1 << 20)
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return
        for msg in self._decoder.feed(data):
            if "id" in msg and ("result" in msg or "error" in msg):
                self._responses[msg["id"]] = msg
            elif msg.get("method") == "log":
                p = msg.get("params") or {}
                self._on_log(LogLine(time.monotonic(), str(p.get("level")),
                                     str(p.get("message"))))
            else:
                self.notifications.append(msg)

    def send(self, message: dict[str, Any]) -> bool:
        """Write a whole message (reading meanwhile); False if the plugin is gone."""
        return self.send_raw(encode(message))

    def send_raw(self, encoded: bytes) -> bool:
        """:meth:`send` for bytes already encoded (also bytes no lightningd would send)."""
        if self._in_closed:
            return False
        data = memoryview(encoded)
        try:                      # the usual case: the pipe has room for all of it
            data = data[os.write(self._in, data):]
        except BlockingIOError:
            pass
        except (BrokenPipeError, OSError):
            return False
        while data:
            if self._eof:
                return False
            readable, writable, _ = select.select([self._out], [self._in], [], 1.0)
            if readable:
                self._read_once()
            if writable:
                try:
                    data = data[os.write(self._in, data):]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, OSError):
                    return False
        return True

    def request(self, method: str, params: Any, timeout: float) -> dict[str, Any] | None:
        """Send a request and wait for its response; None if the plugin died first."""
        self._next_id += 1
        req_id = f"cln:{method}#{self._next_id}"
        if not self.send({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params}):
            return None
        return self.wait_response(req_id, timeout)

    def wait_response(self, req_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while req_id not in self._responses:
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HookTimeout(f"no answer to {req_id} within {timeout:.0f} s")
            readable, _, _ = select.select([self._out], [], [], remaining)
            if readable:
                self._read_once()
        return self._responses.pop(req_id)

    def pump(self, seconds: float) -> None:
        """Read whatever the plugin writes for ``seconds`` (logs between calls)."""
        deadline = time.monotonic() + seconds
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select([self._out], [], [], remaining)
            if readable:
                self._read_once()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 30.0) -> int | None:
        """Close stdin, read until the plugin exits (``timeout``), then SIGKILL."""
        if not self._in_closed:
            self._in_closed = True
            try:
                os.close(self._in)
                self.proc.stdin = None
            except OSError:
                pass
        self.pump(timeout)
        try:
            self.proc.wait(0 if self._eof else 1)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(max(0.0, timeout))
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode


@dataclass
class SimLightningd:
    """See the module docstring. ``wrapper`` None runs the node with no plugin."""

    lightning_dir: Path
    wrapper: Path | None = None
    network: str = "regtest"
    important: bool = True
    cache_size: int | None = None
    db_name: str = "lightningd.sqlite3"
    env: dict[str, str] = field(default_factory=dict)
    hook_timeout: float = 120.0
    calls: list[Call] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)
    plugin: PluginProcess | None = None
    stopped: str | None = None
    initialized: bool = False

    def __post_init__(self) -> None:
        self.network_dir = Path(self.lightning_dir) / self.network
        self.network_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.network_dir / self.db_name
        self.db: sqlite3.Connection | None = None
        self._call_index = 0
        self._lock = threading.Lock()

    # -- the node ----------------------------------------------------------------------------
    def open_db(self) -> None:
        self.db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA foreign_keys = ON")
        if self.cache_size is not None:
            self.db.execute(f"PRAGMA cache_size = {int(self.cache_size)}")

    def start(self, *, plugin: bool = True) -> SimLightningd:
        """Open the database and start the plugin (getmanifest); init comes later."""
        self.stopped = None
        self.initialized = False
        self.open_db()
        if plugin and self.wrapper is not None:
            self.start_plugin(init=False)
        return self

    def start_plugin(self, *, init: bool = True) -> PluginProcess:
        """Start the plugin (at node start, or ``plugin start`` at run time with ``init``)."""
        assert self.wrapper is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNINGD_")}
        env.update(self.env)
        env.update({"LIGHTNINGD_PLUGIN": "1", "LIGHTNINGD_VERSION": LIGHTNINGD_VERSION})
        self.plugin = PluginProcess(self.wrapper, self.network_dir, env,
                                    self.network_dir / "plugin-stderr.log", self._on_log)
        answer = self.plugin.request("getmanifest", {"allow-deprecated-apis": False},
                                     MANIFEST_TIMEOUT)
        if answer is None or "result" not in answer:
            self._plugin_died("the plugin died before answering getmanifest")
        else:
            check_manifest(answer["result"])
        if init:
            self.init()
        return self.plugin

    def init(self) -> None:
        if self.plugin is None or self.initialized:
            self.initialized = True
            return
        config = {"lightning-dir": str(self.network_dir), "rpc-file": "lightning-rpc",
                  "startup": True, "network": self.network,
                  "feature_set": {"init": "08a0000a0a69a2", "node": "88a0000a0a69a2",
                                  "channel": "", "invoice": "02000002024100"}}
        answer = self.plugin.request("init", {"options": {}, "configuration": config},
                                     MANIFEST_TIMEOUT)
        if answer is None:
            self._plugin_died("the plugin died before answering init")
        self.initialized = True

    def _on_log(self, line: LogLine) -> None:
        with self._lock:
            self.logs.append(line)

    def log_messages(self) -> list[str]:
        with self._lock:
            return [f"{x.level}: {x.message}" for x in self.logs]

    def _plugin_died(self, why: str) -> None:
        if self.plugin is not None:
            self.plugin.close(5)
        self.plugin = None
        if self.important:
            self._stop_node(f"important plugin died: {why}")

    def _stop_node(self, reason: str) -> None:
        if self.db is not None and self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.stopped = reason
        raise NodeStopped(reason, self.committed_data_version())

    def committed_data_version(self) -> int:
        """``vars.data_version`` as committed (read on a fresh connection)."""
        if not self.db_path.exists():
            return 0
        c = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            if c.execute("SELECT count(*) FROM sqlite_schema WHERE name='vars'").fetchone()[0]:
                row = c.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()
                return int(row[0]) if row else 0
            return 0
        finally:
            c.close()

    # -- one call ---------------------------------------------------------------------------
    def db_write(self, data_version: int, writes: Sequence[str], *,
                 commit: bool = True, on_sent: Callable[[Call], None] | None = None) -> Call:
        """One batch the way lightningd runs it; raises NodeStopped when the node stops.

        ``commit`` False plays a batch lightningd sent to the hook but never
        committed (it died in between): rolled back, the node stops.
        """
        if self.stopped:
            raise NodeStopped(f"the node is stopped ({self.stopped})")
        assert self.db is not None
        kind = classify(writes)
        if kind is Kind.NORMAL:
            self.db.execute("BEGIN")
            try:
                for stmt in writes:
                    self.db.execute(stmt)
            except sqlite3.Error:
                self.db.execute("ROLLBACK")
                raise
        call = Call(self._call_index, data_version, kind, time.monotonic())
        self._call_index += 1
        self.calls.append(call)
        if self.plugin is None:
            call.outcome = "no-hook"
        else:
            req_id = f"cln:db_write#{call.index + 1}"
            request = encode({"jsonrpc": "2.0", "id": req_id, "method": "db_write",
                              "params": {"data_version": data_version, "writes": list(writes)}})
            call.sent_at = time.monotonic()          # the call built, as it is when written
            sent = self.plugin.send_raw(request)
            if on_sent is not None:
                on_sent(call)
            answer = self.plugin.wait_response(req_id, self.hook_timeout) if sent else None
            call.answered_at = time.monotonic()
            call.answer = answer
            if answer is None:
                call.outcome = "plugin-died"
                self._plugin_died(f"during db_write {data_version}")
            else:
                result = answer.get("result")
                if not (isinstance(result, dict) and result.get("result") == "continue"):
                    call.outcome = "refused"
                    self._stop_node(f"Plugin returned failed db_write: {json.dumps(answer)}")
        if not commit:
            call.outcome = call.outcome or "uncommitted"
            self._stop_node(f"lightningd died before committing data_version {data_version}")
        if kind is Kind.NORMAL:
            self.db.execute("COMMIT")
        else:
            for stmt in writes:
                self.db.execute(stmt)
        call.outcome = call.outcome or "committed"
        return call

    # -- traces ------------------------------------------------------------------------------
    def run_trace(self, trace: Sequence[tuple[int, Sequence[str]]], *, start: int = 0,
                  stop: int | None = None, init_after: int = DEFAULT_INIT_AFTER,
                  before_call: Callable[[int, SimLightningd], None] | None = None,
                  on_sent: Callable[[Call], None] | None = None,
                  replay_crashes: bool = True) -> int:
        """Play calls ``start..stop`` of a trace; returns the index after the last one played.

        ``init`` is sent before call ``init_after`` (if not sent yet). Uncommitted batches
        of the trace (see the module docstring) are rolled back and the node restarted.
        Raises NodeStopped if the node stops for another reason.
        """
        end = len(trace) if stop is None else stop
        i = start
        while i < end:
            if i >= init_after and not self.initialized:
                self.init()
            if before_call is not None:
                before_call(i, self)
            dv, writes = trace[i]
            crash = replay_crashes and uncommitted(trace, i)
            try:
                self.db_write(dv, writes, commit=not crash, on_sent=on_sent)
            except NodeStopped:
                if not crash or self.stopped is None or "before committing" not in self.stopped:
                    raise
                self.restart()
                init_after = i + 2
            i += 1
        return i

    def restart(self) -> None:
        """lightningd died and starts again: the plugin is restarted too."""
        self.crash()
        self.start()

    def crash(self) -> None:
        """lightningd dies: nothing committed, the plugin sees its stdin close (no shutdown)."""
        if self.plugin is not None:
            self.plugin.close(30)
            self.plugin = None
        self._close_db()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the node: ``shutdown`` to the plugin, up to ``timeout`` s for it to exit."""
        if self.plugin is not None:
            self.plugin.send({"jsonrpc": "2.0", "method": "shutdown", "params": {}})
            self.plugin.close(timeout)
            self.plugin = None
        self._close_db()

    def _close_db(self) -> None:
        """Close the database, rolling back what was not committed."""
        if self.db is not None:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.db.close()
            self.db = None

    def freeze_plugin(self) -> None:
        """SIGSTOP the plugin: it reads and answers nothing more (until it is killed). So a
        call sent next is certain to be still unanswered when the plugin is killed: a
        plugin that answers within the moment between the send and the kill would make a
        kill "during" a call a race."""
        assert self.plugin is not None
        os.kill(self.plugin.pid, signal.SIGSTOP)

    def kill_plugin(self, sig: int = signal.SIGKILL) -> None:
        assert self.plugin is not None
        os.kill(self.plugin.pid, sig)
        self.plugin.proc.wait(10)


def uncommitted(trace: Sequence[tuple[int, Sequence[str]]], i: int) -> bool:
    """True if call ``i`` is a normal batch the next normal batch replaces (same
    data_version, nothing in between): lightningd died before committing it."""
    if i + 1 >= len(trace):
        return False
    dv, writes = trace[i]
    ndv, nwrites = trace[i + 1]
    return classify(writes) is Kind.NORMAL and classify(nwrites) is Kind.NORMAL and ndv == dv


def check_manifest(manifest: Any) -> None:
    """Raise AssertionError unless the manifest is what a db_write backup plugin needs."""
    assert isinstance(manifest, dict), manifest
    hooks = [h["name"] if isinstance(h, dict) else h for h in manifest.get("hooks", [])]
    assert "db_write" in hooks, manifest
    assert "shutdown" in manifest.get("subscriptions", []), manifest
    assert manifest.get("dynamic") is True, manifest
    assert manifest.get("nonnumericids") is True, manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lightning-dir", type=Path, required=True)
    ap.add_argument("--network", default="regtest")
    ap.add_argument("--wrapper", type=Path)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--not-important", action="store_true")
    ap.add_argument("--cache-size", type=int)
    args = ap.parse_args(argv)
    from helpers.traces import load_trace

    node = SimLightningd(args.lightning_dir, args.wrapper, network=args.network,
                         important=not args.not_important, cache_size=args.cache_size)
    node.start()
    trace = load_trace(args.trace)
    try:
        node.run_trace(trace)
    except NodeStopped as exc:
        print(f"node stopped: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        node.close()
    lat = sorted(c.latency for c in node.calls if c.latency is not None)
    if lat:
        print(f"{len(lat)} calls, p50 {lat[len(lat) // 2] * 1e3:.2f} ms, "
              f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
    print(f"committed data_version {node.committed_data_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
