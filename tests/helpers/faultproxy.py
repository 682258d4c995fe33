"""A TCP proxy on 127.0.0.1 that injects faults between a client and a server.

Every connection accepted is forwarded to ``127.0.0.1:target_port`` by one
thread. Once :meth:`FaultProxy.arm` was called, and while faults are left, each
new connection draws a fault at a random byte offset (counted over both
directions together) from its own ``random.Random`` seeded from
``random.Random(seed)`` (so a seed names the same plan for the same order of
connections):

- ``cut``: both sides closed (FIN), whatever was in flight past the offset lost;
- ``reset``: both sides reset (RST: ``SO_LINGER`` 0, then close);
- ``stall``: forwarding stops for a while (up to ``max_stall`` s), then goes on,
  and the connection draws its next fault;

``kinds`` narrows the choice. On every connection, short random delays before
forwarding a chunk. :meth:`FaultProxy.cut_all` cuts the connections open now
(one made before :meth:`FaultProxy.arm` has no faults of its own).

Bytes are never duplicated, reordered or changed: through SSH a duplicated
or altered byte is only a MAC failure, the same to both ends as a cut.
Bounded everywhere: select with a timeout, stop() joins its threads.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time
from dataclasses import dataclass

from helpers.listener import LoopbackListener

FAULTS = ("cut", "reset", "stall")


@dataclass(frozen=True)
class Plan:
    kind: str | None          # None: no fault on this connection
    offset: int               # bytes into the connection, both directions together
    stall: float


class FaultProxy(LoopbackListener):
    """See the module docstring. ``faults``: how many faults in all (then clean)."""

    def __init__(self, target_port: int, seed: int, *, faults: int = 4,
                 window: int = 200_000, kinds: tuple[str, ...] = FAULTS,
                 delay_p: float = 0.02, max_delay: float = 0.02,
                 max_stall: float = 1.5) -> None:
        super().__init__()
        self.target_port = target_port
        self.kinds = kinds
        self.rng = random.Random(seed)
        self.faults_left = faults
        self.window = window
        self.delay_p = delay_p
        self.max_delay = max_delay
        self.max_stall = max_stall
        self.armed = False
        #: what was done, e.g. "connection 3: reset at byte 1234"
        self.events: list[str] = []
        self._count = 0
        self._live: dict[int, tuple[socket.socket, socket.socket]] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self) -> None:
        """Faults for the connections accepted from now on."""
        self.armed = True

    def cut_all(self) -> None:
        """Cut every connection open now (FIN both ways), as a fault."""
        with self._lock:
            live = list(self._live.items())
        for n, (down, up) in live:
            self._note(f"connection {n}: cut by the test")
            for s in (down, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _note(self, text: str) -> None:
        with self._lock:
            self.events.append(text)

    def _plan(self, rng: random.Random, passed: int) -> Plan:
        """The next fault of a connection at ``passed`` bytes (kind None: no more)."""
        kind = None
        with self._lock:
            if self.armed and self.faults_left > 0:
                self.faults_left -= 1
                kind = rng.choice(self.kinds)
        return Plan(kind, passed + rng.randrange(self.window), rng.uniform(0.1, self.max_stall))

    def accepted(self, conn: socket.socket) -> None:
        self._count += 1
        self._spawn(self._forward, conn, random.Random(self.rng.getrandbits(64)), self._count)

    def _forward(self, down: socket.socket, rng: random.Random, n: int) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            down.close()
            return
        for s in (down, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._live[n] = (down, up)
        plan = self._plan(rng, 0)
        peer = {down: up, up: down}
        reading = [down, up]
        passed = 0
        try:
            while reading and not self._stopping.is_set():
                ready, _, _ = select.select(reading, [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:                      # a clean EOF: pass it on
                        reading.remove(s)
                        peer[s].shutdown(socket.SHUT_WR)
                        continue
                    if rng.random() < self.delay_p:
                        time.sleep(rng.uniform(0, self.max_delay))
                    if plan.kind is not None and passed + len(data) > plan.offset:
                        head = plan.offset - passed
                        peer[s].sendall(data[:head])
                        passed += head
                        self._note(f"connection {n}: {plan.kind} at byte {passed}")
                        if plan.kind != "stall":
                            self._break(plan.kind, down, up)
                            return
                        time.sleep(plan.stall)
                        plan = self._plan(rng, passed)     # then maybe another fault
                        data = data[head:]
                    peer[s].sendall(data)
                    passed += len(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._live.pop(n, None)
            down.close()
            up.close()

    @staticmethod
    def _break(kind: str, *socks: socket.socket) -> None:
        for s in socks:
            try:
                if kind == "reset":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
