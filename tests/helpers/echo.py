"""An SSH echo server in a subprocess on 127.0.0.1 (no authentication, a shell echoes what
it gets): the live or hung (SIGSTOP) peer of the keepalive test and bench."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from helpers.servers import free_port, wait_port

ECHO_SERVER = r'''
import asyncio, sys
import asyncssh

class Echo(asyncssh.SSHServerSession):
    def connection_made(self, chan):
        self._chan = chan
    def shell_requested(self):
        return True
    def data_received(self, data, datatype):
        self._chan.write(data)

class NoAuth(asyncssh.SSHServer):
    def begin_auth(self, username):
        return False
    def session_requested(self):
        return Echo()

async def main():
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(NoAuth, "127.0.0.1", int(sys.argv[1]),
                                          server_host_keys=[key], encoding=None)
    await server.wait_closed()

asyncio.run(main())
'''


@contextmanager
def echo_server() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """(port, process) of a running echo server; stopped by its pid (woken first)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)])
    try:
        wait_port(port, proc)
        yield port, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)
