"""``cldcb-server`` that lies in its acknowledgements (a test server, run as a subprocess).

It is the real server (``cldcb.server.admin``: the asyncssh daemon, the real
sessions, handler and store) with two things changed, chosen by the
environment:

- ``CLDCB_TEST_LIE``: what it lies about. ``data_version``, ``kind``, ``link``:
  the ``Ack`` of a write names another data_version, kind or link than the
  write's. ``snapshot-id``, ``snapshot-data_version``, ``chunk-index``: the
  ``SnapshotAck`` names another snapshot id or data_version, or a ``ChunkAck``
  another index. Everything else in its answers is what an honest server says.
- ``CLDCB_TEST_LIE_FROM`` (default 0): the writes of this data_version and
  after are acknowledged *without being stored*; so, for the snapshot lies, are
  all snapshots (nothing reaches the store: the server keeps answering a status
  with what it held before).

So a plugin that counts an acknowledgement without checking that it matches
the change it sent answers ``continue`` for a change no server holds.

Usage: ``python lying_server.py --data-dir DIR serve --listen HOST:PORT`` (the
arguments of ``cldcb-server``).
"""

from __future__ import annotations

import os
from typing import Any

from cldcb.core import wire
from cldcb.server import admin, handler
from cldcb.store import AppendResult, ClientStore, Stored

WRITE_LIES = ("data_version", "kind", "link")
SNAPSHOT_LIES = ("snapshot-id", "snapshot-data_version", "chunk-index")


def install(lie: str, from_dv: int) -> None:
    """Make this process's server lie (see the module docstring)."""
    if lie not in WRITE_LIES + SNAPSHOT_LIES:
        raise SystemExit(f"CLDCB_TEST_LIE must be one of {WRITE_LIES + SNAPSHOT_LIES}, "
                         f"not {lie!r}")
    append = ClientStore.append
    handle = handler.SessionHandler._handle

    def forged_append(self: ClientStore, data_version: int, kind: int, link: bytes,
                      sealed: bytes, now_ms: int, **kw: Any) -> AppendResult:
        if data_version < from_dv:
            return append(self, data_version, kind, link, sealed, now_ms, **kw)
        if lie == "data_version":
            data_version -= 1
        elif lie == "kind":
            kind ^= 1
        elif lie == "link":
            link = bytes([link[0] ^ 1]) + link[1:]
        return Stored(data_version, kind, link, False)              # and nothing stored

    async def forged_handle(self: handler.SessionHandler, msg: wire.Message) -> None:
        if lie not in SNAPSHOT_LIES or not isinstance(
                msg, (wire.SnapshotBegin, wire.SnapshotChunk, wire.SnapshotEnd)):
            return await handle(self, msg)
        if isinstance(msg, wire.SnapshotBegin):
            begun[id(self)] = msg.data_version
            self.session.send(wire.Ok())
        elif isinstance(msg, wire.SnapshotChunk):
            self.session.send(wire.ChunkAck(msg.snapshot_id,
                                            msg.index + (lie == "chunk-index")))
        else:
            self.session.send(wire.SnapshotAck(msg.snapshot_id ^ (lie == "snapshot-id"),
                                               begun[id(self)]
                                               + (lie == "snapshot-data_version")))

    begun: dict[int, int] = {}
    ClientStore.append = forged_append                           # type: ignore[method-assign]
    handler.SessionHandler._handle = forged_handle               # type: ignore[method-assign]


if __name__ == "__main__":
    install(os.environ.get("CLDCB_TEST_LIE", ""), int(os.environ.get("CLDCB_TEST_LIE_FROM", "0")))
    admin.main()
