"""``cldcb-server serve``: the standalone asyncssh daemon.

- Its only SSH host key is the server key (secp256k1,
  ``ecdsa-sha2-1.3.132.0.10``), so a client pins it from the ``5…`` id.
- Clients authenticate with public-key auth using their client key; only
  registered client ids get in. The SSH user name is not used for them.
- The user ``cldcb-recover`` gets in with no credentials; its session is
  anonymous and can only list recognition entries.
- No password or keyboard-interactive auth, no shell, exec, pty, X11, agent or
  port forwarding: the only thing offered is the ``cldcb`` subsystem.
- SSH keepalives, armed while a connection is quiet (:mod:`cldcb.keepalive`),
  detect dead peers.
- On SIGTERM/SIGINT it stops accepting, lets in-flight store calls (fsyncs)
  finish, refuses new writes with ``Error(SHUTTING_DOWN)``, and exits; it never
  acknowledges anything unsynced.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

import asyncssh

from cldcb.connection import (
    PREFERRED_CIPHERS,
    RECOVER_USER,
    SSH_MAX_PACKET,
    SSH_WINDOW,
    SUBSYSTEM,
)
from cldcb.ids import client_id_from_pubkey
from cldcb.keepalive import Keepalive
from cldcb.malloc import keep_freed_memory
from cldcb.server.handler import ServerCore, SessionHandler
from cldcb.sshkeys import compressed_point, secp256k1_ssh_key

log = logging.getLogger("cldcb.server")


class _ChannelSink:
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        self._writable = asyncio.Event()
        self._writable.set()

    def write(self, data: bytes) -> None:
        if not self._chan.is_closing():
            self._chan.write(data)

    async def drain(self) -> None:
        if not self._chan.is_closing():
            await self._writable.wait()

    def close(self) -> None:
        if not self._chan.is_closing():
            self._chan.exit(0)

    def pause_reading(self) -> None:
        if not self._chan.is_closing():
            self._chan.pause_reading()

    def resume_reading(self) -> None:
        if not self._chan.is_closing():
            self._chan.resume_reading()

    def pause(self) -> None:
        self._writable.clear()

    def resume(self) -> None:
        self._writable.set()


class _Session(asyncssh.SSHServerSession[bytes]):
    def __init__(self, core: ServerCore, conn_info: dict[str, object],
                 keepalive: Keepalive) -> None:
        self._core = core
        self._info = conn_info
        self._keepalive = keepalive
        self._handler: SessionHandler | None = None
        self._sink: _ChannelSink | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != SUBSYSTEM:
            return False
        self._sink = _ChannelSink(self._chan)
        anonymous = bool(self._info.get("anonymous"))
        self._handler = SessionHandler(self._core, self._sink, peer=str(self._info.get("peer")),
                                       allow_anonymous=anonymous,
                                       forced_client_id=None if anonymous
                                       else str(self._info.get("client_id")))
        return True

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def pty_requested(self, *args: object) -> bool:
        return False

    def session_started(self) -> None:
        if self._handler is not None:
            self._handler.start()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._keepalive.received += 1
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool:
        if self._handler is not None:
            self._handler.connection_lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handler is not None:
            self._handler.connection_lost()

    def pause_writing(self) -> None:
        if self._sink:
            self._sink.pause()

    def resume_writing(self) -> None:
        if self._sink:
            self._sink.resume()


class _Server(asyncssh.SSHServer):
    def __init__(self, core: ServerCore) -> None:
        self._core = core
        self.info: dict[str, object] = {}

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.info["peer"] = conn.get_extra_info("peername")
        self._conn = conn
        self._keepalive = Keepalive(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._keepalive.stop()

    def begin_auth(self, username: str) -> bool:
        if username == RECOVER_USER:
            self.info["anonymous"] = True
            return False  # no credentials: an anonymous, list-only session
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        point = compressed_point(key)
        if point is None:
            return False
        try:
            client_id = client_id_from_pubkey(point)
        except Exception:
            return False
        if not self._core.is_registered(client_id):
            log.info("refused unregistered client %s from %s", client_id, self.info.get("peer"))
            return False
        self.info["client_id"] = client_id
        return True

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return _Session(self._core, self.info, self._keepalive)


async def serve(data_dir: Path, server_priv: bytes, host: str, port: int,
                *, ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    keep_freed_memory()
    core = ServerCore(data_dir, server_priv)
    host_key = secp256k1_ssh_key(server_priv)
    server = await asyncssh.create_server(
        lambda: _Server(core), host, port, server_host_keys=[host_key],
        encryption_algs=PREFERRED_CIPHERS,
        agent_forwarding=False, x11_forwarding=False, allow_pty=False,
        keepalive_interval=0, login_timeout=30,      # keepalive: see cldcb.keepalive
        line_editor=False, allow_scp=False, encoding=None, window=SSH_WINDOW,
        max_pktsize=SSH_MAX_PACKET)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc.freeze()    # modules and keys live as long as the server: the GC skips them
    addrs = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)
    log.info("cldcb-server listening on %s", addrs)
    print(f"listening on {addrs}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: no new connections; finishing in-flight writes")
    core.stopping = True
    server.close()
    await server.wait_closed()
    for handler in list(core.handlers):
        handler.connection_lost()
    pending = [h.done.wait() for h in list(core.handlers)]
    if pending:
        await asyncio.wait([asyncio.ensure_future(p) for p in pending], timeout=30)
    core.close()
    log.info("stopped")
