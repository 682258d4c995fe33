"""The floors of the SSH benchmarks: a minimal asyncssh server in a subprocess.

``bench/hook_latency.py`` and ``bench/server_load.py`` (request → fsync → ack:
:class:`RequestSession`) and ``bench/snapshot.py`` (stream → fsync, its own
:class:`FloorSession`) run a session behind an asyncssh server with no
authentication, the project's preferred cipher and TCP_NODELAY, in a child
process started and stopped by the benchmark.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path

import asyncssh

from cldcb.transport.connection import PREFERRED_CIPHERS


def nodelay(chan_or_conn: asyncssh.SSHServerChannel[bytes] | asyncssh.SSHClientConnection) -> None:
    sock = chan_or_conn.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


FLOOR_SUBSYSTEM = "floor"


class FloorSession(asyncssh.SSHServerSession[bytes]):
    """What every floor's session does: accept its own subsystem only, keep its channel,
    TCP_NODELAY on it."""

    SUBSYSTEM = FLOOR_SUBSYSTEM
    _chan: asyncssh.SSHServerChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan
        nodelay(chan)

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == self.SUBSYSTEM


class RequestSession(FloorSession):
    """The bare request server: each request (u32 length, then that many bytes) is
    appended to ``path`` and fsynced, then answered ``ack:`` + its length. With an
    ``executor`` the append and fsync run there (a session's requests still answered in
    order), else on the event loop."""

    def __init__(self, path: Path, executor: Executor | None = None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._executor = executor
        self._buf = bytearray()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        if executor is not None:
            asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._buf += data
        while len(self._buf) >= 4:
            (n,) = struct.unpack_from(">I", self._buf)
            if len(self._buf) < 4 + n:
                return
            payload = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            if self._executor is None:
                self._append(payload)
                self._ack(payload)
            else:
                self._queue.put_nowait(payload)

    def _append(self, payload: bytes) -> None:
        os.write(self._fd, payload)
        os.fsync(self._fd)

    def _ack(self, payload: bytes) -> None:
        assert self._chan is not None
        self._chan.write(b"ack:" + struct.pack(">I", len(payload)))

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while (payload := await self._queue.get()) is not None:
            await loop.run_in_executor(self._executor, self._append, payload)
            self._ack(payload)
        os.close(self._fd)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._executor is None:
            os.close(self._fd)
        else:
            self._queue.put_nowait(None)


class _NoAuthServer(asyncssh.SSHServer):
    def __init__(self, session: Callable[[], asyncssh.SSHServerSession[bytes]]) -> None:
        self._session = session

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return self._session()


async def serve(session: Callable[[], asyncssh.SSHServerSession[bytes]], port: int) -> None:
    """Serve ``session`` on 127.0.0.1:``port`` until killed (runs in the child)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(lambda: _NoAuthServer(session), "127.0.0.1", port,
                                          server_host_keys=[key],
                                          encryption_algs=PREFERRED_CIPHERS, encoding=None)
    await server.wait_closed()


async def connect(port: int, username: str) -> asyncssh.SSHClientConnection:
    conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, username=username,
                                  client_keys=None, encryption_algs=PREFERRED_CIPHERS,
                                  preferred_auth="none")
    nodelay(conn)
    return conn


@contextmanager
def floor_server(script: str, flag: str, folder: Path) -> Iterator[int]:
    """Run ``script flag FOLDER PORT`` (the benchmark itself, serving its floor); the port."""
    from helpers.servers import free_port, wait_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, script, flag, str(folder), str(port)],
                            stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def run_child(session: Callable[[], asyncssh.SSHServerSession[bytes]], port: int) -> None:
    asyncio.run(serve(session, port))
