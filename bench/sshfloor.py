"""The floors of the SSH benchmarks: a minimal asyncssh server in a subprocess.

``bench/hook_latency.py`` (request → fsync → ack) and ``bench/snapshot.py``
(stream → fsync) each give a session class; this module runs it behind an
asyncssh server with no authentication, the project's preferred cipher and
TCP_NODELAY, in a child process started and stopped by the benchmark.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncssh

from cldcb.connection import PREFERRED_CIPHERS


def nodelay(chan_or_conn: asyncssh.SSHServerChannel[bytes] | asyncssh.SSHClientConnection) -> None:
    sock = chan_or_conn.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    from servers import free_port, wait_port

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
