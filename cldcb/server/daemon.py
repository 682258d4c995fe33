"""``cldcb-server serve``: the standalone asyncssh daemon.

- Its only SSH host key is the server key (secp256k1,
  ``ecdsa-sha2-1.3.132.0.10``), so a client pins it from the ``5…`` id.
- Clients authenticate with public-key auth using their client key; only
  registered client ids get in. The SSH user name is not used for them.
- The user ``cldcb-recover`` gets in with no credentials; its session is
  anonymous and can only list recognition entries.
- No password or keyboard-interactive auth, no shell, exec, pty, X11, agent or
  port forwarding: the only thing offered is the ``cldcb`` subsystem.
- SSH keepalives, armed while a connection is quiet (:mod:`cldcb.transport.keepalive`),
  detect dead peers.
- It accepts connections itself and bounds what anyone can make it hold
  (:mod:`cldcb.server.admission`): connections in total and per source
  address, a separate class for logged-in registered clients, one channel per
  connection (in its whole life; a connection that is not a registered
  client's ends with its channel), idle connections closed; the cldcb session's frame limit is
  small until a client is accepted (:mod:`cldcb.core.session`). When a connection
  ends while the process is large, freed memory goes back to the kernel
  (:func:`cldcb.cli.malloc.release_freed_memory`).
- On SIGTERM/SIGINT it stops accepting, lets in-flight store calls (fsyncs)
  finish, refuses new writes with ``Error(SHUTTING_DOWN)``, and exits; it never
  acknowledges anything unsynced.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import asyncssh

from cldcb.cli.malloc import keep_freed_memory, release_freed_memory
from cldcb.core.ids import client_id_from_pubkey
from cldcb.server.admission import Admission, IdleWatch, Limits, Slot, accept_loop
from cldcb.server.handler import ServerCore, SessionHandler
from cldcb.transport.connection import (
    PREFERRED_CIPHERS,
    RECOVER_USER,
    SSH_MAX_PACKET,
    SSH_WINDOW,
    SUBSYSTEM,
)
from cldcb.transport.keepalive import Keepalive
from cldcb.transport.sshkeys import compressed_point, secp256k1_ssh_key

log = logging.getLogger("cldcb.server")
TRIM_DELAY = 0.5
"""Seconds after a connection ends before freed memory is handed back (if the process is
large): one trim for a burst of ends, after their sessions' objects are gone."""


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
                 keepalive: Keepalive, ended: Callable[[], None]) -> None:
        self._core = core
        self._info = conn_info
        self._keepalive = keepalive
        self._ended = ended
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
        self._ended()
        if self._handler is not None:
            self._handler.connection_lost()

    def pause_writing(self) -> None:
        if self._sink:
            self._sink.pause()

    def resume_writing(self) -> None:
        if self._sink:
            self._sink.resume()


class _Server(asyncssh.SSHServer):
    """One SSH connection: its admission slot, idle watch, channels and login."""

    def __init__(self, core: ServerCore, limits: Limits, slots: dict[object, Slot]) -> None:
        self._core = core
        self._limits = limits
        self._slots = slots
        self._slot: Slot | None = None
        self._idle: IdleWatch | None = None
        self._channels = 0
        self.info: dict[str, object] = {}

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self.info["peer"] = peer
        self._conn = conn
        self._slot = self._slots.pop(peer, None)
        if self._slot is not None:
            self._slot.close = conn.abort
        self._keepalive = Keepalive(conn)
        self._idle = IdleWatch(self._close_idle, lambda: self._keepalive.received,
                               self._idle_timeout)

    def _idle_timeout(self) -> float:
        if self.info.get("client_id") and self._slot is not None and self._slot.client:
            return self._limits.idle_timeout
        return self._limits.anonymous_idle_timeout

    def _close_idle(self, why: str) -> None:
        log.info("closing idle connection from %s (%s)", self.info.get("peer"), why)
        self._conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._keepalive.stop()
        if self._idle is not None:
            self._idle.stop()
        if self._slot is not None:
            self._slot.release()

    def auth_completed(self) -> None:
        if self.info.get("anonymous") or self._slot is None or self._slot.promote():
            return
        log.warning("refusing client %s from %s: %d client connections already (the limit)",
                    self.info.get("client_id"), self.info.get("peer"),
                    self._limits.max_connections)
        self._conn.close()

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

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        self._channels += 1
        if self._channels > self._limits.channels_per_connection:
            if self._channels == self._limits.channels_per_connection + 1:
                log.info("refusing more than %d channels on the connection from %s",
                         self._limits.channels_per_connection, self.info.get("peer"))
            return False
        return _Session(self._core, self.info, self._keepalive, self._channel_ended)

    def _channel_ended(self) -> None:
        """A connection that is not a registered client's ends with its channel."""
        if self._slot is None or not self._slot.client:
            self._conn.close()


