#!/usr/bin/env python3
"""db_write round trip through the plugin, next to its floor, in the same run.

Measured: the simulated lightningd (pipes) → ``cldcb-plugin`` (through its
wrapper) → SSH on loopback → ``cldcb-server serve`` (fsync) → ack →
``{"result": "continue"}``, for every call of the real channel trace
(2,527 changes; the first call, the first-contact snapshot, is left out).

Floor (DESIGN §9): a bare request → fsync → ack over the same SSH transport:
a minimal asyncssh subsystem in its own process that appends each request to
a file, fsyncs and answers; same cipher, TCP_NODELAY, same request sizes as
the sealed changes, on the same disk.

To tell where the time goes, a third row measures the same sealed changes
written straight to the server with :class:`cldcb.transport.connection.Connection`
(no lightningd, no plugin): the protocol path alone; a fourth, the same calls
through a second simulated lightningd to a plugin that answers ``continue``
at once (``--echo-plugin``): what the lightningd ↔ plugin pipes cost by
themselves on this machine (two more process wake-ups than the floor has).

A fifth row is the same chain with a plugin that does nothing but forward:
each call becomes one request of the sealed change's size to the floor's
server, and the call is answered when that request is acknowledged
(``--forward-plugin``): asyncio, asyncssh and the two extra processes, with
no cldcb code at all. It is what any plugin built this way costs on this
machine; the distance from it to the first row is cldcb's own share.

A sixth row is the plugin again, to a server of its own reached through a
SOCKS5 proxy on loopback (Debian's ``microsocks``, the server named
``localhost`` so that the proxy resolves it, as Tor would), printed as a
ratio to the first row. microsocks sets no ``TCP_NODELAY`` on the
connections it forwards, so a message that reaches it in two segments waits
for the far end's delayed ACK (about 40 ms each way); a seventh row goes
through the tests' SOCKS5 proxy (``tests/socks5.py``, a fake onion name) with
``TCP_NODELAY``: what relaying through a proxy costs by itself. ``--tor N`` adds a row measured
apart (after the others, N calls): the plugin through a private Tor network
on 127.0.0.1 (``tests/tornet.py``) to a server behind an onion service.

The rows take turns over slices of the trace (``--rounds``, in a different
order each round) against servers that all stay up, so that a slow stretch
of the disk's fsync, which dominates every row, weighs on all of them alike
instead of on whichever ran then.

Clocks: every row's clock starts when its request is built and about to be
written (the simulated lightningd has encoded the call's JSON, as the floor's
client has made its request) and stops when the answer is read and parsed.

Pacing: the floor and the direct rows send their requests at the rate the
simulated lightningd made its calls in this run (the median time from the
start of one call to the start of the next), keeping the bench process busy
in between as the simulated lightningd is (it commits, runs the next batch's
statements, encodes the call). Same workload, same transport, only cldcb
taken away: on a virtual machine a process that sleeps longer between
requests wakes up more slowly (measured here: a 1.5 ms pause between the
direct row's requests adds about 230 µs to its round trip), so floor
requests sent back to back would be measured warmer than any hook call can
be. ``--no-pacing`` measures them back to back.

The simulated node's folder (its SQLite database) is on ``/dev/shm`` when
there is one: in production lightningd's database and the server are on
different machines, and on one test disk the node's own COMMIT fsyncs would
slow the server's fsync that follows, which is not the hook's cost.

Targets: p50 ≤ 1.5× the floor's p50, p99 ≤ 3× the floor's p99. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the helpers package: tests/helpers

import asyncssh  # noqa: E402
from measure import cpu_ns, pct, vm_hwm_mb  # noqa: E402
from sshfloor import (  # noqa: E402
    FLOOR_SUBSYSTEM,
    RequestSession,
    connect,
    floor_server,
    run_child,
)

from cldcb.core.seal import OVERHEAD  # noqa: E402


class Pacer:
    """Start requests ``period`` seconds apart, busy in between (as the simulated
    lightningd is between its calls); a request that ran late starts the next at once."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._next = 0.0

    def wait(self) -> None:
        now = time.perf_counter()
        while now < self._next:
            now = time.perf_counter()
        self._next = now + self.period


