"""SOCKS5 proxies for tests, on 127.0.0.1.

- :class:`RecordingSocks5`: a small SOCKS5 server (no authentication, CONNECT
  only) that records every request (address type, host, port) and maps names
  it was told about (a fake ``….onion``) to a real server's loopback port,
  the way Tor maps an onion name to its service. A name it was not told
  about is answered "host unreachable" (it never resolves anything itself),
  an IP address is connected to. One thread per connection, bounded waits,
  :meth:`stop` joins its threads. This is the test's stand-in for Tor; the
  client side under test is python-socks.
- :class:`Microsocks`: Debian's ``microsocks`` as a subprocess (a real
  SOCKS5 proxy that resolves names itself), stopped by pid.
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from helpers.environment import require_tool
from helpers.listener import LoopbackListener
from helpers.servers import free_port, stop_pid, wait_port

ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4


@dataclass(frozen=True)
class Request:
    atyp: int
    host: str
    port: int


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during the SOCKS5 handshake")
        data += chunk
    return data


class RecordingSocks5(LoopbackListener):
    """See the module docstring. ``names``: host name → (ip, port) it stands for."""

    def __init__(self, names: dict[str, tuple[str, int]] | None = None,
                 nodelay: bool = False) -> None:
        super().__init__()
        self.nodelay = nodelay
        self.names = dict(names or {})
        self.requests: list[Request] = []

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"

    def __enter__(self) -> RecordingSocks5:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def accepted(self, conn: socket.socket) -> None:
        self._spawn(self._serve, conn)

    def _handshake(self, conn: socket.socket) -> socket.socket | None:
        ver, nmethods = _recv_exact(conn, 2)
        methods = _recv_exact(conn, nmethods)
        if ver != 5 or 0 not in methods:
            conn.sendall(b"\x05\xff")
            return None
        conn.sendall(b"\x05\x00")
        ver, cmd, _rsv, atyp = _recv_exact(conn, 4)
        if atyp == ATYP_IPV4:
            host = socket.inet_ntoa(_recv_exact(conn, 4))
        elif atyp == ATYP_IPV6:
            host = socket.inet_ntop(socket.AF_INET6, _recv_exact(conn, 16))
        elif atyp == ATYP_DOMAIN:
            host = _recv_exact(conn, _recv_exact(conn, 1)[0]).decode("ascii")
        else:
            return None
        (port,) = struct.unpack(">H", _recv_exact(conn, 2))
        with self._lock:
            self.requests.append(Request(atyp, host, port))
        if atyp == ATYP_DOMAIN:
            target = self.names.get(host)
        else:
            target = (host, port)
        if cmd != 1 or target is None:
            conn.sendall(b"\x05\x04\x00\x01" + bytes(6))      # host unreachable
            return None
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            conn.sendall(b"\x05\x05\x00\x01" + bytes(6))      # connection refused
            return None
        conn.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", 0))
        return upstream

    def _serve(self, conn: socket.socket) -> None:
        upstream = None
        try:
            conn.settimeout(10)
            upstream = self._handshake(conn)
            if upstream is None:
                return
            conn.settimeout(None)
            upstream.settimeout(None)
            if self.nodelay:
                for s in (conn, upstream):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = {conn: upstream, upstream: conn}
            while not self._stopping.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.2)
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    pair[s].sendall(data)
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()


class Microsocks:
    """``microsocks -i 127.0.0.1 -p PORT`` (Debian's), its output in ``log_path``."""

    def __init__(self, folder: Path) -> None:
        self.program = require_tool("microsocks", "microsocks")
        self.port = free_port()
        self.log_path = folder / f"microsocks-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"

    def start(self) -> Microsocks:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.program, "-i", "127.0.0.1", "-p",
                                          str(self.port)], stdout=log, stderr=log)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> Microsocks:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
