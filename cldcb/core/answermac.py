"""What only the server key can say: the MAC of every acknowledgement (protocol 3).

Pure code. An SSH host key proves nothing about the cldcb server behind it: under
sshd, whoever holds or replaces the host key can sit between the client and the
server, relay the hello (which the server key signs) and then answer in the
server's place. So every answer that counts toward durability (``Ack``,
``ChunkAck``, ``SnapshotAck``: :data:`cldcb.core.wire.MACED`) ends with a MAC that only
the holders of the server key and of the client key can make:

- the session key: ``k = HKDF-SHA256(ikm = ECDH(client key, server key), salt =
  client_nonce || server_nonce, info = "cldcb answer mac v3" || client_pub ||
  server_pub)`` (ECDH: SHA256 of the compressed shared point, as everywhere in
  cldcb). Both hello nonces enter, so a MAC of one session verifies in no other.
  Anonymous sessions have no key (and nothing that counts toward durability).
- the requests: both ends hash every request frame of the session in order (after
  ``AuthOk``), the client as it sends it, the server as it receives it. Request
  ``n`` (from 0) leaves ``r_n``, the hash of frames ``0..n``.
- answers come in order and each answers the oldest request not yet completed: a
  ``Fetch``'s ``FetchSnapshot``, ``FetchChunk`` and ``FetchRecord`` leave it
  open, its ``FetchEnd`` or ``Error`` completes it, as any single answer does for
  every other request.
- ``mac = HMAC-SHA256(k, u64(n) || r_n || the answer's frame but its last
  MAC_SIZE bytes)[:MAC_SIZE]``, ``n`` being the request it answers.

So a valid MAC says: the holder of the server key, in this session, acknowledges
request ``n`` after receiving exactly the requests ``0..n`` the client sent. A relay
cannot make one, cannot replay one of another request or session, and cannot have
the server acknowledge bytes other than the client's (a changed sealed record, a
dropped request) without the client noticing.

Where the hashing runs: a frame of :data:`DEFER_BYTES` or more (a snapshot chunk) is
not hashed when it is counted but queued, and so is every frame after it until the
queue is hashed, in order, by :meth:`AnswerMacs.absorb`: from a worker thread
(SHA-256 lets go of the GIL, so the hashing of a 1 MiB chunk, about 0.6 ms, runs
beside the event loop instead of on it), or at the latest when an answer's MAC
needs ``r_n``. The hashes, and so the MACs, are exactly those of hashing each
frame as it comes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import coincurve
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cldcb.core import wire
from cldcb.core.wire import MAC_SIZE

_INFO = b"cldcb answer mac v3"
_REQUESTS = b"cldcb requests v3"
_U64 = struct.Struct(">Q")
_PARTIAL = frozenset({wire.FetchSnapshot.TYPE, wire.FetchChunk.TYPE, wire.FetchRecord.TYPE})
MACED_TYPES = frozenset(cls.TYPE for cls in wire.MACED)
DEFER_BYTES = 64 << 10
"""Request frames at least this long are hashed by :meth:`AnswerMacs.absorb`."""


class _Request:
    """A request counted: its frame until hashed, then its context ``u64(n) || r_n``."""

    __slots__ = ("n", "frame", "context")

    def __init__(self, n: int, frame: bytes | bytearray) -> None:
        self.n = n
        self.frame = frame
        self.context: bytes | None = None


def session_key(own_priv: coincurve.PrivateKey, peer_pub: bytes, client_nonce: bytes,
                server_nonce: bytes, client_pub: bytes, server_pub: bytes) -> bytes:
    """The session's MAC key (see the module docstring); the same at both ends."""
    shared = own_priv.ecdh(peer_pub)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=client_nonce + server_nonce,
                info=_INFO + client_pub + server_pub).derive(shared)


class AnswerMacs:
    """One end's bookkeeping: the requests of a session and the MACs of their answers.

    ``lock`` guards :meth:`absorb` when a worker thread calls it (a
    ``threading.Lock()``; none is needed when everything runs on one thread).
    The client calls :meth:`request` with each request frame it sends and
    :meth:`check` with each answer frame it receives; the server calls
    :meth:`request` with each request frame it receives and :meth:`seal` on each
    answer frame it sends.
    """

    def __init__(self, key: bytes,
                 lock: AbstractContextManager[Any] | None = None) -> None:
        self._key = key
        self._hash = hashlib.sha256(_REQUESTS)
        self._count = 0
        self._open: deque[_Request] = deque()      # each request not completed
        self._queue: deque[_Request] = deque()     # requests counted, not yet hashed
        # one hasher at a time, in order: a threading.Lock from the transport when a
        # worker thread calls absorb (the core itself starts no thread)
        self._hashing = lock if lock is not None else nullcontext()

    def request(self, frame: bytes | bytearray | memoryview) -> None:
        """Count the request ``frame``: a memoryview is copied (the caller may reuse its
        buffer); ``bytes`` or a ``bytearray`` the caller never changes again is kept as it
        is until hashed (a large frame: no copy)."""
        kept = type(frame) is bytes or type(frame) is bytearray
        req = _Request(self._count, frame if kept else bytes(frame))  # type: ignore[arg-type]
        self._count += 1
        self._open.append(req)
        self._queue.append(req)
        if len(frame) < DEFER_BYTES and len(self._queue) == 1:
            self.absorb()                          # nothing waits before it: at once

    @property
    def deferred(self) -> int:
        """Requests counted but not hashed yet."""
        return len(self._queue)

    def absorb(self) -> None:
        """Hash the requests counted so far, in order (from any thread; see the module
        docstring)."""
        with self._hashing:
            queue = self._queue
            while queue:
                req = queue[0]
                self._hash.update(req.frame)
                req.context = _U64.pack(req.n) + self._hash.copy().digest()
                req.frame = b""
                queue.popleft()

    def _context(self, req: _Request) -> bytes:
        if req.context is None:
            self.absorb()
        assert req.context is not None
        return req.context

    def _mac(self, context: bytes, frame: bytes) -> bytes:
        return hmac.digest(self._key, context + frame[:-MAC_SIZE], "sha256")[:MAC_SIZE]

    def take(self, type_: int) -> bytes | None:
        """Count an answer of this type against the request it answers; that request's
        context (None: no request waits)."""
        if not self._open:
            return None
        return self._context(self._open[0] if type_ in _PARTIAL else self._open.popleft())

    def seal(self, frame: bytes) -> bytes:
        """The answer ``frame`` as it goes out: counted against the request it answers and,
        for an acknowledgement, with its MAC in its last bytes."""
        context = self.take(frame[4])
        if frame[4] not in MACED_TYPES or context is None:
            return frame
        return frame[:-MAC_SIZE] + self._mac(context, frame)

    def check(self, frame: bytes) -> bool:
        """Take the answer ``frame``: False (and nothing counted) if it is an acknowledgement
        whose MAC is not this session's for the request it answers."""
        if frame[4] not in MACED_TYPES:
            self.take(frame[4])
            return True
        if not self._open or not hmac.compare_digest(
                self._mac(self._context(self._open[0]), frame), frame[-MAC_SIZE:]):
            return False
        self._open.popleft()
        return True
