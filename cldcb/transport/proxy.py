"""The route to a server through a SOCKS5 proxy (Tor), and the patience such a route needs.

A server may be reached through a SOCKS5 proxy, per server: ``--proxy
socks5://HOST:PORT`` on the commands that connect, ``proxy=socks5://HOST:PORT``
after the server id in the wrapper. An onion address (``….onion``) is always
reached through one: :data:`TOR_SOCKS` (Tor's usual SOCKS port) when none is
named. Rules:

- the server's name goes to the proxy as a domain name (SOCKS5 address type
  3, python-socks' ``rdns``): nothing here asks the local resolver for it, so
  neither an onion name nor the server's address leaks to it. Only the
  proxy's own host is resolved locally (give an IP address);
- the proxy is only a route, never trust: the SSH host key is still checked
  against the pinned server id (or the pinned sshd host key) as on a direct
  connection;
- no credentials in the URL (they would be written to the wrapper and shown
  by ``status``): ``socks5://HOST:PORT`` only;
- a proxy that does not answer is a :class:`~cldcb.errors.TransportError`
  saying so (is Tor running?), distinct from a server the proxy cannot reach.

:class:`Patience`: a circuit takes seconds to build and a round trip through
Tor costs hundreds of milliseconds, so a proxied connection gets longer
connect timeouts, slower keepalives, a longer default outage limit and a
reconnection backoff that grows to tens of seconds with jitter (a plugin
whose server is down must not hammer Tor with a new circuit every second).
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
from dataclasses import dataclass

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy as AsyncProxy
from python_socks.sync import Proxy as SyncProxy

from cldcb.errors import TransportError, UsageError

TOR_SOCKS = "socks5://127.0.0.1:9050"
"""The proxy an onion address goes through when none is named: Tor's usual SOCKS port."""

_URL = re.compile(r"^socks5h?://(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:/@\s\[\]]+))"
                  r":(?P<port>\d{1,5})/?$")


def is_onion(host: str) -> bool:
    """True for a Tor onion service name (``….onion``)."""
    return host.lower().rstrip(".").endswith(".onion")


@dataclass(frozen=True)
class Proxy:
    """A SOCKS5 proxy: ``socks5://HOST:PORT``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Proxy:
        m = _URL.match(text.strip())
        if not m or not 0 < int(m.group("port")) < 65536:
            shown = text if "@" not in text else "(a URL with credentials)"
            raise UsageError(f"proxy {shown!r} is not socks5://HOST:PORT (e.g. {TOR_SOCKS}, "
                             "Tor's SOCKS port; credentials are not supported)")
        return cls(m.group("v6") or m.group("host"), int(m.group("port")))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"socks5://{host}:{self.port}"

    async def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        """A socket connected to ``host:port`` through this proxy, which resolves ``host``."""
        proxy = AsyncProxy(ProxyType.SOCKS5, self.host, self.port, rdns=True,
                           loop=asyncio.get_running_loop())
        try:
            sock = await proxy.connect(host, port, timeout=timeout)
        except (ProxyConnectionError, ProxyTimeoutError, ProxyError) as exc:
            raise self._error(exc, host, port, timeout) from None
        sock.setblocking(False)
        return sock

    def connect_sync(self, host: str, port: int, timeout: float) -> socket.socket:
        """:meth:`connect` for blocking code (paramiko)."""
        proxy = SyncProxy(ProxyType.SOCKS5, self.host, self.port, rdns=True)
        try:
            return proxy.connect(host, port, timeout=timeout)
        except (ProxyConnectionError, ProxyTimeoutError, ProxyError) as exc:
            raise self._error(exc, host, port, timeout) from None

    def _error(self, exc: Exception, host: str, port: int, timeout: float) -> TransportError:
        where = f"{host}:{port}"
        if isinstance(exc, ProxyConnectionError):
            reason = getattr(exc, "strerror", None) or "no answer"
            tor = " is Tor running (its SocksPort)?" if str(self) == TOR_SOCKS else ""
            return TransportError(f"cannot reach the SOCKS5 proxy {self} to get to {where} "
                                  f"({reason}):{tor or ' is it running?'} Give the proxy "
                                  "with --proxy socks5://HOST:PORT")
        if isinstance(exc, ProxyTimeoutError):
            return TransportError(f"no connection to {where} through {self} within "
                                  f"{timeout:.0f} s: the proxy (Tor) may still be building "
                                  "a circuit, or the server is down; try again")
        return TransportError(f"the proxy {self} could not connect to {where} ({exc}): check "
                              "the address and that the server (onion service) is up")


def route(host: str, proxy: Proxy | None) -> Proxy | None:
    """The proxy a connection to ``host`` goes through: ``proxy``, else Tor's usual SOCKS
    port for an onion address, else none (direct)."""
    if proxy is not None:
        return proxy
    if is_onion(host):
        return Proxy.parse(TOR_SOCKS)
    return None


@dataclass(frozen=True)
class Patience:
    """How long to wait and how often to try, for one kind of route."""

    connect_timeout: float      # TCP (through the proxy), SSH handshake and cldcb hello
    keepalive_interval: float   # see cldcb.transport.keepalive
    reconnect_min: float        # the plugin's backoff between connection attempts
    reconnect_max: float
    outage_limit: float         # default for the wrapper's outage-limit
    jitter: bool                # spread retries (many plugins may share one Tor)

    def next_delay(self, delay: float, rng: random.Random | None = None) -> float:
        """The backoff after ``delay``: doubled up to :attr:`reconnect_max`, with up to a
        quarter of jitter when :attr:`jitter` (so several plugins behind one Tor do not
        retry in step)."""
        grown = min(max(delay, self.reconnect_min) * 2, self.reconnect_max)
        if not self.jitter:
            return grown
        return grown * (0.75 + 0.25 * (rng or random).random())


DIRECT = Patience(connect_timeout=10.0, keepalive_interval=30.0, reconnect_min=0.1,
                  reconnect_max=2.0, outage_limit=300.0, jitter=False)
PROXIED = Patience(connect_timeout=60.0, keepalive_interval=60.0, reconnect_min=2.0,
                   reconnect_max=30.0, outage_limit=900.0, jitter=True)


def patience(proxy: Proxy | None) -> Patience:
    """The patience for a connection through ``proxy`` (None: direct)."""
    return DIRECT if proxy is None else PROXIED


def parse_optional(text: str | None) -> Proxy | None:
    """``--proxy`` / ``proxy=``: a proxy, or None for none or ``direct``."""
    if text is None or text.strip().lower() in ("", "direct", "none"):
        return None
    return Proxy.parse(text)
