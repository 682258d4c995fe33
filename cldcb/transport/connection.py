"""The client end of a connection to a cldcb server, over SSH (asyncio).

Two kinds of address, one protocol (:mod:`cldcb.core.session`):

- ``HOST:PORT``: a standalone ``cldcb-server serve``. The SSH host key is
  pinned from the ``5…`` server id alone; the client key is the SSH key;
  the SSH user is ``cldcb`` (``cldcb-recover``, with no credentials, for an
  anonymous session).
- ``ssh://[USER@]HOST[:PORT]``: OpenSSH sshd with the ``cldcb`` subsystem.
  The host key is the one given (pinned at install time and recorded in the
  wrapper; ``recover`` may read it from known_hosts, and shows it), never
  looked up in ``~/.ssh/known_hosts`` here; a client
  session authenticates with the Ed25519 key derived from the client secret,
  an anonymous session (recovery) with the operator's own SSH keys and agent.

Either may go through a SOCKS5 proxy (:mod:`cldcb.transport.proxy`): the spec's
``proxy``, else Tor's usual SOCKS port for a ``….onion`` host. The proxy
resolves the host name; the host key is checked exactly as on a direct
connection; timeouts and keepalives are those of the route's patience.

This module is the I/O adapter of a :class:`~cldcb.core.session.ClientSession`: it
feeds the session the bytes received and writes what it gives; the session owns
the protocol's state, request correlation included (which request an answer is
for, whether it is the last one, whether it is of the kind expected). Each
request is sent with its waiter as the session's token, and each answer the
session names is handed to that waiter. Requests may be issued concurrently
from several tasks. :meth:`Connection.write_nowait` is the callback form of ``write`` for
the plugin's hot path: the answer is handed over synchronously from the
receiving callback, with no task switch in between. ``TransportError``
means the connection is gone (all waiters fail with it); ``RemoteError`` is
an ``Error`` answer; ``AuthError`` a failed hello.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from cldcb.core import wire
from cldcb.core.addresses import ServerAddress
from cldcb.core.ids import parse_server_id
from cldcb.core.remote_text import escape_remote
from cldcb.core.session import ClientSession, HelloComplete, Received, Role
from cldcb.errors import (
    AuthError,
    CldcbError,
    ProtocolError,
    RemoteError,
    TransportError,
    UsageError,
)
from cldcb.transport.keepalive import Keepalive
from cldcb.transport.proxy import Patience, Proxy, patience, route
from cldcb.transport.sshkeys import (
    SECP256K1_SSH_ALG,
    derived_ssh_key,
    secp256k1_ssh_key,
    secp256k1_ssh_public_key,
)

SSH_USER = "cldcb"
RECOVER_USER = "cldcb-recover"
SUBSYSTEM = "cldcb"
PREFERRED_CIPHERS = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                     "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr"]

MAX_RECOGNITIONS = 1_000_000
"""Most recognition entries a client reads from one server (a million clients)."""

SSH_WINDOW = 8 << 20
SSH_MAX_PACKET = 32 << 10
"""Channel window and largest packet this end accepts (asyncssh's defaults: 2 MiB and
32 KiB). The large window keeps a 1 MiB snapshot chunk stream flowing; the packets stay
small because the two ends work on a stream at the same time only packet by packet: a
receiver decrypts one while the sender encrypts the next. Measured on a 512 MiB snapshot
upload (3 alternating rounds, same load): 137–146 MB/s with 32 KiB packets, 92–119 MB/s
with 256 KiB ones. OpenSSH's sshd keeps its own limits for what it receives; the
protocol works with any."""
SSH_CLIENT_MAX_PACKET = 256 << 10
"""Largest packet a client accepts (what the server sends: fetch answers). Receiving is
where recovery spends its event loop (asyncssh's work per packet, on one core shared with
the replay): on a 1 GiB + 100,000 records recovery, 256 KiB packets took 13.1-13.4 s
against 14.4-14.6 s with 32 KiB ones (alternating rounds, load 2.7-3.0 on 2 CPUs). What
a client sends is bounded by the server's :data:`SSH_MAX_PACKET`."""

