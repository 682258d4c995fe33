"""A relay in front of the real ``cldcb-server stdio`` that forges Acks (a test program).

It stands where sshd runs the ``cldcb`` subsystem: whoever holds the sshd host key
can put it there. It starts the real server (the rest of its command line) and passes
every byte both ways, so the hello the client sees is the server's own, signed by
the server key; but from the data_version ``FROM`` on it keeps each ``Write`` from
the server and answers it itself with an ``Ack`` naming exactly that write (its
data_version, kind and link), after the server's answers to everything it passed
on (so the order of answers is an honest server's). It never reads the server key,
so it cannot make the MAC of the session (protocol 3): nothing is stored, and a
plugin that counted such an Ack would answer ``continue`` for a change no server
holds.

Usage: ``python ack_relay.py FROM SERVER-COMMAND...``
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO

from cldcb.core import wire


class Relay:
    def __init__(self, from_dv: int, command: list[str]) -> None:
        self.from_dv = from_dv
        self.server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.out = sys.stdout.buffer
        self.lock = threading.Condition()
        self.unanswered = 0               # requests passed on, not yet answered

    def to_client(self, frame: bytes) -> None:
        self.out.write(frame)
        self.out.flush()

    def answers(self) -> None:
        """The server's frames, passed on as they are (each answers one request)."""
        assert self.server.stdout is not None
        for frame in frames(self.server.stdout):
            with self.lock:
                self.to_client(frame)
                self.unanswered -= 1
                self.lock.notify_all()
        with self.lock:
            self.unanswered = -1 << 30    # the server is gone: stop waiting for it
            self.lock.notify_all()
        self.out.close()

    def requests(self) -> None:
        stdin = self.server.stdin
        assert stdin is not None
        for frame in frames(sys.stdin.buffer):
            write = wire.write_in(frame)
            if write is not None and write.data_version >= self.from_dv:
                with self.lock:
                    self.lock.wait_for(lambda: self.unanswered <= 0)
                    self.to_client(wire.encode(wire.Ack(write.data_version, write.kind,
                                                        write.link, False)))
                continue
            with self.lock:
                self.unanswered += 1
            stdin.write(frame)
            stdin.flush()
        stdin.close()


def frames(stream: BinaryIO) -> Iterator[bytes]:
    """Whole frames from ``stream`` until it ends."""
    while True:
        head = stream.read(4)
        if len(head) < 4:
            return
        (length,) = struct.unpack(">I", head)
        body = stream.read(length)
        if len(body) < length:
            return
        yield head + body


def main() -> None:
    relay = Relay(int(sys.argv[1]), sys.argv[2:])
    answers = threading.Thread(target=relay.answers, daemon=True)
    answers.start()
    try:
        relay.requests()
    except (BrokenPipeError, OSError):
        pass
    relay.server.wait()
    answers.join(10)


if __name__ == "__main__":
    main()
