"""The cldcb protocol sessions, sans-IO.

A :class:`ClientSession` and a :class:`ServerSession` turn received bytes into
events and messages into bytes. They own no socket, no clock and no source of
randomness: transports (the asyncssh daemon, ``cldcb-server stdio`` under
OpenSSH, the plugin's and recovery's connections) feed them, and nonces come
in as parameters. The same code thus runs over every transport.

Hello
-----
1. client → ``Hello(min_version, max_version, client_nonce)``
2. server → ``HelloReply(version, server_pub, server_nonce, signature)``:
   the highest version both speak (none: ``Error(VERSION)`` and close), the
   server's public key (its id is ``5`` + hex[1:]) and an ECDSA signature
   (DER) by the server key over ``SHA256(b"server" || th)``, where the
   transcript hash is ``th = SHA256(b"cldcb hello v1" || hello frame ||
   version || server_pub || server_nonce)``. The client checks the key
   against the server id it pinned and the signature; a mismatch ends the
   session with :class:`~cldcb.errors.AuthError` before anything is sent.
3. client → ``Auth(anonymous, client_pub, role, signature)``: either a client
   session, signed by the client key over ``SHA256(b"client" || th ||
   client_pub || role)``, or anonymous (``client_pub`` zero, no signature).
   ``role`` is ``READER`` (status, fetch, recognition entries) or ``WRITER``
   (also write and snapshot; a new writing session of a client takes over
   from the older one, which gets ``Error(SUPERSEDED)``; readers never take
   over).
4. server → ``AuthOk(role)``, or ``Error(AUTH)`` and close when the client
   is not registered, the signature is wrong, an anonymous session is not
   allowed (forced-command mode) or the client is not the one this session
   is pinned to (``stdio --client``).

Until a client session is accepted (and for the whole of an anonymous one)
frames are limited to :data:`PRE_AUTH_MAX_FRAME` bytes: a stranger cannot make
the server buffer a 16 MiB frame. A transport that must check something
before it accepts (the server's store of that client) creates the session with
``confirm_auth``: the ``Authenticated`` event then comes before ``AuthOk``,
which only :meth:`ServerSession.accept` sends (or :meth:`ServerSession.refuse`
an ``Error`` that the client's hello raises).

Because both nonces enter ``th``, neither signature can be replayed into
another session. On the asyncssh daemon the same keys also authenticate the
SSH connection; under OpenSSH the hello is what proves both identities.

The hello is not bound to the SSH connection: whoever holds the sshd host key
can relay it. So, in a client session, every answer that counts toward
durability (``Ack``, ``ChunkAck``, ``SnapshotAck``) ends with a MAC under a
session key from ECDH(client key, server key) and both nonces, over the
requests of the session up to the one it answers (:mod:`cldcb.core.answermac`):
the server session puts it in, the client session takes no acknowledgement
without it (:class:`~cldcb.errors.ForgedAnswer`, which closes the session).
Protocol version 3; the client offers no other, so a version-2 server (whose
acknowledgements carry no MAC) ends the hello with ``Error(VERSION)``, raised
as :class:`~cldcb.errors.RemoteError` saying to upgrade it.

Requests and responses
----------------------
After ``AuthOk`` the client sends requests and the server answers each one,
in order (responses never overtake each other):

- ``PutRecognition(entry)`` → ``Ok`` (an entry is at most
  :data:`~cldcb.core.wire.MAX_RECOGNITION` bytes, of the current format and naming
  the session's own client, else it is refused (``BAD_REQUEST``) and the
  previous one kept; an append-only client's entry, once held, is never
  replaced: other bytes are refused with ``KEPT``). ``ListRecognitions(after, max_count)`` →
  ``Recognitions(entries, next_after)``: one page, in client id order, of at
  most ``min(max_count, RECOGNITION_PAGE)`` entries of clients after ``after``
  ("" for the first page); ``next_after`` is "" on the last page, else the
  ``after`` of the next request (it moves forward, and a page that is not the
  last holds at least one entry). Anonymous sessions may only list.
- ``StatusRequest`` → ``Status`` (the newest record's data_version, kind,
  hash and link; the newest complete snapshot; bytes used; quota;
  append-only; whether the server wants a fresh snapshot).
- ``Write(data_version, kind, link, sealed)`` → ``Ack(data_version, kind,
  link, want_snapshot)`` only once the record is written and fsynced, or
  ``NeedSnapshot(data_version, reason)`` when the record does not continue
  the server's chain (first contact, a gap), or ``Error``.
- ``SnapshotBegin(id, data_version, anchor)`` → ``Ok``, then ``SnapshotChunk(id,
  index, sealed)`` each answered by ``ChunkAck(id, index)`` (the client keeps at
  most a few chunks in flight, so writes interleaved with a background upload
  are never queued behind much), then ``SnapshotEnd(id, chunk_count, manifest)``
  → ``SnapshotAck(id, data_version)`` (the data_version of its
  ``SnapshotBegin``) once the snapshot is durable and visible. Writes may
  interleave with the chunks of a snapshot.
- Every acknowledgement names what it answers: an ``Ack`` the data_version,
  kind and link of its ``Write``; a ``ChunkAck`` the snapshot id and the
  chunk's index; a ``SnapshotAck`` the snapshot id and data_version; and each
  carries the session's MAC (above). A client counts an acknowledgement as
  durability only when its MAC verifies and it names exactly the request it
  answers (answers come in order, so that is the oldest one unanswered);
  anything else is a protocol violation: the client drops the connection and
  trusts nothing more that came on it.
- ``Fetch(at_data_version)`` → ``FetchSnapshot``, ``FetchChunk``×n,
  ``FetchRecord``×m, ``FetchEnd(m)``; or ``Error(NOT_FOUND)``. The records are
  those of the snapshot's own chain (see "Fetching" in :mod:`cldcb.store`).
  ``FetchGeneration(generation)`` → the same, for the snapshot of that number.
- ``ListStates`` → ``States``: the restorable states (each kept snapshot
  generation: its number, data_version, time, whether it is damaged, and the
  data_version range of its chain's records; and the generations set aside as
  damaged), oldest first (:class:`cldcb.core.wire.RestorableState`). Read-only.
- Any request may be answered by ``Error(code, text)``. Codes are in
  :class:`cldcb.core.wire.ErrorCode`; only PROTOCOL, AUTH, VERSION, SUPERSEDED and
  SHUTTING_DOWN end the session.

Correlation
-----------
The client session keeps the requests it sent and not yet fully answered, oldest
first, each with the token its transport gave (:meth:`ClientSession.send`,
:meth:`ClientSession.write_frame`; whatever the transport waits on) and the answers
it expects (:data:`ANSWERS`). A received answer is for the oldest one: the
:class:`Received` event names that request's token and whether the request is
done (its last answer: ``FetchEnd`` or ``Error`` for a fetch, the one answer
otherwise). An answer of a type the request does not expect fails that request
alone (``Received.unexpected`` says what was expected); an answer when no request
is waiting is a :class:`~cldcb.errors.ProtocolError` that closes the session. A
transport that loses the connection takes back the tokens still waiting
(:meth:`ClientSession.forget_requests`).

The per-change shortcuts (:meth:`ClientSession.write_frame`,
:meth:`ClientSession.ack_in`; :meth:`ServerSession.write_in`,
:meth:`ServerSession.ack`) give what the general way gives, without the message
objects; each checks the same preconditions as the general way, stated once
(:meth:`ClientSession._check_send`, :meth:`_Base._between_frames`,
:meth:`ServerSession._refusal`), and where those refuse or bytes are held back
gives nothing (None: the caller takes the general way) or raises the same.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import coincurve

from cldcb.core import wire
from cldcb.core.answermac import MACED_TYPES, AnswerMacs, session_key
from cldcb.core.ids import client_id_from_pubkey, server_id_from_pubkey
from cldcb.core.wire import ErrorCode
from cldcb.errors import (
    AckMismatch,
    AuthError,
    CldcbError,
    ForgedAnswer,
    ProtocolError,
    RemoteError,
)

SUPPORTED_VERSIONS = (wire.PROTOCOL_VERSION, wire.PROTOCOL_VERSION)
PRE_AUTH_MAX_FRAME = 4096
"""The frame limit before a client session is accepted and in anonymous sessions (hello,
auth and the listing request are a few hundred bytes)."""
_ZERO33 = bytes(33)
FATAL_CODES = frozenset({ErrorCode.PROTOCOL, ErrorCode.AUTH, ErrorCode.VERSION,
                         ErrorCode.SUPERSEDED, ErrorCode.SHUTTING_DOWN})
STREAMED: tuple[type[wire.Message], ...] = ()
"""The answers of a fetch: any number of them, up to ``FetchEnd`` (see above)."""
_WRITE_ANSWERS: tuple[type[wire.Message], ...] = (wire.Ack, wire.NeedSnapshot)
ANSWERS: dict[type[wire.Message], tuple[type[wire.Message], ...]] = {
    wire.PutRecognition: (wire.Ok,),
    wire.ListRecognitions: (wire.Recognitions,),
    wire.StatusRequest: (wire.Status,),
    wire.Write: _WRITE_ANSWERS,
    wire.SnapshotBegin: (wire.Ok,),
    wire.SnapshotChunk: (wire.ChunkAck,),
    wire.SnapshotEnd: (wire.SnapshotAck,),
    wire.Fetch: STREAMED,
    wire.FetchGeneration: STREAMED,
    wire.ListStates: (wire.States,),
}
"""Each request and the answers it expects (besides ``Error``); :data:`STREAMED`: a fetch's."""
_WRITES = (wire.Write, wire.SnapshotBegin, wire.SnapshotChunk, wire.SnapshotEnd)