@dataclass(frozen=True)
class ServerSpec:
    """A server to talk to: address, pinned server id, pinned sshd host key (ssh:// only),
    and the SOCKS5 proxy named for it (None: direct, or Tor's port for an onion)."""

    address: ServerAddress
    server_id: str
    host_key: str | None = None
    proxy: Proxy | None = None

    @property
    def route(self) -> Proxy | None:
        """The proxy connections go through (None: direct)."""
        return route(self.address.host, self.proxy)

    @property
    def patience(self) -> Patience:
        return patience(self.route)

    def timeout(self, direct: float) -> float:
        """``direct`` seconds on a direct route, the proxied connect timeout otherwise."""
        return direct if self.route is None else self.patience.connect_timeout

    def describe_route(self) -> str:
        """``direct`` or ``via socks5://HOST:PORT``."""
        via = self.route
        return "direct" if via is None else f"via {via}"


class _Channel(asyncssh.SSHClientSession[bytes]):
    def __init__(self, owner: Connection) -> None:
        self._owner = owner

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._owner._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._on_lost(exc)


FETCH_QUEUE_BYTES = 8 << 20
"""Sealed bytes of fetched items received but not yet taken by the reader of
:meth:`Connection.fetch` before the channel's reading is paused (resumed below a quarter
of it): a reader slower than the server (a replay running in a thread while the event
loop is free to read) holds the server back through the SSH window instead of piling the
whole backup up in memory."""


class _FetchWaiter:
    """A fetch's items (or its failure) in arrival order. A deque and an event rather than
    an asyncio.Queue: the reader takes each of a large backup's 100,000 records without a
    coroutine per item."""

    def __init__(self) -> None:
        self.items: deque[wire.Message | BaseException] = deque()
        self.ready = asyncio.Event()
        self.queued = 0                  # sealed bytes in ``items``
        self.paused = False

    def put(self, item: wire.Message | BaseException) -> None:
        self.items.append(item)
        self.ready.set()

    async def get(self) -> wire.Message | BaseException:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


WriteAnswer = wire.Ack | wire.NeedSnapshot | BaseException
"""What :meth:`Connection.write_nowait` hands its callback: the answer, or the failure."""


class _CallbackWaiter:
    __slots__ = ("done",)

    def __init__(self, done: Callable[[WriteAnswer], None]) -> None:
        self.done = done


