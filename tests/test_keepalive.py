"""cldcb.transport.keepalive: asyncssh's keepalive armed only while a connection is quiet, against a
real asyncssh server in a subprocess on 127.0.0.1 (stopped by pid): data flowing keeps
it disarmed, a quiet live peer keeps the connection, a hung peer (SIGSTOP) is dropped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator

import asyncssh
import pytest
from helpers import echo

from cldcb.transport.keepalive import Keepalive

INTERVAL = 0.2
COUNT_MAX = 2


@pytest.fixture
def echo_server() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    with echo.echo_server() as server:
        yield server


class _Counting(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.keepalive: Keepalive | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.keepalive is not None:
            self.keepalive.received += 1


async def _connect(port: int) -> tuple[asyncssh.SSHClientConnection,
                                       asyncssh.SSHClientChannel[bytes], Keepalive]:
    conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, username="x",
                                  client_keys=None, preferred_auth="none",
                                  keepalive_interval=0)
    chan, session = await conn.create_session(_Counting, encoding=None)
    ka = Keepalive(conn, interval=INTERVAL, count_max=COUNT_MAX)
    session.keepalive = ka
    return conn, chan, ka


def test_flowing_data_keeps_it_disarmed_a_quiet_live_peer_keeps_the_connection(
        echo_server: tuple[int, subprocess.Popen[bytes]]) -> None:
    async def scenario() -> None:
        conn, chan, ka = await _connect(echo_server[0])
        try:
            for _ in range(30):                    # 1.5 s of traffic, 7 looks
                chan.write(b"x")
                await asyncio.sleep(0.05)
            assert not ka.armed
            await asyncio.sleep(INTERVAL * (COUNT_MAX + 4))   # quiet: armed, answered
            assert ka.armed
            assert not conn.is_closed()
            for _ in range(12):                    # traffic again: disarmed at the next look
                chan.write(b"y")
                await asyncio.sleep(0.05)
            assert not ka.armed and not conn.is_closed()
        finally:
            ka.stop()
            conn.close()
            await conn.wait_closed()
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_hung_peer_is_dropped(echo_server: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, proc = echo_server

    async def scenario() -> None:
        conn, chan, ka = await _connect(port)
        try:
            chan.write(b"x")
            await asyncio.sleep(0.1)
            os.kill(proc.pid, signal.SIGSTOP)      # its socket stays open: only keepalives tell
            async with asyncio.timeout(20):        # how soon: bench/deadlines.py
                await conn.wait_closed()
        finally:
            ka.stop()
            conn.close()
    asyncio.run(scenario())