class Role(IntEnum):
    READER = 0
    WRITER = 1


def _transcript(hello_frame: bytes, version: int, server_pub: bytes, server_nonce: bytes) -> bytes:
    return hashlib.sha256(b"cldcb hello v1" + hello_frame + struct.pack(">H", version)
                          + server_pub + server_nonce).digest()


def _server_digest(th: bytes) -> bytes:
    return hashlib.sha256(b"server" + th).digest()


def _client_digest(th: bytes, client_pub: bytes, role: int) -> bytes:
    return hashlib.sha256(b"client" + th + client_pub + bytes([role])).digest()


def _verify(pub: bytes, signature: bytes, digest: bytes) -> bool:
    try:
        return coincurve.PublicKey(pub).verify(signature, digest, hasher=None)
    except Exception:  # malformed DER or key: a failed verification
        return False


# --- matching acknowledgements (see the module docstring) -------------------------

def check_ack(ack: wire.Ack, data_version: int, kind: int, link: bytes) -> None:
    """Raise :class:`AckMismatch` unless ``ack`` names ``Write(data_version, kind, link,
    …)``, the write it answers."""
    if ack.data_version != data_version or ack.kind != kind or ack.link != link:
        raise _mismatch(f"Ack(data_version {ack.data_version}, kind {ack.kind}, link "
                        f"{ack.link.hex()[:16]}…)", f"Write(data_version {data_version}, "
                        f"kind {int(kind)}, link {link.hex()[:16]}…)")