def call_period(calls: list[Any]) -> float:
    """The median time from the start of one call to the start of the next (the few gaps
    where other rows ran between two slices are outliers a median ignores)."""
    return statistics.median(b.sent_at - a.sent_at for a, b in itertools.pairwise(calls)
                             if b.index == a.index + 1)


class _FloorClient:
    """The floor's client: one request of each size, its latency (µs)."""

    def __init__(self, conn: asyncssh.SSHClientConnection,
                 writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]) -> None:
        self.conn, self.writer, self.reader = conn, writer, reader

    @classmethod
    async def open(cls, port: int) -> _FloorClient:
        conn = await connect(port, "floor")
        writer, reader, _ = await conn.open_session(subsystem=FLOOR_SUBSYSTEM, encoding=None)
        return cls(conn, writer, reader)

    async def run(self, sizes: list[int], pacer: Pacer) -> list[float]:
        out = []
        for n in sizes:
            payload = os.urandom(n)
            pacer.wait()
            t = time.perf_counter()
            self.writer.write(struct.pack(">I", n) + payload)
            await self.reader.readexactly(8)
            out.append((time.perf_counter() - t) * 1e6)
        return out

    async def close(self) -> None:
        self.conn.close()
        await self.conn.wait_closed()


class _DirectClient:
    """The same sealed changes written straight to a cldcb server (no plugin)."""

    def __init__(self, conn: Any, client: bytes, node_pub: bytes) -> None:
        from cldcb.core.dataversion import Kind, Tip
        from cldcb.core.ids import new_privkey
        from cldcb.core.seal import RecordSealer

        self.conn = conn
        self.anchor = os.urandom(32)
        self.tip = Tip(0, Kind.NORMAL, self.anchor, bytes(32), is_snapshot=True)
        self.sealer = RecordSealer(node_pub, client, new_privkey())

    @classmethod
    async def open(cls, spec: Any, client: bytes, node_pub: bytes) -> _DirectClient:
        from cldcb.core.ids import new_privkey
        from cldcb.core.seal import SnapshotSealer
        from cldcb.core.session import Role
        from cldcb.transport.connection import Connection

        self = cls(await Connection.open(spec, client, Role.WRITER), client, node_pub)
        snap = SnapshotSealer(node_pub, client, new_privkey(), 0, self.anchor)
        await self.conn.begin_snapshot(1, 0, self.anchor)
        await self.conn.send_chunk(1, 0, snap.seal_chunk(b""))
        await self.conn.end_snapshot(1, 1, snap.seal_manifest(0))
        return self

    async def run(self, calls: list[tuple[int, list[str]]], pacer: Pacer) -> list[float]:
        from cldcb.core.dataversion import advance, classify, decide
        from cldcb.core.seal import item_hash

        out = []
        for dv, writes in calls:
            kind = classify(writes)
            d = decide(self.tip, dv, kind)
            if d.link is None:
                continue
            sealed = self.sealer.seal_change(dv, kind, d.link, writes, int(time.time() * 1000))
            pacer.wait()
            t = time.perf_counter()
            await self.conn.write(dv, int(kind), d.link, sealed)
            out.append((time.perf_counter() - t) * 1e6)
            self.tip = advance(self.tip, dv, kind, item_hash(sealed), decision=d)
        return out


def echo_plugin() -> None:
    """A plugin that answers every db_write ``continue`` at once (the pipes' cost)."""
    from cldcb.node import jsonrpc
    from cldcb.plugin.main import MANIFEST

    decoder = jsonrpc.MessageDecoder()
    out = jsonrpc.StdoutWriter(sys.stdout.fileno())
    answers = {"getmanifest": MANIFEST, "init": {}, "db_write": {"result": "continue"}}
    while data := os.read(sys.stdin.fileno(), 1 << 20):
        for msg in decoder.feed(data):
            if msg.get("method") in answers and "id" in msg:
                out.send(jsonrpc.response(msg["id"], answers[msg["method"]]))


