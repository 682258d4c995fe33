"""The plugin's hot path and its general path make the same answers and the same records.

A Hypothesis state machine drives two engines with the same stream of
``db_write`` calls (normal and PRAGMA-only changes, batches lightningd never
commits, plugin restarts) and the same faults: acknowledgements that lie
(rewritten after the record was stored, or forged with nothing stored),
answers delayed past the hot path's patience, connections cut before a write
reaches the server or before its Ack comes back, and idle connections cut.
One engine takes the hot path whenever it can, the other never
(``db_write_now`` refused). Each engine talks to its own real server: the real
:class:`~cldcb.transport.connection.Connection` and :class:`~cldcb.core.session.ClientSession`
on the plugin's side, the real :class:`~cldcb.server.handler.SessionHandler`
(:class:`~cldcb.core.session.ServerSession`, :class:`~cldcb.store.Store` on a
temporary folder) on the server's, joined in process by :class:`Wire`, which
hands bytes over on the next turn of the event loop, as a socket does.

Checked: both engines give lightningd the same answers; the servers store the
same records (data_version and kind, in order); and no ``continue`` is given
before the server holds that exact change (the hash of the sealed bytes the
engine sent) durably, checked at the moment the answer is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from test_plugin_engine import CLIENT, NODE, Node

from cldcb.core import wire
from cldcb.core.dataversion import Kind
from cldcb.core.ids import (
    client_id_from_pubkey,
    node_id_from_pubkey,
    pubkey_of,
    server_id_from_pubkey,
)
from cldcb.core.seal import item_hash
from cldcb.core.session import ClientSession, Role
from cldcb.errors import TransportError
from cldcb.plugin import hotpath, links
from cldcb.plugin.engine import Engine, HookResult
from cldcb.plugin.wrapper import ServerEntry, WrapperConfig
from cldcb.server.handler import ServerCore, SessionHandler
from cldcb.store import AppendResult, ClientStore, Store, Stored
from cldcb.transport.connection import Connection, ServerAddress, ServerSpec

CID = client_id_from_pubkey(pubkey_of(CLIENT))
SERVER_PRIV = hashlib.sha256(b"cldcb paths test server").digest()
SERVER_ID = server_id_from_pubkey(pubkey_of(SERVER_PRIV))
ADDRESS = "127.0.0.1:29735"        # never dialled: the connector joins a Wire instead
FAULTS = ("none", "delay", "cut", "lost-ack", "lie-data_version", "lie-kind", "lie-link",
          "forge-data_version", "forge-kind", "forge-link")
HOT_PATIENCE = 0.05
DELAY = 0.1                        # longer than the hot path's patience
CALL_TIMEOUT = 30.0

STORED: dict[Path, list[tuple[int, int, bytes]]] = {}
"""Per server folder: each record the store made durable (data_version, kind, hash)."""


def _recording_append(real: Any) -> Any:
    def append(self: ClientStore, data_version: int, kind: int, link: bytes, sealed: bytes,
               now_ms: int, **kw: Any) -> AppendResult:
        before = self.tip
        res = real(self, data_version, kind, link, sealed, now_ms, **kw)
        if isinstance(res, Stored) and self.tip is not before:    # stored, not a resend
            STORED.setdefault(self.folder.parent.parent, []).append(
                (data_version, kind, item_hash(sealed)))
        return res
    return append


def _lie(ack: wire.Ack, what: str) -> wire.Ack:
    if what == "data_version":
        return wire.Ack(ack.data_version - 1, ack.kind, ack.link, ack.want_snapshot)
    if what == "kind":
        return wire.Ack(ack.data_version, ack.kind ^ 1, ack.link, ack.want_snapshot)
    return wire.Ack(ack.data_version, ack.kind, bytes([ack.link[0] ^ 1]) + ack.link[1:],
                    ack.want_snapshot)


class Server:
    """One real server (store, handler) and the fault armed for its next write or Ack."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        store = Store.open(folder)
        store.add_client(CID)
        store.close()
        self.core: ServerCore | None = None
        self.fault = "none"
        self.wires: list[Wire] = []

    def start(self) -> None:
        self.core = ServerCore(self.folder, SERVER_PRIV, threads=2)

    def cut_all(self) -> None:
        for w in list(self.wires):
            w.cut()

    async def stop(self) -> None:
        self.cut_all()
        if self.core is not None:
            for h in list(self.core.handlers):
                await asyncio.wait_for(h.done.wait(), 10)
            self.core.close()