def check_chunk_ack(ack: wire.ChunkAck, snapshot_id: int, index: int) -> None:
    """Raise :class:`AckMismatch` unless ``ack`` names chunk ``index`` of ``snapshot_id``."""
    if ack.snapshot_id != snapshot_id or ack.index != index:
        raise _mismatch(f"ChunkAck(snapshot {ack.snapshot_id}, index {ack.index})",
                        f"SnapshotChunk(snapshot {snapshot_id}, index {index})")


def check_snapshot_ack(ack: wire.SnapshotAck, snapshot_id: int, data_version: int) -> None:
    """Raise :class:`AckMismatch` unless ``ack`` names the snapshot ``snapshot_id`` of
    ``data_version`` (the ``SnapshotBegin``'s), the one its ``SnapshotEnd`` ended."""
    if ack.snapshot_id != snapshot_id or ack.data_version != data_version:
        raise _mismatch(f"SnapshotAck(snapshot {ack.snapshot_id}, data_version "
                        f"{ack.data_version})", f"SnapshotEnd(snapshot {snapshot_id}, "
                        f"data_version {data_version})")


def _older_server(text: str) -> str:
    return (f"{text} (this cldcb speaks protocol version {wire.PROTOCOL_VERSION}, in which "
            "the server key authenticates every acknowledgement; an older server's "
            "acknowledgements cannot be told from a forger's, so none is counted: upgrade "
            "cldcb on the server, or this end if the server is newer)")