async def serve(data_dir: Path, server_priv: bytes, host: str, port: int,
                *, ready: asyncio.Event | None = None, limits: Limits | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT (``limits``: default :meth:`Limits.from_env`)."""
    keep_freed_memory()
    _raise_file_limit()
    limits = limits or Limits.from_env()
    if logging.getLogger("asyncssh").level == logging.NOTSET:   # `serve --log-level` sets it
        logging.getLogger("asyncssh").setLevel(logging.WARNING)  # not 3 lines per connection
    core = ServerCore(data_dir, server_priv)
    host_key = secp256k1_ssh_key(server_priv)
    slots: dict[object, Slot] = {}
    options = await asyncssh.SSHServerConnectionOptions.construct(
        server_factory=lambda: _Server(core, limits, slots), server_host_keys=[host_key],
        encryption_algs=PREFERRED_CIPHERS,
        agent_forwarding=False, x11_forwarding=False, allow_pty=False,
        keepalive_interval=0, login_timeout=30,      # keepalive: see cldcb.transport.keepalive
        line_editor=False, allow_scp=False, encoding=None, window=SSH_WINDOW,
        max_pktsize=SSH_MAX_PACKET)
    loop = asyncio.get_running_loop()
    trimming: list[asyncio.TimerHandle] = []

    def trim() -> None:
        trimming.clear()
        release_freed_memory()

    def trim_soon() -> None:   # once the ended connections' objects are gone too
        if not trimming:
            trimming.append(loop.call_later(TRIM_DELAY, trim))

    admission = Admission(limits, on_release=trim_soon)

    async def connect(sock: socket.socket, slot: Slot) -> None:
        try:
            peer = sock.getpeername()
        except OSError:                                 # already gone
            sock.close()
            slot.release()
            return
        slots[peer] = slot
        try:
            await loop.connect_accepted_socket(
                lambda: asyncssh.SSHServerConnection(loop, options), sock)
        except Exception as exc:  # noqa: BLE001 - that connection only
            log.info("connection from %s failed to start: %s", peer, exc)
            sock.close()
        finally:
            if slots.pop(peer, None) is not None:      # never reached connection_made
                slot.release()

    def start(sock: socket.socket, slot: Slot) -> None:
        task = loop.create_task(connect(sock, slot))
        starting.add(task)
        task.add_done_callback(starting.discard)

    starting: set[asyncio.Task[None]] = set()
    listeners = await _listen(host, port)
    accepting = [loop.create_task(accept_loop(s, admission, start)) for s in listeners]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc.freeze()    # modules and keys live as long as the server: the GC skips them
    addrs = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in listeners)
    log.info("cldcb-server listening on %s (limits: %s)", addrs, limits)
    print(f"listening on {addrs}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: no new connections; finishing in-flight writes")
    core.stopping = True
    for task in accepting:
        task.cancel()
    await asyncio.gather(*accepting, return_exceptions=True)
    for s in listeners:
        s.close()
    for handler in list(core.handlers):
        handler.connection_lost()
    pending = [h.done.wait() for h in list(core.handlers)]
    if pending:
        await asyncio.wait([asyncio.ensure_future(p) for p in pending], timeout=30)
    core.close()
    log.info("stopped")


async def _listen(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` names (as asyncio does)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


def _raise_file_limit() -> None:
    """The soft limit on open files up to the hard one (systemd: ``LimitNOFILE``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