def forward_plugin(port: int) -> None:
    """A plugin that forwards each db_write as one request of the sealed change's size to
    the floor server, and answers ``continue`` when that request is acknowledged."""
    from cldcb.cli.malloc import keep_freed_memory
    from cldcb.node import jsonrpc
    from cldcb.plugin.main import MANIFEST

    keep_freed_memory()
    out = jsonrpc.StdoutWriter(sys.stdout.fileno())
    waiting: list[Any] = []

    class Acks(asyncssh.SSHClientSession[bytes]):
        def __init__(self) -> None:
            self.buf = bytearray()

        def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
            self.buf += data
            while len(self.buf) >= 8:
                del self.buf[:8]
                out.write(jsonrpc.encode_continue(waiting.pop(0)))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        conn = await connect(port, "forward")
        chan, _ = await conn.create_session(Acks, subsystem=FLOOR_SUBSYSTEM, encoding=None)
        decoder = jsonrpc.MessageDecoder()
        eof: asyncio.Future[None] = loop.create_future()

        class Stdin(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                for msg in decoder.feed(data):
                    method = msg.get("method")
                    if method == "db_write":
                        writes = msg["params"]["writes"]
                        n = 12 + sum(4 + len(w.encode()) for w in writes) + OVERHEAD
                        waiting.append(msg["id"])
                        chan.write(struct.pack(">I", n) + bytes(n))
                    elif method in ("getmanifest", "init"):
                        out.send(jsonrpc.response(msg["id"],
                                                  MANIFEST if method == "getmanifest" else {}))

            def connection_lost(self, exc: Exception | None) -> None:
                eof.set_result(None)

        await loop.connect_read_pipe(Stdin, os.fdopen(sys.stdin.fileno(), "rb", buffering=0,
                                                      closefd=False))
        await eof
        conn.close()

    asyncio.run(run())


def _plugin_wrapper(folder: Path, args: str) -> Path:
    """A wrapper that runs this script as a stand-in plugin (``args``), in ``folder``."""
    (folder / "regtest").mkdir(parents=True)
    wrapper = folder / "regtest" / "plugin-wrapper"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                       f"{shlex.quote(__file__)} {args}\n")
    wrapper.chmod(0o700)
    return wrapper


def _server(server: Any) -> tuple[Any, bytes]:
    """A started ``cldcb-server serve`` with a new client registered: (server, client key)."""
    from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of

    server.init()
    client = new_privkey()
    server.add(client_id_from_pubkey(pubkey_of(client)))
    return server.start(), client


MIRROR = True
"""The plugin's local mirror (``--mirror``): its cost is measured by a run with it off."""


def plugin_node(ld: Path, client: bytes, node_pub: bytes, entry: Any) -> Any:
    """A simulated lightningd in ``ld`` whose cldcb plugin backs up to ``entry`` only."""
    from helpers.simlightningd import SimLightningd

    from cldcb.core.ids import client_id_from_pubkey, node_id_from_pubkey, pubkey_of
    from cldcb.plugin.wrapper import WrapperConfig, default_plugin_path, write_wrapper

    (ld / "regtest").mkdir(parents=True)
    wrapper = ld / "regtest" / "cldcb-plugin-wrapper"
    write_wrapper(wrapper, WrapperConfig(
        client_id=client_id_from_pubkey(pubkey_of(client)), client_priv=client,
        node_id=node_id_from_pubkey(node_pub), servers=(entry,),
        plugin_path=default_plugin_path(), mirror=MIRROR))
    return SimLightningd(ld, wrapper)


def latencies(sim: Any) -> list[float]:
    """The committed calls' round trips (µs), the first (first-contact snapshot) left out."""
    return [c.latency * 1e6 for c in sim.calls[1:]
            if c.latency is not None and c.outcome == "committed"]