def _mismatch(got: str, sent: str) -> AckMismatch:
    return AckMismatch(f"protocol violation: the server answered {sent} with {got}, which "
                       "acknowledges something else; not counted, connection dropped (the "
                       "server is faulty or not to be trusted: tell its operator)")


# --- events ----------------------------------------------------------------------

@dataclass(frozen=True)
class HelloComplete:
    """Client side: the server proved its id and accepted us."""

    server_id: str
    version: int
    role: Role


@dataclass(frozen=True)
class Authenticated:
    """Server side: the hello is done; ``client_id`` is None for anonymous."""

    client_id: str | None
    role: Role


@dataclass(frozen=True)
class Received:
    """A request (server side) or a response (client side) after the hello.

    Client side (see "Correlation" above): ``request`` is the token of the request it
    answers, ``done`` whether it is that request's last answer, and ``unexpected``,
    when not empty, says that it is no answer that request expects (which fails it)."""

    message: wire.Message
    request: object = None
    done: bool = True
    unexpected: str = ""


Event = HelloComplete | Authenticated | Received


class _Base:
    _macs: AnswerMacs | None = None

    def __init__(self, hash_lock: AbstractContextManager[Any] | None = None) -> None:
        self.hash_lock = hash_lock     # for AnswerMacs.absorb from a worker thread
        self._decoder = wire.FrameDecoder()
        self._out: list[bytes] = []
        self.closed = False

    @property
    def unhashed_requests(self) -> int:
        """Request frames counted for the answer MACs but not hashed yet (large ones wait
        for :meth:`absorb`, see :mod:`cldcb.core.answermac`)."""
        return 0 if self._macs is None else self._macs.deferred

    def absorb(self) -> None:
        """Hash those request frames now, in order; from a worker thread only when the
        session was given a ``hash_lock`` (a ``threading.Lock()``)."""
        macs = self._macs
        if macs is not None:
            macs.absorb()

    def data_to_send(self) -> bytes:
        """Bytes the transport must write now (then the buffer is empty)."""
        if not self._out:
            return b""
        out = b"".join(self._out)       # one frame: that frame itself, not a copy
        self._out.clear()
        return out

    def _emit(self, msg: wire.Message) -> bytes:
        frame = wire.encode(msg)
        self._out.append(frame)
        return frame

    def _between_frames(self) -> bool:
        """Whether the session is open and holds no part of a frame: a whole frame
        received now may skip the decoder (the per-change shortcuts)."""
        return self._state == "open" and not self.closed and not self._decoder.pending


