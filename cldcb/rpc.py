"""A small client for lightningd's JSON-RPC over its unix socket.

lightningd listens on ``<lightning-dir>/<network>/lightning-rpc``. A request
is one JSON-RPC 2.0 object; lightningd answers with one object followed by a
blank line. Answers are parsed incrementally (a JSON decoder over a buffer),
not by lines, so an answer may arrive in any number of pieces. Each call
opens its own connection (cheap on a unix socket), so a call that waits long
(``plugin start``, a write that waits for the backup hook) never holds up
another.

Errors:

- :class:`LightningdNotRunning`: the socket is missing or nothing listens on
  it (a stale socket file). :meth:`LightningRpc.is_running` turns this into
  False; any other failure to connect (e.g. permission denied) is an error,
  never "not running", so that a running node is never taken for a stopped
  one.
- :class:`RpcError`: lightningd answered with an error (``code``, message).
- :class:`RpcTransportError`: the connection broke, timed out, or the answer
  was not JSON-RPC.

The project owns this client rather than depending on pyln-client (see
DESIGN section 5).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cldcb.errors import (
    LightningdNotRunning,
    ProtocolError,
    RpcError,
    RpcTransportError,
    WalletNotSupported,
)
from cldcb.plugin.jsonrpc import MessageDecoder

RPC_FILE = "lightning-rpc"
DEFAULT_DATABASE = "lightningd.sqlite3"
DEFAULT_TIMEOUT = 60.0
# AF_UNIX paths are limited to 108 bytes (with the NUL); longer ones go through
# /proc/self/fd, as lightningd itself avoids the limit by chdir-ing.
_SUN_PATH_MAX = 107
_MAX_ANSWER = 64 * 1024 * 1024
_ids = itertools.count(1)


def rpc_path(lightning_dir: Path | str, network: str = "bitcoin") -> Path:
    """``<lightning-dir>/<network>/lightning-rpc``."""
    return Path(lightning_dir) / network / RPC_FILE


def _answers(reader: MessageDecoder, data: bytes) -> list[dict[str, Any]]:
    """The whole JSON objects ``data`` completes (the plugin's incremental decoder)."""
    try:
        return reader.feed(data)
    except ProtocolError as exc:
        raise RpcTransportError(f"lightningd's RPC answer is malformed ({exc}): is this "
                                "lightningd's lightning-rpc socket?") from None


@dataclass
class LightningRpc:
    """lightningd's JSON-RPC at ``socket_path``."""

    socket_path: Path
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def for_node(cls, lightning_dir: Path | str, network: str = "bitcoin",
                 timeout: float = DEFAULT_TIMEOUT) -> LightningRpc:
        return cls(rpc_path(lightning_dir, network), timeout)

    # -- connection -------------------------------------------------------------------
    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        path = str(self.socket_path)
        dir_fd = -1
        try:
            if len(os.fsencode(path)) > _SUN_PATH_MAX:
                dir_fd = os.open(self.socket_path.parent, os.O_PATH | os.O_DIRECTORY)
                path = f"/proc/self/fd/{dir_fd}/{self.socket_path.name}"
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise LightningdNotRunning(
                f"lightningd is not running: nothing answers on {self.socket_path} "
                f"({'no such socket' if isinstance(exc, FileNotFoundError) else 'refused'})"
            ) from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENOTDIR or (exc.errno == errno.ENOENT):
                raise LightningdNotRunning(
                    f"lightningd is not running: {self.socket_path} does not exist") from None
            hint = (": run as the node's user or root"
                    if exc.errno in (errno.EACCES, errno.EPERM) else "")
            raise RpcTransportError(f"cannot connect to lightningd's RPC socket "
                                    f"{self.socket_path}: {exc.strerror or exc}{hint}") from None
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        return sock

    def is_running(self) -> bool:
        """True if lightningd accepts connections on its RPC socket.

        A missing socket or a refused connection (a stale socket file) is
        False; any other failure (permission denied, ...) raises, so that a
        running node is never taken for a stopped one.
        """
        try:
            sock = self._connect(min(self.timeout, 10.0))
        except LightningdNotRunning:
            return False
        sock.close()
        return True

    # -- calls ------------------------------------------------------------------------
    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None,
             timeout: float | None = -1.0) -> Any:
        """Call ``method`` and return its ``result``; RpcError on an error answer.

        ``timeout``: seconds for the whole call (default: this client's
        ``timeout``; None waits for ever).
        """
        limit = self.timeout if timeout is not None and timeout < 0 else timeout
        request_id = f"cldcb-client:{method}#{next(_ids)}"
        request = {"jsonrpc": "2.0", "id": request_id, "method": method,
                   "params": params if params is not None else {}}
        deadline = None if limit is None else time.monotonic() + limit
        sock = self._connect(limit)
        try:
            sock.sendall(json.dumps(request).encode("utf-8"))
            reader = MessageDecoder(max_message=_MAX_ANSWER)
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    raise RpcTransportError(f"lightningd closed the RPC connection before "
                                            f"answering `{method}`")
                for answer in _answers(reader, data):
                    if answer.get("id") == request_id:
                        return _result(method, answer)
                    # anything else (a notification) is not ours: skip it
        except TimeoutError:
            raise RpcTransportError(f"lightningd did not answer `{method}` within "
                                    f"{limit:g} s") from None
        except OSError as exc:
            raise RpcTransportError(f"lost the RPC connection to lightningd during "
                                    f"`{method}`: {exc.strerror or exc}") from None
        finally:
            sock.close()

    # -- the calls cldcb makes ----------------------------------------------------------
    def getinfo(self) -> dict[str, Any]:
        info = self.call("getinfo")
        if not isinstance(info, dict) or not isinstance(info.get("id"), str):
            raise RpcTransportError("lightningd's getinfo has no node id")
        return info

    def node_id(self) -> str:
        """The node id (``02…``/``03…``) lightningd reports."""
        return str(self.getinfo()["id"]).lower()

    def signmessage(self, message: str) -> str:
        """The node's zbase32 signature of ``message`` (keep it plain ASCII)."""
        result = self.call("signmessage", {"message": message})
        zbase = result.get("zbase") if isinstance(result, dict) else None
        if not isinstance(zbase, str):
            raise RpcTransportError("lightningd's signmessage answer has no zbase signature")
        return zbase

    def listconfigs(self) -> dict[str, Any]:
        result = self.call("listconfigs")
        if not isinstance(result, dict):
            raise RpcTransportError("lightningd's listconfigs answer is not an object")
        return result

    def database(self) -> str:
        """The database path (relative to ``<lightning-dir>/<network>`` unless
        absolute), from the ``wallet`` option; WalletNotSupported for PostgreSQL."""
        return database_from_wallet(wallet_option(self.listconfigs()))

    def plugin_start(self, path: Path | str, timeout: float | None = 120.0) -> dict[str, Any]:
        """``plugin start PATH``: lightningd answers once the plugin's init is done."""
        result = self.call("plugin", {"subcommand": "start", "plugin": str(path)},
                           timeout=timeout)
        return result if isinstance(result, dict) else {}

    def plugin_stop(self, path: Path | str) -> dict[str, Any]:
        result = self.call("plugin", {"subcommand": "stop", "plugin": str(path)})
        return result if isinstance(result, dict) else {}

    def plugin_list(self) -> list[dict[str, Any]]:
        result = self.call("plugin", {"subcommand": "list"})
        plugins = result.get("plugins") if isinstance(result, dict) else None
        return [p for p in plugins if isinstance(p, dict)] if isinstance(plugins, list) else []

    def plugin_active(self, path: Path | str) -> bool:
        """True if lightningd runs the plugin at ``path`` (compared as absolute paths)."""
        want = os.path.abspath(str(path))
        return any(os.path.abspath(str(p.get("name", ""))) == want and p.get("active", True)
                   for p in self.plugin_list())


