"""A node key held by an hsmd-like program (``--alt-hsmd PROGRAM``).

``PROGRAM`` behaves like Core Lightning's own ``lightning_hsmd`` (which is one
such program). It is started in ``<lightning-dir>/<network>`` with fd 0 a
socket for its status messages (read and discarded by a thread, so it never
blocks on a full socket; the text of a ``status_fail`` is kept for error
messages), fd 3 a socket for requests, fds 1 and 2 inherited. cldcb sends
``hsmd_init`` as lightningd would for the network (with the passphrase TLV
when given), then ECDH and sign_message requests.

The real hsmd creates an ``hsm_secret`` when there is none. A fresh secret is
a different node, so when the program created one that was not there before it
started, it is removed and :class:`~cldcb.errors.HsmdError` names the node id
the program reported.

Every read has a timeout; the program is terminated on close.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from cldcb.core import hsmd_wire
from cldcb.core.ids import node_id_from_pubkey
from cldcb.core.signmessage import SignedMessage, recover_pubkey
from cldcb.errors import HsmdError
from cldcb.node.nodekey import parse_point

DEFAULT_TIMEOUT = 30.0
_STOP_GRACE = 3.0


class AltHsmdNodeKey:
    """A :class:`~cldcb.node.nodekey.NodeKey` answered by an hsmd-like program.

    Use as a context manager::

        with AltHsmdNodeKey(program, lightning_dir, "bitcoin") as key:
            key.node_id, key.ecdh(point), key.sign_message("text")
    """

    def __init__(self, program: Path | str, lightning_dir: Path | str,
                 network: str = "bitcoin", passphrase: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.program = str(program)
        self.workdir = Path(lightning_dir) / network
        self.network = hsmd_wire.network(network)
        self.timeout = timeout
        self._passphrase = passphrase
        self._proc: subprocess.Popen[bytes] | None = None
        self._requests: socket.socket | None = None
        self._status: socket.socket | None = None
        self._drainer: threading.Thread | None = None
        self._failure = ""
        self._pubkey: bytes | None = None
        self.init_reply: hsmd_wire.InitReply | None = None

    # --- lifecycle -------------------------------------------------------------

    def __enter__(self) -> AltHsmdNodeKey:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start the program, send ``hsmd_init`` and learn the node id."""
        if self._proc is not None:
            raise HsmdError("the hsmd-like program is already running")
        if not self.workdir.is_dir():
            raise HsmdError(f"{self.workdir} does not exist: give the node's "
                            "--lightning-dir and --network")
        secret_path = self.workdir / "hsm_secret"
        had_secret = os.path.lexists(secret_path)
        try:
            self._spawn()
            reply = self._init()
        except BaseException as exc:
            self.close()
            if not had_secret and os.path.lexists(secret_path):
                raise HsmdError(
                    f"{self.program} created a new hsm_secret in {self.workdir} and then "
                    f"failed ({exc}); {_remove(secret_path)}") from exc
            raise
        if not had_secret and os.path.lexists(secret_path):
            self.close()
            raise HsmdError(
                f"{self.program} found no hsm_secret in {self.workdir} and created a new "
                f"one, for a new node {node_id_from_pubkey(reply.node_id)}, which is not "
                f"the node to recover; {_remove(secret_path)}. Put the node's hsm_secret "
                "there (or use --hsm-secret) and try again")
        self.init_reply = reply
        self._pubkey = reply.node_id

    def close(self) -> None:
        """Stop the program (EOF on its request socket, then SIGTERM, then SIGKILL)."""
        if self._requests is not None:
            self._requests.close()
            self._requests = None
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(_STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._status is not None:
            try:
                self._status.shutdown(socket.SHUT_RDWR)  # wakes the drainer up
            except OSError:
                pass
            self._status.close()
            self._status = None
        if self._drainer is not None:
            self._drainer.join(_STOP_GRACE)
            self._drainer = None

    def _spawn(self) -> None:
        status_ours, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        req_ours, req_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._status, self._requests = status_ours, req_ours
        req_fd = req_theirs.fileno()

        def to_fd3() -> None:  # runs in the child between fork and exec
            if req_fd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(req_fd, 3)

        try:
            # close_fds=False: fd 3 is made by to_fd3, after which subprocess would
            # close it. Python's own descriptors are not inheritable (PEP 446).
            self._proc = subprocess.Popen(
                [self.program], cwd=self.workdir, stdin=status_theirs.fileno(),
                close_fds=False, preexec_fn=to_fd3)
        except OSError as exc:
            raise HsmdError(f"cannot start {self.program}: {exc.strerror or exc}; give the "
                            "path of an executable hsmd-like program to --alt-hsmd") from None
        finally:
            status_theirs.close()
            req_theirs.close()
        self._drainer = threading.Thread(target=self._drain_status, name="alt-hsmd-status",
                                         daemon=True)
        self._drainer.start()

    def _drain_status(self) -> None:
        sock = self._status
        if sock is None:
            return
        try:
            while True:
                header = _recv_exact(sock, 4, None)
                if header is None:
                    return
                msg = _recv_exact(sock, hsmd_wire.frame_length(header), None)
                if msg is None:
                    return
                if len(msg) >= 2 and hsmd_wire.message_type(msg) == hsmd_wire.STATUS_FAIL:
                    self._failure = hsmd_wire.trailing_text(msg)
        except (OSError, HsmdError):
            return

    # --- requests ----------------------------------------------------------------

    def _request(self, msg: bytes, what: str) -> bytes:
        sock = self._requests
        if sock is None:
            raise HsmdError("the hsmd-like program is not running (use it inside `with`)")
        try:
            sock.settimeout(self.timeout)
            sock.sendall(hsmd_wire.frame(msg))
            header = _recv_exact(sock, 4, self.timeout)
            reply = None if header is None else _recv_exact(
                sock, hsmd_wire.frame_length(header), self.timeout)
        except TimeoutError:
            raise HsmdError(f"{self.program} did not answer {what} within "
                            f"{self.timeout:g} s") from None
        except OSError as exc:
            raise HsmdError(f"lost contact with {self.program} during {what}: "
                            f"{exc.strerror or exc}{self._why()}") from None
        if reply is None:
            raise HsmdError(f"{self.program} closed its connection during {what}"
                            f"{self._why()}")
        return reply

    def _why(self) -> str:
        proc = self._proc
        deadline = time.monotonic() + 1.0
        while proc is not None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._drainer is not None:
            self._drainer.join(0.5)
        parts = []
        if proc is not None and proc.returncode is not None:
            parts.append(f"it exited with status {proc.returncode}")
        if self._failure:
            parts.append(f"it said: {self._failure}")
        return " (" + "; ".join(parts) + ")" if parts else ""

    def _init(self) -> hsmd_wire.InitReply:
        reply = self._request(hsmd_wire.encode_init(self.network.name, self._passphrase),
                              "hsmd_init")
        msg_type = hsmd_wire.message_type(reply)
        if msg_type != hsmd_wire.MSG_INIT_REPLY_V4:
            text = hsmd_wire.trailing_text(reply)
            raise HsmdError(f"{self.program} refused hsmd_init (answered message type "
                            f"{msg_type}{': ' + text if text else ''}); check the "
                            "passphrase and that it is the node's hsmd")
        decoded = hsmd_wire.decode_init_reply(reply)
        if not hsmd_wire.MIN_VERSION <= decoded.hsm_version <= hsmd_wire.MAX_VERSION:
            raise HsmdError(f"{self.program} speaks hsmd version {decoded.hsm_version}, "
                            f"not {hsmd_wire.MIN_VERSION}..{hsmd_wire.MAX_VERSION}")
        try:
            parse_point(decoded.node_id)
        except Exception:
            raise HsmdError(f"{self.program} reported a node id that is not a "
                            "public key") from None
        return decoded

    @property
    def pubkey(self) -> bytes:
        if self._pubkey is None:
            raise HsmdError("the hsmd-like program is not running (use it inside `with`)")
        return self._pubkey

    @property
    def node_id(self) -> str:
        return node_id_from_pubkey(self.pubkey)

    def ecdh(self, point33: bytes) -> bytes:
        point = parse_point(point33).format(compressed=True)
        reply = self._request(hsmd_wire.encode_ecdh_req(point), "hsmd_ecdh_req")
        return hsmd_wire.decode_ecdh_resp(reply)

    def sign_message(self, message: str) -> SignedMessage:
        reply = self._request(hsmd_wire.encode_sign_message(message.encode("utf-8")),
                              "hsmd_sign_message")
        signature, recid = hsmd_wire.decode_sign_message_reply(reply)
        signed = SignedMessage.from_compact(signature, recid)
        if recover_pubkey(message, signed.zbase) != self.pubkey:
            raise HsmdError(f"{self.program} returned a signature that is not by node "
                            f"{self.node_id}: it is not this node's hsmd")
        return signed

    def __repr__(self) -> str:
        return f"AltHsmdNodeKey(program={self.program!r}, workdir={str(self.workdir)!r})"


def _remove(path: Path) -> str:
    """Remove the hsm_secret a program created; say what happened."""
    try:
        path.unlink()
    except FileNotFoundError:
        return "it is gone already"
    except OSError as exc:
        return f"it could NOT be removed ({exc.strerror or exc}): remove {path} by hand"
    return "it was removed"


def _recv_exact(sock: socket.socket, size: int, timeout: float | None) -> bytes | None:
    """Exactly ``size`` bytes, or None at EOF; TimeoutError past ``timeout`` overall."""
    deadline = None if timeout is None else time.monotonic() + timeout
    buf = bytearray()
    while len(buf) < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
