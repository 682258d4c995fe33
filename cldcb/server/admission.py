"""Who gets into the daemon, and for how long: what a stranger can make it hold is bounded.

The daemon accepts TCP connections itself (:func:`accept_loop`) and decides on
each one before asyncssh sees it (no SSH handshake, no key exchange, nothing
allocated but the socket, closed at once):

- A connection starts *unauthenticated*: at most :attr:`Limits.max_per_source`
  of those per source address and :attr:`Limits.max_unauthenticated` in all.
  Anonymous (``cldcb-recover``) connections stay in this class. When it is
  full, a newcomer (from an address under its share) takes the place of the
  oldest unauthenticated connection, which is closed: a flood from many
  addresses cannot keep a registered client from logging in unless it opens
  more connections than that cap during the client's handshake.
- Once a registered client's SSH login succeeds it moves to the separate
  *client* class (:attr:`Limits.max_connections`). So a flood of strangers,
  which can only fill the unauthenticated class (and, from one address, only
  its share of it), leaves room for registered clients; both caps are far
  below the file descriptor limit (the systemd unit sets ``LimitNOFILE``).
- Channels per connection are limited (:attr:`Limits.channels_per_connection`,
  counted over the connection's life; clients use one).
- A connection that sends no data for its idle timeout is closed: checked
  every timeout, so closed after between one and two timeouts of silence
  (:attr:`Limits.idle_timeout` for clients, which reconnect when they need to;
  :attr:`Limits.anonymous_idle_timeout` before login and for anonymous ones).

When ``accept`` fails for lack of file descriptors or memory (EMFILE…), the
loop backs off (doubling up to a second) instead of spinning, and logs one
line per burst, and one when it accepts again.

The limits come from the environment (``CLDCB_SERVER_MAX_CONNECTIONS``,
``CLDCB_SERVER_MAX_UNAUTHENTICATED``, ``CLDCB_SERVER_MAX_PER_SOURCE``,
``CLDCB_SERVER_CHANNELS_PER_CONNECTION``, ``CLDCB_SERVER_IDLE_TIMEOUT``,
``CLDCB_SERVER_ANONYMOUS_IDLE_TIMEOUT``, in seconds); the defaults are safe.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from cldcb.errors import UsageError

log = logging.getLogger("cldcb.server")

_ENV_PREFIX = "CLDCB_SERVER_"
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BACKOFF_MIN = 0.01
_BACKOFF_MAX = 1.0
REFUSAL_LOG_PERIOD = 60.0
"""Refused connections are logged at most once per this many seconds (with a count)."""


@dataclass(frozen=True)
class Limits:
    """What the daemon admits (see the module docstring)."""

    max_connections: int = 1000
    """Connections of registered clients (logged in), in all."""
    max_unauthenticated: int = 100
    """Connections not (yet) logged in as a registered client, anonymous ones included."""
    max_per_source: int = 10
    """Unauthenticated connections from one source address."""
    channels_per_connection: int = 1
    """Channels (sessions) one connection may open, in its whole life."""
    idle_timeout: float = 3600.0
    """Seconds without data after which a registered client's connection is closed."""
    anonymous_idle_timeout: float = 60.0
    """The same before login and for anonymous connections."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Limits:
        """The defaults, overridden by ``CLDCB_SERVER_<FIELD>`` variables."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            text = env.get(_ENV_PREFIX + f.name.upper())
            if text is None:
                continue
            kind = int if f.type in (int, "int") else float
            try:
                value = kind(text)
            except ValueError:
                value = 0
            if value <= 0:
                raise UsageError(f"{_ENV_PREFIX}{f.name.upper()} must be a positive "
                                 f"{kind.__name__}, got {text!r}")
            values[f.name] = value
        return cls(**values)


class Slot:
    """One admitted connection's place; :meth:`release` it when the connection ends."""

    def __init__(self, admission: Admission, source: str) -> None:
        self._admission = admission
        self.source = source
        self.client = False
        self.released = False
        self.close: Callable[[], None] | None = None
        """Ends the connection (set once it exists): how the oldest one is evicted."""

    def promote(self) -> bool:
        """Move to the registered clients' class; False (stays) if that one is full."""
        a = self._admission
        if self.client or self.released:
            return self.client
        if a.clients >= a.limits.max_connections:
            return False
        a.forget_unauthenticated(self)
        a.clients += 1
        self.client = True
        return True

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        a = self._admission
        if self.client:
            a.clients -= 1
        else:
            a.forget_unauthenticated(self)
        a.released()


