"""A simulated running lightningd: its JSON-RPC socket in front of a SimLightningd.

:class:`SimRpcNode` serves ``<lightning-dir>/<network>/lightning-rpc`` like
Core Lightning v26.06 does for the calls cldcb-client makes:

- ``getinfo``: the node id of a real ``hsm_secret`` from ``tests/data/cln-keys.json``;
- ``signmessage``: signed exactly as Core Lightning signs, with that node key:
  over the message text **as it appears inside the JSON string received**,
  without unescaping (a message with ``\\`` or ``"`` signs differently from
  what the client meant, which is why cldcb keeps it plain ASCII);
- ``listconfigs``: the v23.08+ shape (``{"configs": {name: {"value_str":…}}}``),
  with ``wallet`` when one is set;
- ``plugin start|stop|list``: ``start`` really launches the wrapper the way
  lightningd does (:class:`simlightningd.SimLightningd`: ``getmanifest``, then
  ``init``, then the answer; a plugin started at run time is not important)
  and refuses a path already registered, as lightningd does;
- ``datastore`` / ``deldatastore``: a database write, hence a ``db_write`` hook
  call; the simulator plays the next call of the real trace instead of
  inventing SQL (the answer comes after the hook answered and the batch was
  committed, as in lightningd);
- anything else: ``Unknown command``.

The node itself is a :class:`SimLightningd` playing a real trace: the first
``preplay`` calls are committed before anything is installed (a node that was
running without a backup); :meth:`SimRpcNode.feed` plays more of it.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from cldcb.node.nodekey import LocalNodeKey
from helpers.environment import DATA
from helpers.simlightningd import NodeStopped, SimLightningd
from helpers.traces import load_trace

KEYS = json.loads((DATA / "cln-keys.json").read_text())
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
PLUGIN_ERROR = -3


def vector(name: str = "plain32") -> dict[str, Any]:
    """The ``hsm_secrets`` entry of cln-keys.json called ``name``."""
    return next(v for v in KEYS["hsm_secrets"] if v["name"] == name)


def _raw_message(raw: str) -> str | None:
    """The ``message`` parameter exactly as written in the request (not unescaped)."""
    m = (re.search(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"', raw)
         or re.search(r'"params"\s*:\s*\[\s*"((?:[^"\\]|\\.)*)"', raw))
    return m.group(1) if m else None


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SimRpcNode:
    """See the module docstring. Use :meth:`start` and :meth:`close` (or ``with``)."""

    def __init__(self, lightning_dir: Path, *, network: str = "regtest",
                 hsm: str = "plain32", trace: str = "cln-workload", preplay: int = 120,
                 wallet: str | None = None, db_name: str = "lightningd.sqlite3",
                 write_hsm_secret: bool = True, broken_plugin: bool = False) -> None:
        self.lightning_dir = Path(lightning_dir)
        self.network = network
        v = vector(hsm)
        file_bytes = bytes.fromhex(v["file_hex"])
        self.node_key = LocalNodeKey.from_hsm_secret_bytes(file_bytes, v["passphrase"])
        assert self.node_key.node_id == v["node_id"]
        self.sim = SimLightningd(self.lightning_dir, None, network=network, important=False,
                                 db_name=db_name)
        self.network_dir = self.sim.network_dir
        if write_hsm_secret:
            secret = self.network_dir / "hsm_secret"
            secret.write_bytes(file_bytes)
            secret.chmod(0o400)
        self.rpc_path = self.network_dir / "lightning-rpc"
        self.wallet = wallet
        self.broken_plugin = broken_plugin  # plugins die before answering getmanifest
        self.trace = load_trace(trace)
        self.preplay = preplay
        self.next_call = 0
        self.methods: list[str] = []
        self.lock = threading.RLock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    # -- life ----------------------------------------------------------------------
    def start(self) -> SimRpcNode:
        self.sim.start(plugin=False)
        self.feed(self.preplay)
        node = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                node._serve(self.request)

        self._server = socketserver.ThreadingUnixStreamServer(str(self.rpc_path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="simrpc", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.rpc_path.unlink(missing_ok=True)
        with self.lock:
            self.sim.close(30)

    def __enter__(self) -> SimRpcNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the node ------------------------------------------------------------------
    def feed(self, count: int) -> int:
        """Play the next ``count`` calls of the trace; the data_version committed."""
        with self.lock:
            stop = min(len(self.trace), self.next_call + count)
            self.next_call = self.sim.run_trace(self.trace, start=self.next_call, stop=stop,
                                                init_after=0)
            return self.sim.committed_data_version()

    @property
    def plugin_pid(self) -> int | None:
        p = self.sim.plugin
        return p.pid if p is not None and p.alive() else None

    # -- the socket ------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        decoder = _RawDecoder()
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for raw, request in decoder.feed(data):
                    answer = self._answer(raw, request)
                    conn.sendall(json.dumps(answer).encode() + b"\n\n")
        except OSError:
            return

    def _answer(self, raw: str, request: dict[str, Any]) -> dict[str, Any]:
        method = str(request.get("method"))
        self.methods.append(method)
        base = {"jsonrpc": "2.0", "id": request.get("id")}
        try:
            handler = getattr(self, "rpc_" + method.replace("-", "_"), None)
            if handler is None:
                raise _RpcError(METHOD_NOT_FOUND, f"Unknown command '{method}'")
            return {**base, "result": handler(request.get("params") or {}, raw)}
        except _RpcError as exc:
            return {**base, "error": {"code": exc.code, "message": exc.message}}

    # -- methods ----------------------------------------------------------------------
    def rpc_getinfo(self, params: Any, raw: str) -> dict[str, Any]:
        return {"id": self.node_key.node_id, "alias": "SIMNODE", "color": "02a414",
                "num_peers": 0, "num_pending_channels": 0, "num_active_channels": 0,
                "num_inactive_channels": 0, "address": [], "binding": [],
                "version": "v26.06", "blockheight": 101, "network": self.network,
                "fees_collected_msat": 0, "lightning-dir": str(self.network_dir)}

    def rpc_signmessage(self, params: Any, raw: str) -> dict[str, Any]:
        message = _raw_message(raw)
        if message is None:
            raise _RpcError(INVALID_PARAMS, "missing required parameter: message")
        signed = self.node_key.sign_message(message)
        return {"signature": signed.signature.hex(), "recid": f"{signed.recid:02x}",
                "zbase": signed.zbase}

    def rpc_listconfigs(self, params: Any, raw: str) -> dict[str, Any]:
        configs: dict[str, Any] = {
            "network": {"value_str": self.network, "source": "cmdline"},
            "lightning-dir": {"value_str": str(self.lightning_dir), "source": "cmdline"},
            "rpc-file": {"value_str": "lightning-rpc", "source": "default"},
        }
        if self.wallet is not None:
            configs["wallet"] = {"value_str": self.wallet, "source": "cmdline"}
        return {"configs": configs}

    def _plugins(self) -> list[dict[str, Any]]:
        p, wrapper = self.sim.plugin, self.sim.wrapper
        if p is None or wrapper is None or not p.alive():
            return []
        return [{"name": str(wrapper), "active": True, "dynamic": True}]

    def rpc_plugin(self, params: Any, raw: str) -> dict[str, Any]:
        if isinstance(params, list):
            params = dict(zip(("subcommand", "plugin"), params, strict=False))
        sub, path = params.get("subcommand"), params.get("plugin")
        if sub == "list":
            return {"command": "list", "plugins": self._plugins()}
        if sub == "start":
            with self.lock:
                if any(p["name"] == str(path) for p in self._plugins()):
                    raise _RpcError(INVALID_PARAMS, f"{path}: already registered")
                if self.broken_plugin:
                    raise _RpcError(PLUGIN_ERROR, f"{path}: exited before replying to "
                                    "getmanifest")
                self.sim.wrapper = Path(str(path))
                self.sim.important = False
                self.sim.initialized = False  # a plugin started at run time gets init
                try:
                    self.sim.start_plugin(init=True)
                except OSError as exc:
                    self.sim.plugin = None
                    raise _RpcError(PLUGIN_ERROR, f"{path}: {exc.strerror}") from None
                if self.sim.plugin is None:
                    raise _RpcError(PLUGIN_ERROR, f"{path}: exited before replying to "
                                    "getmanifest")
                return {"command": "start", "plugins": self._plugins()}
        if sub == "stop":
            with self.lock:
                if not any(p["name"] == str(path) for p in self._plugins()):
                    raise _RpcError(PLUGIN_ERROR, f"Could not find plugin {path}")
                plugin = self.sim.plugin
                assert plugin is not None
                plugin.send({"jsonrpc": "2.0", "method": "shutdown", "params": {}})
                plugin.close(30)
                self.sim.plugin = None
                return {"command": "stop", "result": f"Successfully stopped {path}."}
        raise _RpcError(INVALID_PARAMS, f"subcommand {sub!r} is not supported here")

    def _one_write(self) -> None:
        if self.next_call >= len(self.trace):
            raise _RpcError(PLUGIN_ERROR, "the simulator's trace is exhausted")
        try:
            self.feed(1)
        except NodeStopped as exc:
            raise _RpcError(PLUGIN_ERROR, f"lightningd stopped: {exc.reason}") from None

    def rpc_datastore(self, params: Any, raw: str) -> dict[str, Any]:
        self._one_write()
        return {"key": params.get("key"), "generation": 0, "string": params.get("string")}

    def rpc_deldatastore(self, params: Any, raw: str) -> dict[str, Any]:
        self._one_write()
        return {"key": params.get("key"), "generation": 0}


class _RawDecoder:
    """JSON objects with their raw text (signmessage signs the raw text)."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, data: bytes) -> list[tuple[str, dict[str, Any]]]:
        self._buf += data.decode("utf-8")
        out = []
        decoder = json.JSONDecoder()
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return out
            try:
                obj, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                self._buf = text
                return out
            out.append((text[:end], obj))
            self._buf = text[end:]
