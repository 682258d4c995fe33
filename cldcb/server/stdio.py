"""``cldcb-server stdio`` and ``cldcb-server forced``: running under OpenSSH sshd.

``stdio`` speaks the cldcb protocol on stdin/stdout, for one session:

- as a ``Subsystem cldcb /usr/bin/cldcb-server stdio`` of a dedicated
  account: the hello decides (a registered client, or an anonymous
  list-only session);
- as an ``authorized_keys`` forced command ``stdio --client c3…``: the
  session is pinned to that client id; anonymous sessions are refused, and
  whatever command or subsystem the SSH client asked for is ignored.

``forced --allow add`` is for setup keys: it reads ``SSH_ORIGINAL_COMMAND``,
splits it with :mod:`shlex`, and accepts only ``cldcb-server add CLIENT_ID
[--json]`` (the id validated, no other option, no shell). Nothing from the
client is ever executed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

from cldcb.cli.malloc import keep_freed_memory
from cldcb.core.ids import parse_client_id
from cldcb.errors import UsageError
from cldcb.server.handler import ServerCore, SessionHandler

FORCED_VERBS = ("add",)


class _StdoutSink:
    def __init__(self, transport: asyncio.WriteTransport,
                 protocol: asyncio.streams.FlowControlMixin) -> None:
        self._transport = transport
        self._writer = asyncio.StreamWriter(transport, protocol, None,
                                            asyncio.get_running_loop())

    def write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        if not self._transport.is_closing():
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                pass

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()

    reader: asyncio.ReadTransport | None = None

    def pause_reading(self) -> None:
        if self.reader is not None and not self.reader.is_closing():
            self.reader.pause_reading()

    def resume_reading(self) -> None:
        if self.reader is not None and not self.reader.is_closing():
            self.reader.resume_reading()


async def run_stdio(data_dir: Path, server_priv: bytes, forced_client_id: str | None) -> None:
    """Serve one session on stdin/stdout until EOF."""
    loop = asyncio.get_running_loop()
    keep_freed_memory()
    core = ServerCore(data_dir, server_priv, threads=4)
    w_transport, w_protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(sys.stdout.fileno(), "wb", closefd=False))
    sink = _StdoutSink(w_transport, w_protocol)  # type: ignore[arg-type]
    handler = SessionHandler(core, sink, forced_client_id=forced_client_id,
                             allow_anonymous=forced_client_id is None,
                             peer=os.environ.get("SSH_CLIENT", "stdio").split(" ")[0])
    handler.start()

    class _Reader(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            handler.data_received(data)

        def eof_received(self) -> bool:
            handler.connection_lost()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            handler.connection_lost()

    sink.reader, _ = await loop.connect_read_pipe(
        _Reader, os.fdopen(sys.stdin.fileno(), "rb", closefd=False))
    await handler.done.wait()
    core.close()


def parse_forced_command(original: str | None, allowed: tuple[str, ...]) -> tuple[str, bool]:
    """Check ``SSH_ORIGINAL_COMMAND`` for a forced setup key; return (client_id, json)."""
    if not original:
        raise UsageError("this SSH key may only run `cldcb-server add CLIENT_ID [--json]`; "
                         "no command was given")
    try:
        argv = shlex.split(original)
    except ValueError:
        raise UsageError("the command could not be parsed; this key may only run "
                         "`cldcb-server add CLIENT_ID [--json]`") from None
    if len(argv) >= 1 and Path(argv[0]).name == "cldcb-server":
        argv = argv[1:]
    if not argv or argv[0] not in allowed:
        raise UsageError(f"this SSH key may only run `cldcb-server "
                         f"{'|'.join(allowed)} CLIENT_ID [--json]`; refused: "
                         f"{shlex.quote(original)[:120]}")
    args = argv[1:]
    want_json = False
    if args and args[-1] == "--json":
        want_json, args = True, args[:-1]
    if len(args) != 1 or args[0].startswith("-"):
        raise UsageError("expected exactly `cldcb-server add CLIENT_ID [--json]` with no "
                         "other option")
    parse_client_id(args[0])  # validates: c2…/c3…, 66 hex digits, a curve point
    return args[0].lower(), want_json