class Admission:
    """The counts of admitted connections, by class and source address."""

    def __init__(self, limits: Limits, on_release: Callable[[], None] = lambda: None) -> None:
        self.limits = limits
        self.clients = 0
        self.unauthenticated = 0
        self._by_source: Counter[str] = Counter()
        self._waiting: OrderedDict[Slot, None] = OrderedDict()   # unauthenticated, oldest first
        self.evicted = 0
        self._refused: Counter[str] = Counter()
        self._logged = -REFUSAL_LOG_PERIOD
        self.released = on_release

    def admit(self, source: str) -> Slot | None:
        """A slot for a new connection from ``source``, or None: refuse it."""
        lim = self.limits
        if self._by_source[source] >= lim.max_per_source \
                or (self.unauthenticated >= lim.max_unauthenticated and not self._evict()):
            self._note_refused(source)
            return None
        self.unauthenticated += 1
        self._by_source[source] += 1
        slot = Slot(self, source)
        self._waiting[slot] = None
        return slot

    def _evict(self) -> bool:
        """Close the oldest unauthenticated connection; False if none can be."""
        for slot in self._waiting:
            if slot.close is not None:
                close = slot.close
                slot.release()
                close()
                self.evicted += 1
                return True
        return False

    def forget_unauthenticated(self, slot: Slot) -> None:
        self._waiting.pop(slot, None)
        self.unauthenticated -= 1
        self._by_source[slot.source] -= 1
        if self._by_source[slot.source] <= 0:
            del self._by_source[slot.source]

    def _note_refused(self, source: str) -> None:
        """Count a refusal; one log line per :data:`REFUSAL_LOG_PERIOD` at most."""
        self._refused[source] += 1
        now = time.monotonic()
        if now - self._logged < REFUSAL_LOG_PERIOD:
            return
        counts = ", ".join(f"{n} from {s}" for s, n in self._refused.most_common(5))
        log.warning("refused %d connections over the limits (%s): %d unauthenticated "
                    "connections held (%d oldest closed for newcomers so far), limits %d in "
                    "all and %d per address", sum(self._refused.values()), counts,
                    self.unauthenticated, self.evicted, self.limits.max_unauthenticated,
                    self.limits.max_per_source)
        self._refused.clear()
        self._logged = now


class IdleWatch:
    """Closes a connection that received no data for a whole period (see the module
    docstring); ``received()`` counts what arrived, ``timeout()`` is the current period."""

    def __init__(self, close: Callable[[str], None], received: Callable[[], int],
                 timeout: Callable[[], float]) -> None:
        self._close = close
        self._received = received
        self._timeout = timeout
        self._last = received()
        self._timer = asyncio.get_running_loop().call_later(timeout(), self._check)

    def _check(self) -> None:
        now = self._received()
        if now == self._last:
            self._close(f"no data for {self._timeout():.0f} s")
            return
        self._last = now
        self._timer = asyncio.get_running_loop().call_later(self._timeout(), self._check)

    def stop(self) -> None:
        self._timer.cancel()


async def accept_loop(listener: socket.socket, admission: Admission,
                      start: Callable[[socket.socket, Slot], None]) -> None:
    """Accept connections on ``listener`` (non-blocking) until cancelled: each admitted
    one goes to ``start`` with its slot, the others are closed at once."""
    loop = asyncio.get_running_loop()
    backoff = 0.0
    failed = 0
    while True:
        try:
            sock, peer = await loop.sock_accept(listener)
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if not failed:
                log.error("cannot accept connections: %s; retrying with back-off (raise "
                          "the file limit, LimitNOFILE, or lower the connection limits)",
                          exc.strerror or exc)
            failed += 1
            backoff = min(max(backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX)
            await asyncio.sleep(backoff)
            continue
        if failed:
            log.warning("accepting connections again (%d attempts failed)", failed)
            failed, backoff = 0, 0.0
        slot = admission.admit(str(peer[0]))
        if slot is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()                  # a reset: no TIME_WAIT kept for a refused peer
        else:
            start(sock, slot)
        await asyncio.sleep(0)            # an accept that is ready at once does not yield