def _result(method: str, answer: dict[str, Any]) -> Any:
    if "error" in answer and answer["error"] is not None:
        err = answer["error"]
        if isinstance(err, dict):
            code = err.get("code")
            raise RpcError(method, code if isinstance(code, int) else None,
                           str(err.get("message", "no message")), err.get("data"))
        raise RpcError(method, None, str(err))
    if "result" not in answer:
        raise RpcTransportError(f"lightningd's answer to `{method}` has neither result "
                                "nor error")
    return answer["result"]


def wallet_option(configs: dict[str, Any]) -> str | None:
    """The ``wallet`` value of a ``listconfigs`` result (either format), or None."""
    nested = configs.get("configs")
    if isinstance(nested, dict):  # v23.08 and later
        entry = nested.get("wallet")
        if isinstance(entry, dict):
            value = entry.get("value_str")
            return value if isinstance(value, str) else None
        return None
    value = configs.get("wallet")  # older: a flat object
    return value if isinstance(value, str) else None


def database_from_wallet(dsn: str | None) -> str:
    """The SQLite file of a ``wallet`` DSN (``sqlite3://PATH[:BACKUP]``).

    None (the option not set) is lightningd's default, ``lightningd.sqlite3``.
    PostgreSQL is refused: lightningd never calls the ``db_write`` hook for it.
    """
    if dsn is None or not dsn.strip():
        return DEFAULT_DATABASE
    dsn = dsn.strip()
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        raise WalletNotSupported(f"lightningd's wallet option {_shown(dsn)} is not a "
                                 "sqlite3:// DSN; cldcb cannot tell which database to back up")
    if scheme.lower() in ("postgres", "postgresql"):
        raise WalletNotSupported(
            "lightningd uses a PostgreSQL wallet (wallet=postgres://…): cldcb backs up "
            "SQLite databases only, as lightningd never calls the db_write hook for "
            "PostgreSQL; use PostgreSQL's own replication instead")
    if scheme.lower() != "sqlite3":
        raise WalletNotSupported(f"lightningd's wallet option uses {scheme!r}: cldcb "
                                 "backs up SQLite (sqlite3://) databases only")
    # sqlite3://MAIN[:BACKUP]: lightningd keeps a second copy after a ':'
    main = rest.split(":", 1)[0]
    if not main:
        raise WalletNotSupported(f"lightningd's wallet option {_shown(dsn)} names no file")
    return main


def _shown(dsn: str) -> str:
    """A DSN for a message, without any password in it."""
    scheme, sep, rest = dsn.partition("://")
    if sep and "@" in rest:
        rest = "…@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
