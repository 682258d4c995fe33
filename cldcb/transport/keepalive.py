"""SSH keepalives that cost nothing while data flows.

asyncssh's own keepalive cancels and re-creates a timer for every packet it
receives: measured here, 5–9 µs per packet at both ends of every change, on
the path lightningd waits on. :class:`Keepalive` arms that same keepalive
only while a connection is quiet. A watchdog looks every ``interval``
seconds: if the peer sent no data since its last look, it arms asyncssh's
keepalive (which then asks the peer every ``interval`` seconds and drops the
connection after ``count_max`` unanswered requests); once data flows again,
the peer is plainly alive and the keepalive is disarmed.

So a peer that is gone, or hung with its socket open, is dropped after at
most ``(count_max + 2) × interval`` seconds of silence (180 s with the
defaults; a hook call waiting on it is bounded by the plugin's outage limit
anyway), and a quiet link through a NAT still sees traffic every
``interval`` seconds.

The receiving side counts each piece of data in :attr:`Keepalive.received`
(an integer increment); connections start with asyncssh's keepalive off
(``keepalive_interval=0``).
"""

from __future__ import annotations

import asyncio

import asyncssh

INTERVAL = 30.0
COUNT_MAX = 4


class Keepalive:
    """The watchdog of one connection; :meth:`stop` it when the connection ends."""

    def __init__(self, conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection,
                 interval: float = INTERVAL, count_max: int = COUNT_MAX) -> None:
        self.received = 0
        self.armed = False
        self._conn = conn
        self._interval = interval
        self._count_max = count_max
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        last = self.received
        while True:
            await asyncio.sleep(self._interval)
            quiet = self.received == last
            last = self.received
            if quiet != self.armed:
                self.armed = quiet
                try:
                    self._conn.set_keepalive(self._interval if quiet else 0, self._count_max)
                except (OSError, asyncssh.Error):
                    return                  # the connection is closing

    def stop(self) -> None:
        self._task.cancel()
