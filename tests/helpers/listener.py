"""A TCP listener on 127.0.0.1 serving each connection in a thread of its own (test proxies).

:class:`LoopbackListener` binds a free port at once (``port``), accepts in a
thread once started, hands every connection to :meth:`LoopbackListener.accepted`
and, on :meth:`LoopbackListener.stop`, sets ``_stopping`` (which the
connection threads watch, with bounded waits) and joins its threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any


class LoopbackListener:
    """See the module docstring; subclasses implement :meth:`accepted`."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> Any:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for t in list(self._threads):
            t.join(10)
        self._listener.close()

    def accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted(conn)
