"""``cldcb-plugin WRAPPER_PATH``: the Core Lightning plugin (started through the wrapper).

lightningd runs ``cldcb-plugin-wrapper``, which ``exec``s this program with
its own path as the only argument, in ``<lightning-dir>/<network>`` with
``LIGHTNINGD_PLUGIN=1``. The configuration is read from the wrapper before
anything is answered, because ``db_write`` calls arrive before ``init``.

Protocol (JSON-RPC 2.0 on stdin/stdout, see :mod:`cldcb.plugin.jsonrpc`):

- ``getmanifest`` → the ``db_write`` hook, the ``shutdown`` subscription,
  ``dynamic``, ``nonnumericids``, no options, no RPC methods;
- ``init`` → ``{}``;
- ``db_write`` → ``{"result": "continue"}`` once ``quorum`` servers hold the
  change, else ``{"result": "fail", "error": "…"}``, which makes lightningd
  stop without committing (it accepts nothing but ``continue``);
- ``shutdown`` (notification): lightningd keeps the hook of a plugin that
  subscribed to it registered while it waits (up to 30 s) for plugins to
  exit, and it may still commit then. So the plugin goes on answering calls
  and exits only once no call came for :data:`SHUTDOWN_QUIET` seconds;
- SIGTERM or the end of stdin: finish the call in progress, let in-flight
  writes land, write the status file and exit.

Calls are answered one at a time, in order; lightningd never calls the hook
again before the previous call was answered. The plugin never calls
lightningd's RPC (inside the hook that would deadlock lightningd).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from cldcb import __version__
from cldcb.cli_common import require_protocol_pipes
from cldcb.connection import Connection
from cldcb.errors import CldcbError, ExitCode, PluginError
from cldcb.malloc import keep_freed_memory
from cldcb.nodedb import remove_stale_copies
from cldcb.plugin import jsonrpc, links
from cldcb.plugin.engine import Engine, HookResult
from cldcb.plugin.links import ServerConnection
from cldcb.plugin.mirror import MIRROR_NAME
from cldcb.plugin.snapshot import CHUNK_SIZE
from cldcb.plugin.status import STATUS_NAME, StatusWriter
from cldcb.plugin.wrapper import WrapperConfig, exposed, read_wrapper
from cldcb.session import Role

MANIFEST: dict[str, Any] = {
    "options": [],
    "rpcmethods": [],
    "hooks": [{"name": "db_write"}],
    "subscriptions": ["shutdown"],
    "dynamic": True,
    "nonnumericids": True,
}
CONNECT_TIMEOUT = 10.0
SHUTDOWN_QUIET = 2.0
"""After ``shutdown``, exit once no db_write call came for this many seconds."""

#: Test knobs (never secrets): slow down background snapshot uploads, smaller chunks.
ENV_CHUNK_DELAY = "CLDCB_PLUGIN_TEST_CHUNK_DELAY"
ENV_CHUNK_SIZE = "CLDCB_PLUGIN_TEST_CHUNK_SIZE"
ENV_COMPACTION_INTERVAL = "CLDCB_PLUGIN_TEST_COMPACTION_INTERVAL"
"""... and the least time between two snapshots (bench/stall.py puts compaction off with it)."""


class Plugin:
    """The plugin process: stdin/stdout protocol around an :class:`Engine`."""

    def __init__(self, cfg: WrapperConfig, wrapper_path: Path, workdir: Path) -> None:
        self.cfg = cfg
        self.wrapper_path = wrapper_path
        self.workdir = workdir
        self.specs = {e.address: e.spec() for e in cfg.servers}
        self.out = jsonrpc.StdoutWriter(sys.stdout.fileno())
        self._manifest_sent = False
        self._early_logs: list[dict[str, Any]] = []
        self._stop = asyncio.Event()
        self._calls: asyncio.Queue[tuple[Any, dict[str, Any]] | None] = asyncio.Queue()
        self._gone = False
        self._last_call = 0.0
        self._lingering: asyncio.Task[None] | None = None
        delay = float(os.environ.get(ENV_CHUNK_DELAY, "0") or 0)
        size = int(os.environ.get(ENV_CHUNK_SIZE, str(CHUNK_SIZE)) or CHUNK_SIZE)
        if os.environ.get(ENV_COMPACTION_INTERVAL):
            links.COMPACTION_MIN_INTERVAL = float(os.environ[ENV_COMPACTION_INTERVAL])
        self.engine = Engine(cfg, workdir, self._connect, emit=self.log, chunk_delay=delay,
                             chunk_size=size,
                             mirror_path=workdir / MIRROR_NAME if cfg.mirror else None)
        self.status = StatusWriter(workdir / STATUS_NAME)
        self.engine.on_change = self._status_dirty

    async def _connect(self, entry: Any) -> ServerConnection:
        spec = self.specs[entry.address]
        return await Connection.open(spec, self.cfg.client_priv, Role.WRITER,
                                     timeout=spec.timeout(CONNECT_TIMEOUT))

    # -- output -----------------------------------------------------------------------------
    def _send(self, message: dict[str, Any] | bytes) -> None:
        if self._gone:
            return
        try:
            self.out.write(message if isinstance(message, bytes) else jsonrpc.encode(message))
        except (BrokenPipeError, OSError):
            self._gone = True
            self._stop.set()

    def log(self, level: str, message: str) -> None:
        note = jsonrpc.notification("log", {"level": level, "message": f"cldcb: {message}"})
        if not self._manifest_sent:
            self._early_logs.append(note)
            return
        self._send(note)

    def _status_dirty(self) -> None:
        self.status.dirty = True

    # -- input ------------------------------------------------------------------------------
    def _dispatch(self, msg: dict[str, Any]) -> None:
        method = msg.get("method")
        msg_id = msg.get("id")
        params = msg.get("params") or {}
        if method == "db_write" and msg_id is not None:
            call = params if isinstance(params, dict) else {}
            hot = self._calls.empty() and _well_formed(call) and self.engine.db_write_now(
                call["data_version"], call["writes"], lambda result: self._answer(msg_id, result))
            self._last_call = time.monotonic()
            if hot:
                return      # the hot path: answered from a connection callback
            self._calls.put_nowait((msg_id, call))
        elif method == "getmanifest":
            self._send(jsonrpc.response(msg_id, MANIFEST))
            self._manifest_sent = True
            for note in self._early_logs:
                self._send(note)
            self._early_logs.clear()
        elif method == "init":
            self._send(jsonrpc.response(msg_id, {}))
        elif method == "shutdown":
            self.log("info", "lightningd is shutting down; still answering db_write calls "
                             "until they stop")
            if self._lingering is None:
                self._lingering = asyncio.get_running_loop().create_task(self._linger())
        elif msg_id is not None:
            self._send(jsonrpc.error_response(msg_id, -32601, f"unknown method {method!r}"))

    async def _hook_worker(self) -> None:
        while True:
            item = await self._calls.get()
            if item is None:
                return
            msg_id, params = item
            if _well_formed(params):
                result = await self.engine.db_write(params["data_version"], params["writes"])
            else:
                result = HookResult(False, "malformed db_write call (data_version must be an "
                                           "integer, writes a list of strings)")
            self._answer(msg_id, result)

    def _answer(self, msg_id: Any, result: HookResult) -> None:
        if result.ok:
            self._send(jsonrpc.encode_continue(msg_id))
        else:
            self._send(jsonrpc.response(msg_id, {"result": "fail",
                                                 "error": f"cldcb: {result.message}"}))
        self._last_call = time.monotonic()
        self.status.dirty = True

    async def _read_stdin(self) -> None:
        """Parse stdin as it arrives (in the protocol callback: no extra hop); return at EOF."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        await loop.connect_read_pipe(lambda: _StdinProtocol(self, done),
                                     os.fdopen(sys.stdin.fileno(), "rb", buffering=0,
                                               closefd=False))
        await done

    async def _linger(self) -> None:
        """After ``shutdown``: stop once the queue is empty and calls stopped coming."""
        while True:
            quiet = time.monotonic() - self._last_call
            if self._calls.empty() and not self.engine.busy and quiet >= SHUTDOWN_QUIET:
                self._stop.set()
                return
            await asyncio.sleep(max(0.05, SHUTDOWN_QUIET - quiet))

    async def _status_loop(self) -> None:
        while True:
            if self.status.due():
                # written (and fsynced) in a thread: the hook never waits on it
                state = self.engine.describe()
                self.status.taken()
                await asyncio.to_thread(self.status.write, state)
            await asyncio.sleep(0.2)

    # -- life -------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        os.set_blocking(sys.stdout.fileno(), True)
        removed = remove_stale_copies(self.workdir)
        if exposed(self.wrapper_path):
            self.log("unusual", f"{self.wrapper_path} holds a secret key but is readable by "
                                "other users: chmod 700 it")
        if removed:
            self.log("info", f"removed {removed} snapshot copies left by an earlier run")
        self.engine.start()
        gc.freeze()    # what was loaded so far lives as long as the plugin: GC skips it
        worker = loop.create_task(self._hook_worker())
        reader = loop.create_task(self._read_stdin())
        status = loop.create_task(self._status_loop())
        stop = loop.create_task(self._stop.wait())
        code = 0
        try:
            done, _ = await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and reader.exception() is not None:
                exc = reader.exception()
                print(f"cldcb-plugin: error: {exc}", file=sys.stderr)
                code = 1
        finally:
            reader.cancel()
            stop.cancel()
            self._calls.put_nowait(None)
            try:
                await asyncio.wait_for(worker, timeout=self.cfg.outage_limit + 5)
                await self.engine.wait_idle(self.cfg.outage_limit + 5)
            except (TimeoutError, asyncio.CancelledError):
                worker.cancel()
            await self.engine.close()
            status.cancel()
            self.status.write(self.engine.describe())
        return code