def measure_tor(folder: Path, trace_name: str, calls: int) -> list[float]:
    """The plugin's round trips through a private Tor network to an onion service."""
    from helpers.servers import CldcbServer
    from helpers.tornet import PrivateTorNetwork
    from helpers.traces import load_trace

    from cldcb.core.ids import new_privkey, pubkey_of
    from cldcb.plugin.wrapper import ServerEntry

    trace = load_trace(trace_name)[:calls + 1]
    server, client = _server(CldcbServer(folder / "server-tor"))
    try:
        with PrivateTorNetwork(folder / "tor", server.port) as tor:
            node = plugin_node(folder / "node-tor", client, pubkey_of(new_privkey()),
                               ServerEntry(tor.address, server.server_id, proxy=tor.socks_url))
            node.start()
            try:
                node.run_trace(trace)
            finally:
                node.close()
            return latencies(node)
    finally:
        server.stop()


def measure(folder: Path, trace_name: str, rounds: int, pacing: bool = True) -> dict[str, Any]:
    """The rows, measured in alternating slices of the trace (so that a slow
    stretch of the disk weighs on all three alike)."""
    from helpers.servers import CldcbServer
    from helpers.simlightningd import SimLightningd
    from helpers.socks5 import Microsocks, RecordingSocks5
    from helpers.traces import load_trace

    from cldcb.core.ids import new_privkey, pubkey_of
    from cldcb.plugin.wrapper import ServerEntry

    trace = load_trace(trace_name)
    sizes = [12 + sum(4 + len(w.encode()) for w in writes) + OVERHEAD for _, writes in trace]
    node_pub = pubkey_of(new_privkey())
    servers = []
    for name in ("server-direct", "server", "server-socks", "server-relay"):
        servers.append(_server(CldcbServer(folder / name)))
    shm = Path("/dev/shm")
    ld = Path(tempfile.mkdtemp(prefix="cldcb-bench-node-", dir=shm if shm.is_dir()
                               else folder)) / "lightning"
    loop = asyncio.new_event_loop()
    rows: dict[str, list[float]] = {"plugin": [], "direct": [], "floor": [], "pipes": [],
                                    "forward": [], "socks": [], "relay": []}
    socks = Microsocks(folder).start()
    relay_name = "bench.onion"
    relay = RecordingSocks5({relay_name: ("127.0.0.1", servers[3][0].port)}, nodelay=True)
    relay.start()
    echo = SimLightningd(ld.parent / "echo", _plugin_wrapper(ld.parent / "echo", "--echo-plugin"))
    cpu: dict[str, float] = {}
    try:
        with floor_server(__file__, "--floor-server", folder) as port:
            forward = SimLightningd(ld.parent / "forward", _plugin_wrapper(
                ld.parent / "forward", f"--forward-plugin {port}"))
            floor = loop.run_until_complete(_FloorClient.open(port))
            ((direct_server, direct_client), (server, client), (via, via_client),
             (relayed, relayed_client)) = servers
            direct = loop.run_until_complete(
                _DirectClient.open(direct_server.spec, direct_client, node_pub))
            node = plugin_node(ld, client, node_pub, ServerEntry(server.address,
                                                                 server.server_id))
            proxied = plugin_node(ld.parent / "socks", via_client, node_pub, ServerEntry(
                f"localhost:{via.port}", via.server_id, proxy=socks.url))
            relayed_node = plugin_node(ld.parent / "relay", relayed_client, node_pub, ServerEntry(
                f"{relay_name}:29735", relayed.server_id, proxy=relay.url))
            sims = (node, echo, forward, proxied, relayed_node)
            for sim in sims:
                sim.start()
            try:
                for sim in sims:
                    sim.run_trace(trace, stop=1)       # the first-contact snapshot: not counted
                assert node.plugin is not None and server.proc is not None
                cpu0 = (cpu_ns(node.plugin.pid), cpu_ns(server.proc.pid))
                loop.run_until_complete(direct.run(trace[:1], Pacer(0.0)))
                step = max(1, -(-(len(trace) - 1) // rounds))
                pacer = Pacer(0.0)
                for r, i in enumerate(range(1, len(trace), step)):
                    j = min(i + step, len(trace))
                    for k in range(7):     # a different order each round; the plugin first
                        part = (r + k) % 7
                        if part == 0:
                            node.run_trace(trace, start=i, stop=j)
                            if pacing:
                                pacer.period = call_period(node.calls[1:])
                        elif part == 1:
                            rows["floor"] += loop.run_until_complete(
                                floor.run(sizes[i:j], pacer))
                        elif part == 2:
                            rows["direct"] += loop.run_until_complete(
                                direct.run(trace[i:j], pacer))
                        elif part == 3:
                            echo.run_trace(trace, start=i, stop=j)
                        elif part == 4:
                            forward.run_trace(trace, start=i, stop=j)
                        elif part == 5:
                            proxied.run_trace(trace, start=i, stop=j)
                        else:
                            relayed_node.run_trace(trace, start=i, stop=j)
                calls = len(node.calls) - 1
                cpu["plugin"] = (cpu_ns(node.plugin.pid) - cpu0[0]) / 1e3 / calls
                cpu["server"] = (cpu_ns(server.proc.pid) - cpu0[1]) / 1e3 / calls
                plugin_mb = vm_hwm_mb(node.plugin.pid)
                server_mb = vm_hwm_mb(server.proc.pid)
            finally:
                for sim in sims:
                    sim.close()
                shutil.rmtree(ld.parent, ignore_errors=True)
            for name, sim in (("plugin", node), ("pipes", echo), ("forward", forward),
                              ("socks", proxied), ("relay", relayed_node)):
                rows[name] = latencies(sim)
            loop.run_until_complete(direct.conn.close())
            loop.run_until_complete(floor.close())
    finally:
        loop.close()
        socks.stop()
        relay.stop()
        for server, _ in servers:
            server.stop()
    return {"rows": rows, "plugin_mb": plugin_mb, "server_mb": server_mb, "calls": len(trace),
            "period_us": pacer.period * 1e6, "cpu_us": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default="cln-channels")
    ap.add_argument("--rounds", type=int, default=25,
                    help="slices of the trace; the rows take turns slice by slice")
    ap.add_argument("--floor-server", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--echo-plugin", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--forward-plugin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--tor", type=int, default=0, metavar="N",
                    help="also measure N calls through a private Tor network on 127.0.0.1 "
                         "to an onion service (apart from the other rows; tor needed)")
    ap.add_argument("--no-pacing", action="store_true",
                    help="send the floor's and the direct row's requests back to back, "
                         "not at the rate of the simulated lightningd's calls")
    ap.add_argument("--mirror", choices=("on", "off"), default="on",
                    help="the plugin's local mirror (the wrapper's `mirror =`)")
    args = ap.parse_args()
    global MIRROR
    MIRROR = args.mirror == "on"
    if args.echo_plugin:
        echo_plugin()
        return
    if args.forward_plugin:
        forward_plugin(args.forward_plugin)
        return
    if args.floor_server:
        path = Path(args.floor_server[0]) / "floor.log"
        run_child(lambda: RequestSession(path), int(args.floor_server[1]))
        return
    with tempfile.TemporaryDirectory(prefix="cldcb-bench-") as tmp:
        m = measure(Path(tmp), args.trace, args.rounds, pacing=not args.no_pacing)
        tor = measure_tor(Path(tmp), args.trace, args.tor) if args.tor else []
    lat, direct, floor = m["rows"]["plugin"], m["rows"]["direct"], m["rows"]["floor"]
    plugin_mb, server_mb, n = m["plugin_mb"], m["server_mb"], m["calls"]
    pipes, forward, socks = m["rows"]["pipes"], m["rows"]["forward"], m["rows"]["socks"]
    relay = m["rows"]["relay"]
    rows = [("through the plugin", lat), ("cldcb write, no plugin", direct),
            ("floor: request → fsync → ack", floor), ("pipes: plugin answers at once", pipes),
            ("plugin that only forwards", forward), ("plugin, microsocks (loopback)", socks),
            ("plugin, SOCKS5 relay, NODELAY", relay)]
    if tor:
        rows.append((f"plugin, private Tor ({len(tor)} calls)", tor))
    print(f"db_write round trip, {args.trace}: {n} calls ({len(lat)} measured); floor and "
          f"direct requests paced like the simulated lightningd's calls: one every "
          f"{m['period_us']:.0f} µs")
    print(f"{'':32} {'p50 µs':>10} {'p90 µs':>10} {'p99 µs':>10} {'max µs':>10}")
    for name, xs in rows:
        print(f"{name:32} {pct(xs, .5):10.0f} {pct(xs, .9):10.0f} {pct(xs, .99):10.0f} "
              f"{max(xs):10.0f}")
    ratio = pct(lat, .5) / pct(floor, .5)
    ratio99 = pct(lat, .99) / pct(floor, .99)
    print(f"p50 ratio {ratio:.2f} (target ≤ 1.5), p99 ratio {ratio99:.2f} (target ≤ 3); "
          f"a plugin that only forwards: {pct(forward, .5) / pct(floor, .5):.2f}; "
          f"peak RSS plugin {plugin_mb:.0f} MB, server {server_mb:.0f} MB")
    print(f"CPU per call (all threads): plugin {m['cpu_us']['plugin']:.0f} µs, "
          f"server {m['cpu_us']['server']:.0f} µs")
    socks_ratio = pct(socks, .5) / pct(lat, .5)
    relay_ratio = pct(relay, .5) / pct(lat, .5)
    print(f"through microsocks: p50 {socks_ratio:.2f}× the plugin's direct p50; through a "
          f"SOCKS5 relay with TCP_NODELAY: {relay_ratio:.2f}×"
          + (f"; through private Tor: p50 {pct(tor, .5) / pct(lat, .5):.1f}×" if tor else ""))
    extra: dict[str, Any] = {}
    if tor:
        extra = {"tor_calls": len(tor), "tor_p50_us": round(pct(tor, .5)),
                 "tor_p99_us": round(pct(tor, .99))}
    print(json.dumps({
        "bench": "hook_latency", "trace": args.trace, "changes": len(lat),
        "p50_us": round(pct(lat, .5)), "p99_us": round(pct(lat, .99)),
        "floor_p50_us": round(pct(floor, .5)), "floor_p99_us": round(pct(floor, .99)),
        "direct_p50_us": round(pct(direct, .5)), "direct_p99_us": round(pct(direct, .99)),
        "pipes_p50_us": round(pct(pipes, .5)), "pipes_p99_us": round(pct(pipes, .99)),
        "forward_p50_us": round(pct(forward, .5)), "forward_p99_us": round(pct(forward, .99)),
        "forward_ratio": round(pct(forward, .5) / pct(floor, .5), 3),
        "socks_p50_us": round(pct(socks, .5)), "socks_p99_us": round(pct(socks, .99)),
        "socks_ratio": round(socks_ratio, 3), "relay_p50_us": round(pct(relay, .5)),
        "relay_p99_us": round(pct(relay, .99)), "relay_ratio": round(relay_ratio, 3), **extra,
        "plugin_cpu_us_per_call": round(m["cpu_us"]["plugin"]),
        "server_cpu_us_per_call": round(m["cpu_us"]["server"]),
        "period_us": round(m["period_us"]),
        "ratio": round(ratio, 3), "ratio_p99": round(ratio99, 3),
        "peak_rss_mb": round(plugin_mb, 1), "server_peak_rss_mb": round(server_mb, 1),
        "target_met": ratio <= 1.5 and ratio99 <= 3.0}))


if __name__ == "__main__":
    main()