class ClientSession(_Base):
    """The client end: pins the server id, proves the client key (or stays anonymous).

    ``client_priv`` None makes an anonymous session (list recognition entries
    only). Call :meth:`start`, then feed bytes to :meth:`receive_data`; the
    first event is :class:`HelloComplete`, then :class:`Received` responses, each
    naming the token of the request it answers (see "Correlation" above).
    Raises :class:`AuthError` if the server is not the pinned one or refuses us,
    :class:`ProtocolError` on malformed input; an ``Error`` response with a
    fatal code is raised as :class:`RemoteError` and closes the session.
    """

    def __init__(self, server_id: str, client_priv: bytes | None, role: Role,
                 nonce: bytes, *, hash_lock: AbstractContextManager[Any] | None = None) -> None:
        super().__init__(hash_lock)
        if len(nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        self.server_id = server_id.lower()
        self._priv = coincurve.PrivateKey(client_priv) if client_priv is not None else None
        self.client_pub = self._priv.public_key.format() if self._priv else None
        self.role = role if self._priv else Role.READER
        self._nonce = nonce
        self._hello = b""
        self._state = "new"
        self.version = 0
        self._macs: AnswerMacs | None = None
        self._pending: deque[tuple[object, tuple[type[wire.Message], ...]]] = deque()

    @property
    def established(self) -> bool:
        return self._state == "open"

    def start(self) -> bytes:
        if self._state != "new":
            raise ProtocolError("session already started")
        self._hello = self._emit(wire.Hello(SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[1],
                                            self._nonce))
        self._state = "hello-sent"
        return self.data_to_send()

    def _check_send(self, msg_type: type[wire.Message]) -> None:
        """Raise unless this session may send a request of ``msg_type`` now."""
        if self._state != "open":
            raise ProtocolError("the session is not open (hello not complete, or closed)")
        if self._priv is None and msg_type is not wire.ListRecognitions:
            raise ProtocolError("an anonymous session can only list recognition entries")
        if msg_type not in ANSWERS:
            raise ProtocolError(f"{msg_type.__name__} is not a request")

    def send(self, msg: wire.Message, token: object = None) -> bytes:
        """Encode a request; returns its bytes (also left in :meth:`data_to_send`). Its
        answers come as :class:`Received` events naming ``token``."""
        self._check_send(type(msg))
        frame = self._emit(msg)
        if self._macs is not None:
            self._macs.request(frame)
        self._pending.append((token, ANSWERS[type(msg)]))
        return frame

    def write_frame(self, data_version: int, kind: int, link: bytes, sealed: bytes,
                    token: object = None) -> bytes:
        """The bytes to write for ``Write(data_version, kind, link, sealed)``: what
        :meth:`send` then :meth:`data_to_send` give, without the message object (every
        change goes through here). Raises as :meth:`send`."""
        self._check_send(wire.Write)
        frame = wire.write_frame(data_version, kind, link, sealed)
        assert self._macs is not None
        self._macs.request(frame)
        self._pending.append((token, _WRITE_ANSWERS))
        return self.data_to_send() + frame if self._out else frame

    def chunk_frame(self, frame: bytearray, token: object = None) -> bytes | bytearray:
        """The bytes to write for a ``SnapshotChunk`` frame built whole by
        :func:`wire.snapshot_chunk_frame` (and never changed again: it is kept, not copied,
        until the answer MAC hashed it): what :meth:`send` then :meth:`data_to_send` give
        for that message. Raises as :meth:`send`."""
        self._check_send(wire.SnapshotChunk)
        if self._macs is not None:
            self._macs.request(frame)
        self._pending.append((token, ANSWERS[wire.SnapshotChunk]))
        return self.data_to_send() + frame if self._out else frame

    def ack_in(self, data: bytes) -> tuple[object, wire.Ack] | None:
        """The Ack that ``data`` is and the token of the Write it answers, when it is
        exactly one whole Ack frame with this session's MAC, nothing else was received
        before it and the oldest request waiting is a Write: the event
        :meth:`receive_data` would give, without the decoder (the answer to nearly every
        Write). None: feed :meth:`receive_data` (which raises what is wrong)."""
        pending = self._pending
        if not pending or pending[0][1] is not _WRITE_ANSWERS or not self._between_frames():
            return None
        ack = wire.ack_in(data)
        if ack is None or self._macs is None or not self._macs.check(data):
            return None
        return pending.popleft()[0], ack

    def forget_requests(self) -> list[object]:
        """The tokens of the requests still waiting for an answer, oldest first; the
        session forgets them (the transport fails them: the connection is gone)."""
        tokens = [token for token, _ in self._pending]
        self._pending.clear()
        return tokens

    def _answer(self, msg: wire.Message) -> Received:
        """``msg`` as the answer to the oldest request waiting (see "Correlation")."""
        if not self._pending:
            raise self._fail(f"unexpected {type(msg).__name__} from the server")
        token, expect = self._pending[0]
        if expect is STREAMED:
            done = isinstance(msg, (wire.FetchEnd, wire.Error))
            if done:
                self._pending.popleft()
            return Received(msg, token, done)
        self._pending.popleft()
        if isinstance(msg, (wire.Error, *expect)):
            return Received(msg, token)
        return Received(msg, token, unexpected=f"expected "
                        f"{' or '.join(e.__name__ for e in expect)}, got {type(msg).__name__}")

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed:
            raise ProtocolError("the session is closed")
        try:
            messages = self._decoder.feed(data)
        except ProtocolError:
            self.closed = True
            raise
        events: list[Event] = []
        for msg in messages:
            events.extend(self._handle(msg))
        return events

    def _handle(self, msg: wire.Message) -> list[Event]:
        if isinstance(msg, wire.Error):
            fatal = msg.code in FATAL_CODES or self._state != "open"
            if fatal:
                self.closed = True
                self._state = "closed"
                if msg.code == ErrorCode.AUTH:
                    raise AuthError(f"server {self.server_id[:12]}… refused us: {msg.text}")
                if msg.code == ErrorCode.VERSION:
                    raise RemoteError(msg.code, _older_server(msg.text))
                raise RemoteError(msg.code, msg.text)
            if self._macs is not None:
                self._macs.take(msg.TYPE)
            return [self._answer(msg)]
        if self._state == "hello-sent":
            if not isinstance(msg, wire.HelloReply):
                raise self._fail(f"expected HelloReply, got {type(msg).__name__}")
            return self._on_hello_reply(msg)
        if self._state == "auth-sent":
            if not isinstance(msg, wire.AuthOk):
                raise self._fail(f"expected AuthOk, got {type(msg).__name__}")
            self._state = "open"
            return [HelloComplete(self.server_id, self.version, Role(msg.role))]
        if self._state == "open":
            if msg.TYPE in MACED_TYPES:
                if self._macs is None or not self._macs.check(wire.encode(msg)):
                    self.closed = True
                    self._state = "closed"
                    raise ForgedAnswer(
                        f"protocol violation: the server's {type(msg).__name__} does not "
                        "carry this session's MAC, so the holder of the key of server "
                        f"{self.server_id[:14]}… did not make it (someone who holds the "
                        "SSH host key but not the server key is in the middle, or the "
                        "server is faulty); not counted, connection dropped: tell the "
                        "server's operator")
            elif self._macs is not None:
                self._macs.take(msg.TYPE)
            return [self._answer(msg)]
        raise self._fail(f"unexpected {type(msg).__name__} before the hello")

    def _fail(self, text: str) -> ProtocolError:
        self.closed = True
        self._state = "closed"
        return ProtocolError(text)

    def _on_hello_reply(self, msg: wire.HelloReply) -> list[Event]:
        if not SUPPORTED_VERSIONS[0] <= msg.version <= SUPPORTED_VERSIONS[1]:
            raise self._fail(f"server chose protocol version {msg.version}, which we do not speak")
        try:
            got = server_id_from_pubkey(msg.server_pub)
        except CldcbError:
            got = "an invalid key"
        if got != self.server_id:
            self.closed = True
            raise AuthError(
                f"the server's key is {got}, not the pinned server id {self.server_id}: "
                "check --server-id, or someone is in the middle of the connection")
        th = _transcript(self._hello, msg.version, msg.server_pub, msg.server_nonce)
        if not _verify(msg.server_pub, msg.signature, _server_digest(th)):
            self.closed = True
            raise AuthError(f"server {self.server_id[:12]}… did not prove its key "
                            "(bad hello signature): someone may be in the middle")
        self.version = msg.version
        if self._priv is not None:
            assert self.client_pub is not None
            self._macs = AnswerMacs(session_key(self._priv, msg.server_pub, self._nonce,
                                                msg.server_nonce, self.client_pub,
                                                msg.server_pub), self.hash_lock)
        if self._priv is None:
            self._emit(wire.Auth(True, _ZERO33, int(Role.READER), b""))
        else:
            assert self.client_pub is not None
            sig = self._priv.sign(_client_digest(th, self.client_pub, int(self.role)),
                                  hasher=None)
            self._emit(wire.Auth(False, self.client_pub, int(self.role), sig))
        self._state = "auth-sent"
        return []


class ServerSession(_Base):
    """The server end of one protocol session.

    ``is_registered(client_id)`` says whether a client may authenticate;
    ``confirm_auth``: the transport answers :class:`Authenticated` with :meth:`accept`
    (``AuthOk``) or :meth:`refuse` (without it, ``AuthOk`` goes at once);
    ``forced_client_id`` pins the session to one client (``stdio --client``:
    no anonymous session, no other id); ``allow_anonymous`` lets anonymous
    sessions list recognition entries. Feed bytes to :meth:`receive_data`;
    the first event is :class:`Authenticated`, then one :class:`Received` per
    request, which the transport answers with :meth:`send` in order.
    Requests a session may not make are answered here (``Error(NOT_ALLOWED)``)
    and never reach the transport. After a fatal problem the session answers
    ``Error`` and sets :attr:`closed`; the transport flushes and hangs up.
    """

    def __init__(self, server_priv: bytes, nonce: bytes, *,
                 is_registered: Callable[[str], bool],
                 forced_client_id: str | None = None,
                 allow_anonymous: bool = True, confirm_auth: bool = False,
                 hash_lock: AbstractContextManager[Any] | None = None) -> None:
        super().__init__(hash_lock)
        self._decoder.max_frame = PRE_AUTH_MAX_FRAME
        self._confirm = confirm_auth
        self._pending: tuple[str | None, Role] | None = None
        self._priv = coincurve.PrivateKey(server_priv)
        self.server_pub = self._priv.public_key.format()
        self._nonce = nonce
        self._is_registered = is_registered
        self._forced = forced_client_id.lower() if forced_client_id else None
        self._allow_anon = allow_anonymous and self._forced is None
        self._state = "new"
        self._th = b""
        self._client_nonce = b""
        self._macs: AnswerMacs | None = None
        self._pending_macs: AnswerMacs | None = None
        self.client_id: str | None = None
        self.role = Role.READER

    def send(self, msg: wire.Message) -> None:
        """Queue a response (or ``Error``) for the transport to write."""
        if isinstance(msg, wire.Error) and msg.code in FATAL_CODES:
            self.closed = True
        if self._macs is None:
            self._emit(msg)
        else:
            self._out.append(self._macs.seal(wire.encode(msg)))

    def write_in(self, data: bytes) -> wire.Write | None:
        """The Write that ``data`` is, when this is an open writing session, ``data`` is
        exactly one whole Write frame and nothing else was received before it: the
        request :meth:`receive_data` would give, without the decoder (nearly every
        request of a streaming writer). None: feed :meth:`receive_data`."""
        if not self._between_frames() or self._refusal(wire.Write):
            return None
        write = wire.write_in(data)
        if write is not None and self._macs is not None:
            self._macs.request(data)
        return write

    def ack(self, data_version: int, kind: int, link: bytes, want_snapshot: bool) -> bytes:
        """The bytes to write for ``Ack(data_version, kind, link, want_snapshot)``: what
        :meth:`send` then :meth:`data_to_send` give, without the message object."""
        frame = wire.ack_frame(data_version, kind, link, want_snapshot)
        if self._macs is not None:
            frame = self._macs.seal(frame)
        return self.data_to_send() + frame if self._out else frame

    def accept(self) -> None:
        """Send ``AuthOk`` for the session :class:`Authenticated` announced (``confirm_auth``);
        then requests flow (a client's frames up to :data:`wire.MAX_FRAME`)."""
        if self._state != "authenticating" or self._pending is None or self.closed:
            return
        self.client_id, self.role = self._pending
        self._state = "open"
        self._emit(wire.AuthOk(int(self.role)))
        if self.client_id is not None:
            self._decoder.max_frame = wire.MAX_FRAME
            self._macs = self._pending_macs
            assert self._macs is not None
            self._decoder.on_frame = self._macs.request

    def refuse(self, code: ErrorCode, text: str) -> None:
        """Answer with a fatal error and close (e.g. a writer was superseded)."""
        self._emit(wire.Error(int(code), text))
        self.closed = True

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self.refuse(ErrorCode.PROTOCOL, str(exc))
            return []
        events: list[Event] = []
        for msg in frames:
            if self.closed:
                break
            events.extend(self._handle(msg))
        return events

    def _handle(self, msg: wire.Message) -> list[Event]:
        if self._state == "new":
            if not isinstance(msg, wire.Hello):
                self.refuse(ErrorCode.PROTOCOL, "expected Hello")
                return []
            return self._on_hello(msg)
        if self._state == "hello-done":
            if not isinstance(msg, wire.Auth):
                self.refuse(ErrorCode.PROTOCOL, "expected Auth")
                return []
            return self._on_auth(msg)
        if self._state == "authenticating":
            self.refuse(ErrorCode.PROTOCOL, f"unexpected {type(msg).__name__} before AuthOk")
            return []
        refusal = self._refusal(type(msg))
        if refusal:
            self.send(wire.Error(int(ErrorCode.NOT_ALLOWED), refusal))
            return []
        if isinstance(msg, (wire.Hello, wire.Auth)) or msg.TYPE >= 30:
            self.refuse(ErrorCode.PROTOCOL, f"unexpected {type(msg).__name__}")
            return []
        return [Received(msg)]

    def _refusal(self, msg_type: type[wire.Message]) -> str:
        """Why this open session may not make a request of ``msg_type`` ("": it may): what
        anonymous and read-only sessions may ask, for :meth:`_handle` and :meth:`write_in`."""
        if self.client_id is None and msg_type is not wire.ListRecognitions:
            return "an anonymous session can only list recognition entries"
        if self.role is not Role.WRITER and msg_type in _WRITES:
            return "a read-only session cannot write; connect as a writer"
        return ""

    def _on_hello(self, msg: wire.Hello) -> list[Event]:
        lo, hi = max(msg.min_version, SUPPORTED_VERSIONS[0]), min(msg.max_version,
                                                                  SUPPORTED_VERSIONS[1])
        if lo > hi:
            self.refuse(ErrorCode.VERSION,
                        f"this server speaks protocol versions {SUPPORTED_VERSIONS[0]}.."
                        f"{SUPPORTED_VERSIONS[1]}, the client {msg.min_version}.."
                        f"{msg.max_version}: upgrade the older side")
            return []
        hello_frame = wire.encode(msg)
        self._client_nonce = msg.client_nonce
        self._th = _transcript(hello_frame, hi, self.server_pub, self._nonce)
        sig = self._priv.sign(_server_digest(self._th), hasher=None)
        self._emit(wire.HelloReply(hi, self.server_pub, self._nonce, sig))
        self._state = "hello-done"
        return []

    def _on_auth(self, msg: wire.Auth) -> list[Event]:
        if msg.role not in (Role.READER, Role.WRITER):
            self.refuse(ErrorCode.PROTOCOL, f"unknown role {msg.role}")
            return []
        if msg.anonymous:
            if not self._allow_anon:
                self.refuse(ErrorCode.AUTH, "anonymous sessions are not allowed here")
                return []
            return self._authenticated(None, Role.READER)
        try:
            client_id = client_id_from_pubkey(msg.client_pub)
        except CldcbError:
            self.refuse(ErrorCode.AUTH, "the client key is not a valid public key")
            return []
        if not _verify(msg.client_pub, msg.signature,
                       _client_digest(self._th, msg.client_pub, msg.role)):
            self.refuse(ErrorCode.AUTH, "bad client signature in the hello")
            return []
        if self._forced is not None and client_id != self._forced:
            self.refuse(ErrorCode.AUTH, f"this SSH key is pinned to client {self._forced}, "
                                        f"not {client_id}")
            return []
        if not self._is_registered(client_id):
            self.refuse(ErrorCode.AUTH, f"client {client_id} is not registered on this server; "
                                        f"run `cldcb-server add {client_id}` there")
            return []
        self._pending_macs = AnswerMacs(session_key(self._priv, msg.client_pub,
                                                    self._client_nonce, self._nonce,
                                                    msg.client_pub, self.server_pub),
                                      self.hash_lock)
        return self._authenticated(client_id, Role(msg.role))

    def _authenticated(self, client_id: str | None, role: Role) -> list[Event]:
        self._pending = (client_id, role)
        self._state = "authenticating"
        if not self._confirm:
            self.accept()
        return [Authenticated(client_id, role)]