def _well_formed(params: dict[str, Any]) -> bool:
    dv = params.get("data_version")
    writes = params.get("writes")
    return (isinstance(dv, int) and not isinstance(dv, bool) and isinstance(writes, list)
            and all(isinstance(w, str) for w in writes))


class _StdinProtocol(asyncio.Protocol):
    def __init__(self, plugin: Plugin, done: asyncio.Future[None]) -> None:
        self._plugin = plugin
        self._done = done
        self._decoder = jsonrpc.MessageDecoder()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except CldcbError as exc:
            if not self._done.done():
                self._done.set_exception(exc)
            return
        for msg in messages:
            self._plugin._dispatch(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


USAGE = ("usage: cldcb-plugin [--debug] WRAPPER_PATH\n\nThe cldcb backup plugin for Core "
         "Lightning. lightningd starts it through cldcb-plugin-wrapper\n(written by "
         "`cldcb-client installplugin`); it is not meant to be run by hand.\n\n"
         "  --version  print the version and exit\n"
         "  --debug    show a traceback when it stops on an error\n"
         "  --help     show this and exit")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:
        print(f"cldcb-plugin {__version__}")
        return 0
    if "-h" in args or "--help" in args:
        print(USAGE)
        return 0
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return ExitCode.USAGE
    wrapper = Path(args[0])
    keep_freed_memory()
    try:
        require_protocol_pipes("cldcb-plugin (through cldcb-plugin-wrapper)",
                               "lightningd (`important-plugin=` in its config)")
        cfg = read_wrapper(wrapper)
        for e in cfg.servers:
            e.spec()
    except CldcbError as exc:
        return _failed(exc, debug)
    workdir = Path.cwd()
    try:
        return asyncio.run(Plugin(cfg, wrapper, workdir).run())
    except PluginError as exc:
        return _failed(exc, debug)
    except KeyboardInterrupt:
        return 130


def _failed(exc: CldcbError, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    print(f"cldcb-plugin: error: {exc}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