class Connection:
    """One protocol session with one server. Use :meth:`open`."""

    def __init__(self, spec: ServerSpec, session: ClientSession) -> None:
        self.spec = spec
        self.server_id = spec.server_id
        self._session = session
        if session.hash_lock is None:       # its chunks are hashed in a worker thread
            session.hash_lock = threading.Lock()
        self._ssh: asyncssh.SSHClientConnection | None = None
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._hello: asyncio.Future[HelloComplete] = asyncio.get_running_loop().create_future()
        self._error: BaseException | None = None
        self._keepalive: Keepalive | None = None

    # -- opening -------------------------------------------------------------------
    @classmethod
    async def open(cls, spec: ServerSpec, client_priv: bytes | None, role: Role = Role.READER,
                   *, timeout: float | None = None,
                   operator_keys: list[str] | None = None) -> Connection:
        """Connect, run the SSH handshake and the cldcb hello; raise on any failure.

        ``operator_keys``: for an anonymous session through sshd, the SSH
        private key files to log in with (default: the user's own keys and
        agent, as ``ssh`` would). ``timeout``: for the whole opening (default: the
        route's connect timeout).
        """
        server_pub = parse_server_id(spec.server_id)
        session = ClientSession(spec.server_id, client_priv, role, os.urandom(32))
        self = cls(spec, session)
        addr = spec.address
        via = spec.route
        timeout = timeout if timeout is not None else spec.patience.connect_timeout
        opts: dict[str, Any] = dict(
            encryption_algs=PREFERRED_CIPHERS, keepalive_interval=0,  # see
            # cldcb.transport.keepalive
            connect_timeout=timeout, agent_forwarding=False, x11_forwarding=False,
            request_pty=False, window=SSH_WINDOW, max_pktsize=SSH_CLIENT_MAX_PACKET)
        if addr.scheme == "cldcb":
            opts.update(
                username=SSH_USER if client_priv is not None else RECOVER_USER,
                known_hosts=([secp256k1_ssh_public_key(server_pub)], [], []),
                server_host_key_algs=[SECP256K1_SSH_ALG],
                client_keys=[secp256k1_ssh_key(client_priv)] if client_priv else [],
                agent_path=None, password=None, kbdint_auth=False, gss_host=None,
                preferred_auth="publickey,none" if client_priv else "none")
        else:
            if not spec.host_key:
                raise UsageError(f"no sshd host key is pinned for {addr}: give it "
                                 "(--host-key 'ssh-ed25519 AAAA…'); a known_hosts file is "
                                 "never trusted on its own")
            if addr.user:
                opts["username"] = addr.user
            opts["known_hosts"] = ([asyncssh.import_public_key(spec.host_key)], [], [])
            if client_priv is not None:
                opts.update(client_keys=[derived_ssh_key(client_priv)], agent_path=None,
                            password=None, kbdint_auth=False, gss_host=None)
            elif operator_keys:
                opts.update(client_keys=operator_keys)
            if via is not None:
                opts.update(gss_host=None)          # no Kerberos lookup of the host name
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(timeout):
                if via is not None:
                    sock = opts["sock"] = await via.connect(addr.host, addr.port, timeout)
                try:
                    self._ssh = await asyncssh.connect(addr.host, addr.port, **opts)
                except BaseException:
                    if sock is not None:
                        sock.close()
                    raise
                _set_nodelay(self._ssh)
                self._keepalive = Keepalive(self._ssh, spec.patience.keepalive_interval)
                self._chan, _ = await self._ssh.create_session(
                    lambda: _Channel(self), subsystem=SUBSYSTEM, encoding=None)
                self._chan.write(session.start())
                await self._hello
        except CldcbError:
            await self.close()
            raise
        except TimeoutError:
            await self.close()
            how = "" if via is None else f" (via {via})"
            raise TransportError(f"no answer from {addr}{how} within {timeout:.0f} s: check "
                                 "the address and that the server is running") from None
        except asyncssh.HostKeyNotVerifiable:
            await self.close()
            raise AuthError(_host_key_mismatch(spec)) from None
        except asyncssh.PermissionDenied:
            await self.close()
            raise AuthError(_login_refused(spec, client_priv is not None)) from None
        except asyncssh.ChannelOpenError as exc:
            await self.close()
            raise TransportError(f"{addr} refused the cldcb subsystem ({_reason(exc)}): is "
                                 "`Subsystem cldcb …` in its sshd_config?") from None
        except (OSError, asyncssh.Error) as exc:
            await self.close()
            raise TransportError(f"cannot connect to {addr}: {_reason(exc)}; check the address "
                                 "and that the server is running") from None
        return self

    # -- callbacks -----------------------------------------------------------------
    def _on_data(self, data: bytes) -> None:
        if self._error is not None:                 # dropped (abort, close): take nothing
            return
        if self._keepalive is not None:
            self._keepalive.received += 1
        acked = self._session.ack_in(data)          # the answer to nearly every Write
        if acked is not None:
            waiter, ack = acked
            if type(waiter) is _CallbackWaiter:
                waiter.done(ack)
            else:
                self._answered(Received(ack, waiter))
            return
        try:
            events = self._session.receive_data(data)
        except CldcbError as exc:
            self._fail(exc)
            return
        out = self._session.data_to_send()
        if out and self._chan is not None:
            self._chan.write(out)
        for ev in events:
            if isinstance(ev, HelloComplete):
                if not self._hello.done():
                    self._hello.set_result(ev)
            elif isinstance(ev, Received):
                self._answered(ev)

    def _answered(self, ev: Received) -> None:
        """Hand an answer to the waiter of the request it answers (the session says which)."""
        msg, waiter = ev.message, ev.request
        if isinstance(waiter, _FetchWaiter):
            waiter.put(msg)
            waiter.queued += len(getattr(msg, "sealed", b""))
            if waiter.queued > FETCH_QUEUE_BYTES and not waiter.paused \
                    and self._chan is not None:
                waiter.paused = True
                self._chan.pause_reading()
            return
        answer: Any = msg
        if ev.unexpected:
            answer = ProtocolError(ev.unexpected)
        elif isinstance(msg, wire.Error):
            answer = RemoteError(msg.code, f"{self.spec.address}: {msg.text}")
        if isinstance(waiter, _CallbackWaiter):
            waiter.done(answer)
        elif isinstance(waiter, asyncio.Future) and not waiter.done():
            if isinstance(answer, BaseException):
                waiter.set_exception(answer)
            else:
                waiter.set_result(answer)

    def _on_lost(self, exc: Exception | None) -> None:
        self._fail(TransportError(f"connection to {self.spec.address} lost"
                                  + (f": {_reason(exc)}" if exc else "")))

    def _fail(self, exc: BaseException, *, unsent: object = None) -> None:
        if self._keepalive is not None:
            self._keepalive.stop()
        if self._error is None:
            self._error = exc
        if not self._hello.done():
            self._hello.set_exception(exc)
        for w in self._session.forget_requests():
            if w is unsent:
                continue
            if isinstance(w, _FetchWaiter):
                w.put(exc)
            elif isinstance(w, _CallbackWaiter):
                w.done(exc)
            elif not w.done():
                w.set_exception(exc)
        if self._chan is not None:
            self._chan.close()

    # -- requests --------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self._error is not None

    def abort(self, exc: CldcbError) -> None:
        """Drop the connection now because of ``exc`` (say, an answer that acknowledges
        something else than its request): every request waiting on it fails with
        ``exc``, and nothing more received on it is taken."""
        self._fail(exc)

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise self._error if isinstance(self._error, CldcbError) else TransportError(
                str(self._error))

    def _send(self, msg: wire.Message, waiter: object) -> None:
        self._raise_if_broken()
        self._session.send(msg, waiter)
        self._write(self._session.data_to_send(), waiter)

    def _write(self, data: bytes, waiter: object) -> None:
        """Write a request's bytes; if that fails, every request fails but this one's
        ``waiter``, which is not told: the caller gets the error raised here."""
        assert self._chan is not None
        try:
            self._chan.write(data)
        except OSError as exc:
            self._fail(TransportError(f"connection to {self.spec.address} lost: {exc}"),
                       unsent=waiter)
            raise self._error from None  # type: ignore[misc]

    async def _request(self, msg: wire.Message) -> Any:
        """Send ``msg``; its answer (one the session says it expects), or raise."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._send(msg, fut)
        if self._session.unhashed_requests:        # a snapshot chunk: hashed off the loop
            loop.run_in_executor(None, self._session.absorb)
        return await fut

    async def status(self) -> wire.Status:
        return await self._request(wire.StatusRequest())

    async def write(self, data_version: int, kind: int, link: bytes,
                    sealed: bytes) -> wire.Ack | wire.NeedSnapshot:
        return await self._request(wire.Write(data_version, int(kind), link, sealed))

    def write_nowait(self, data_version: int, kind: int, link: bytes, sealed: bytes,
                     done: Callable[[WriteAnswer], None]) -> None:
        """Send a ``Write`` now; ``done`` gets the answer (``Ack``/``NeedSnapshot``) or the
        exception (``RemoteError``, ``TransportError``…) later, called from the receiving
        callback. Raises at once (and never calls ``done``) if the connection is gone."""
        self._raise_if_broken()
        waiter = _CallbackWaiter(done)
        self._write(self._session.write_frame(data_version, int(kind), link, sealed, waiter),
                    waiter)

    async def put_recognition(self, entry: bytes) -> None:
        await self._request(wire.PutRecognition(entry))

    async def recognition_pages(self) -> AsyncIterator[list[bytes]]:
        """The server's recognition entries, page after page (``ListRecognitions``), so
        that no count of entries makes one frame too large. A page that is empty though
        more follow, or a cursor that does not move forward, is a ProtocolError; so is
        an entry larger than :data:`wire.MAX_RECOGNITION` or more than
        :data:`MAX_RECOGNITIONS` entries in all (a server that would list forever)."""
        after, total = "", 0
        while True:
            page = await self._request(wire.ListRecognitions(after, wire.RECOGNITION_PAGE))
            total += len(page.entries)
            if page.next_after and (not page.entries or page.next_after <= after):
                raise ProtocolError(f"{self.spec.address} lists its recognition entries "
                                    "without moving forward")
            if total > MAX_RECOGNITIONS or len(page.entries) > wire.RECOGNITION_PAGE or \
                    any(len(e) > wire.MAX_RECOGNITION for e in page.entries):
                raise ProtocolError(f"{self.spec.address} lists more or larger recognition "
                                    f"entries than a server may ({MAX_RECOGNITIONS} of at "
                                    f"most {wire.MAX_RECOGNITION} bytes)")
            yield page.entries
            if not page.next_after:
                return
            after = page.next_after

    async def list_recognitions(self) -> list[bytes]:
        """Every recognition entry (all of :meth:`recognition_pages`)."""
        return [entry async for page in self.recognition_pages() for entry in page]

    async def begin_snapshot(self, snapshot_id: int, data_version: int, anchor: bytes) -> None:
        await self._request(wire.SnapshotBegin(snapshot_id, data_version, anchor))

    async def send_chunk(self, snapshot_id: int, index: int, sealed: bytes) -> wire.ChunkAck:
        return await self._request(wire.SnapshotChunk(snapshot_id, index, sealed))

    async def send_chunk_frame(self, frame: bytearray) -> wire.ChunkAck:
        """``send_chunk`` for a chunk sealed straight into its frame
        (:func:`wire.snapshot_chunk_frame`; never changed again)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._raise_if_broken()
        self._write(self._session.chunk_frame(frame, fut), fut)  # type: ignore[arg-type]
        if self._session.unhashed_requests:        # hashed off the loop
            loop.run_in_executor(None, self._session.absorb)
        return await fut

    async def end_snapshot(self, snapshot_id: int, chunk_count: int,
                           manifest: bytes) -> wire.SnapshotAck:
        return await self._request(wire.SnapshotEnd(snapshot_id, chunk_count, manifest))

    async def list_states(self) -> list[wire.RestorableState]:
        """The server's restorable states of this client, oldest first."""
        answer = await self._request(wire.ListStates())
        return [wire.RestorableState.decode(b) for b in answer.states]

    async def fetch(self, at_data_version: int = -1, *,
                    generation: int | None = None) -> AsyncIterator[wire.Message]:
        """FetchSnapshot, FetchChunk…, FetchRecord…, FetchEnd (RemoteError if nothing);
        of the snapshot numbered ``generation`` when given (``States`` names them)."""
        waiter = _FetchWaiter()
        self._send(wire.Fetch(at_data_version) if generation is None
                   else wire.FetchGeneration(generation), waiter)
        while True:
            item = waiter.items.popleft() if waiter.items else await waiter.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, wire.Error):
                raise RemoteError(item.code, f"{self.spec.address}: {item.text}")
            waiter.queued -= len(getattr(item, "sealed", b""))
            if waiter.paused and waiter.queued < FETCH_QUEUE_BYTES // 4:
                waiter.paused = False
                if self._chan is not None and self._error is None:
                    self._chan.resume_reading()
            yield item
            if isinstance(item, wire.FetchEnd):
                return

    async def close(self) -> None:
        if not self._hello.done():
            self._hello.cancel()        # no one awaits the hello any more
        elif not self._hello.cancelled():
            self._hello.exception()     # seen: open() raised its own error for it
        if self._keepalive is not None:
            self._keepalive.stop()
        if self._error is None:
            self._error = TransportError("connection closed")
        if self._chan is not None:
            self._chan.close()
        if self._ssh is not None:
            self._ssh.close()
            try:
                async with asyncio.timeout(5):
                    await self._ssh.wait_closed()
            except (TimeoutError, OSError, asyncssh.Error):
                pass

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _host_key_mismatch(spec: ServerSpec) -> str:
    addr = spec.address
    if addr.scheme == "cldcb":
        return (f"{addr} is not server {spec.server_id[:14]}…: its key differs. Check the "
                "server id given for this address (--server-id, `cldcb-server id` on the "
                "server); if it is right, someone is in the middle")
    return (f"the SSH host key of {addr} is not the pinned one (--host-key, the wrapper, or "
            "known_hosts): check that it is the right host; if it is, someone is in the "
            "middle or its host key changed")


def _login_refused(spec: ServerSpec, as_client: bool) -> str:
    addr = spec.address
    if as_client:
        return (f"{addr} refused our SSH login: the client is not registered there (run "
                "`cldcb-server add CLIENT_ID` on the server) or, behind sshd, its key is not "
                "in the account's authorized_keys (see `cldcb-client sshkey`)")
    if addr.scheme == "cldcb":
        return (f"{addr} refused the anonymous login ({RECOVER_USER}) that lists backups: "
                "check that this address is a `cldcb-server serve` daemon")
    return (f"{addr} refused our SSH login{' as ' + addr.user if addr.user else ''}: none of "
            "the SSH keys tried (--ssh-key, else your own keys and agent) is let into that "
            "account; give the key that logs in to the cldcb account there with --ssh-key")


def _set_nodelay(conn: asyncssh.SSHClientConnection) -> None:
    sock = conn.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _reason(exc: BaseException) -> str:
    """Why a connection failed or was lost, as the SSH peer (or the OS) put it: escaped,
    since a server writes its disconnect and channel-open reasons itself."""
    if isinstance(exc, asyncssh.Error):
        return escape_remote(exc.reason or type(exc).__name__)
    return escape_remote(str(exc) or type(exc).__name__)