class ServerSink:
    """The handler's side of a :class:`Wire`."""

    def __init__(self, w: Wire) -> None:
        self.w = w

    def write(self, data: bytes) -> None:
        self.w.from_server(data)

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.w.cut()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Wire:
    """One connection in process: the client's channel (``write``, ``close``) and the
    server's sink. Bytes cross on a later turn of the event loop, one frame at a time,
    in order; the server's armed fault is applied to the next Write or Ack."""

    def __init__(self, server: Server) -> None:
        assert server.core is not None
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.conn: Connection | None = None
        self.handler = SessionHandler(server.core, ServerSink(self))
        self.to_client: deque[bytes] = deque()
        self.due = 0.0
        self.unanswered = 0            # requests given to the handler, not answered yet
        self.c2s = wire.FrameDecoder()
        self.s2c = wire.FrameDecoder()
        server.wires.append(self)
        self.handler.start()

    # -- the client's channel --------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.loop.call_soon(self._to_server, data)

    def close(self) -> None:
        self.cut()

    def _to_server(self, data: bytes) -> None:
        for msg in self.c2s.feed(data):
            if self.closed:
                return
            fault = self.server.fault
            if isinstance(msg, wire.Write) and fault == "cut":
                self.server.fault = "none"
                self.cut()
                return
            if isinstance(msg, wire.Write) and fault.startswith("forge-") \
                    and self.unanswered == 0:
                self.server.fault = "none"         # answered here; nothing stored
                self._deliver(wire.encode(_lie(wire.Ack(msg.data_version, msg.kind, msg.link,
                                                        False), fault[6:])))
                continue
            self.unanswered += 1
            self.handler.data_received(wire.encode(msg))

    # -- the server's sink -----------------------------------------------------------
    def from_server(self, data: bytes) -> None:
        for msg in self.s2c.feed(data):
            if self.closed:
                return
            self.unanswered -= 1
            fault = self.server.fault
            if isinstance(msg, wire.Ack) and fault == "lost-ack":
                self.server.fault = "none"
                self.cut()
                return
            if isinstance(msg, wire.Ack) and fault.startswith("lie-"):
                self.server.fault = "none"
                msg = _lie(msg, fault[4:])
            self._deliver(wire.encode(msg))

    def _deliver(self, frame: bytes) -> None:
        """Hand ``frame`` to the client later (after DELAY while a delay is armed), after
        whatever is on its way already."""
        delay = DELAY if self.server.fault == "delay" else 0.0
        self.due = max(self.due, self.loop.time() + delay)
        self.to_client.append(frame)
        self.loop.call_at(self.due, self._pump)

    def _pump(self) -> None:
        if self.to_client and not self.closed and self.conn is not None:
            self.conn._on_data(self.to_client.popleft())

    def cut(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.to_client.clear()
        if self in self.server.wires:
            self.server.wires.remove(self)
        self.handler.connection_lost()
        if self.conn is not None:
            self.conn._on_lost(None)


async def connect(server: Server) -> Connection:
    """A real Connection over a :class:`Wire` to ``server`` (the hello included)."""
    spec = ServerSpec(ServerAddress.parse(ADDRESS), SERVER_ID)
    conn = Connection(spec, ClientSession(SERVER_ID, CLIENT, Role.WRITER, bytes(32)))
    w = Wire(server)
    w.conn = conn
    conn._chan = w                                            # type: ignore[assignment]
    w.write(conn._session.start())
    try:
        async with asyncio.timeout(10):     # (not wait_for: it may swallow a cancel)
            await conn._hello
    except (TimeoutError, TransportError) as exc:
        w.cut()
        raise TransportError(f"no hello: {exc}") from None
    return conn


class Side:
    """One engine (hot path on or off), its node's database and its server."""

    def __init__(self, root: Path, hot: bool) -> None:
        self.root = root
        self.hot = hot
        self.server = Server(root / "server")
        self.node = Node(root / "lightningd.sqlite3")
        self.engine: Engine | None = None
        self.answers: list[bool] = []
        self.early: list[str] = []     # a continue given before the change was durable

    def new_engine(self) -> Engine:
        cfg = WrapperConfig(client_id=CID, client_priv=CLIENT,
                            node_id=node_id_from_pubkey(pubkey_of(NODE)),
                            servers=(ServerEntry(ADDRESS, SERVER_ID),), quorum=None,
                            outage_limit=CALL_TIMEOUT / 2, plugin_path="/x/cldcb-plugin")

        async def connector(entry: ServerEntry) -> Connection:
            return await connect(self.server)

        eng = Engine(cfg, self.root, connector, startup_grace=0.0)
        if not self.hot:
            eng.db_write_now = lambda *args: False            # type: ignore[method-assign]
        ended = eng._ended

        def checked(data_version: int, result: HookResult) -> None:
            log = eng.log
            if result.ok and log is not None and log.head is not None:
                stored = {h for _, _, h in STORED.get(self.server.folder, [])}
                if log.head.hash not in stored:
                    self.early.append(f"continue for {data_version} before it was durable")
            ended(data_version, result)

        eng._ended = checked                                  # type: ignore[method-assign]
        eng.start()
        self.engine = eng
        return eng

    async def call(self, kind: Kind) -> bool:
        assert self.engine is not None
        if kind is Kind.PRAGMA:
            dv, writes = self.node.dv, ["PRAGMA foreign_keys = ON;"]
        else:
            dv, writes = self.node.change()
        result = await asyncio.wait_for(self.engine.db_write(dv, writes), CALL_TIMEOUT)
        self.answers.append(result.ok)
        return result.ok

    def records(self) -> list[tuple[int, int]]:
        return [(dv, kind) for dv, kind, _ in STORED.get(self.server.folder, [])]


class HotEqualsGeneral(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="cldcb-paths-")
        self.loop = asyncio.new_event_loop()
        root = Path(self.tmp.name)
        (root / "hot").mkdir()
        (root / "general").mkdir()
        self.sides = [Side(root / "hot", hot=True), Side(root / "general", hot=False)]
        STORED.clear()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize()
    def start(self) -> None:
        async def go() -> None:
            for s in self.sides:
                s.server.start()
                s.new_engine()
        self.run(go())

    @rule(kind=st.sampled_from([Kind.NORMAL, Kind.NORMAL, Kind.PRAGMA]),
          fault=st.sampled_from(FAULTS), commit=st.booleans().map(lambda b: b or None))
    def call(self, kind: Kind, fault: str, commit: bool | None) -> None:
        """One db_write call on both sides, with the same fault armed on both servers;
        ``commit`` None: lightningd dies before committing (then both plugins restart)."""
        oks = []
        for s in self.sides:
            s.server.fault = fault
            ok = self.run(s.call(kind))
            s.server.fault = "none"
            oks.append(ok)
            if kind is Kind.NORMAL:
                if ok and commit:
                    s.node.commit()
                else:
                    s.node.rollback()
        assert oks[0] == oks[1], f"hot path answered {oks[0]}, general path {oks[1]}"
        if commit is None or not all(oks):
            self.restart()

    @rule()
    def cut_idle_connections(self) -> None:
        for s in self.sides:
            s.server.cut_all()

    @rule()
    def restart(self) -> None:
        """The plugins restart (lightningd restarted): new engines, same servers."""
        async def go() -> None:
            for s in self.sides:
                assert s.engine is not None
                await s.engine.close()
                s.new_engine()
        self.run(go())

    @invariant()
    def same_answers_same_records_nothing_early(self) -> None:
        hot, general = self.sides
        assert hot.answers == general.answers
        assert hot.records() == general.records()
        assert not hot.early and not general.early, hot.early + general.early

    def teardown(self) -> None:
        async def go() -> None:
            for s in self.sides:
                if s.engine is not None:
                    await s.engine.close()
                await s.server.stop()
        try:
            self.run(go())
        finally:
            self.loop.close()
            for s in self.sides:
                s.node.con.close()
            self.tmp.cleanup()


def test_the_hot_path_equals_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hotpath, "HOT_PATIENCE", HOT_PATIENCE)
    monkeypatch.setattr(links, "RECONNECT_MIN", 0.005)
    monkeypatch.setattr(links, "RECONNECT_MAX", 0.02)
    monkeypatch.setattr(links, "WATCH_INTERVAL", 0.01)
    monkeypatch.setattr(ClientStore, "append", _recording_append(ClientStore.append))
    run_state_machine_as_test(HotEqualsGeneral, settings=settings(
        max_examples=25, stateful_step_count=15, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
