#!/usr/bin/env python3
"""The daemon under an anonymous flood while a registered client keeps writing.

A real ``cldcb-server serve`` on 127.0.0.1 with one registered client, which
writes sealed 2 KiB records at a steady rate for the whole run (after its
first snapshot), and three quarters through (in the thick of both floods)
drops its connection and reconnects. A
child process (the attacker, its own CPU) meanwhile floods the server, all on
loopback and bounded in count and time:

1. big frames: rounds of ``--conns`` connections as ``cldcb-recover`` (no
   credentials; from 127.0.2.x, as an attacker is not at the client's
   address), each opening ``--channels`` channels that announce a 16 MiB
   frame and send up to 16 MiB of it;
2. idle sockets, from halfway on: ``--idle`` TCP connections that say
   nothing, spread over ``--sources`` loopback source addresses
   (127.0.1.x), held to the end (the big frames go on meanwhile).

Reports the server's peak RSS (VmHWM) and its RSS after the flood, the
registered client's write latency (p50/p99) during the attack, its refusals
and whether it reconnected; and the same client's latency with no attack,
measured first in the same run (the floor). Targets: peak RSS ≤ 150 MB, the
client never refused, p99 ≤ 50 ms. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh
from measure import pct, vm_hwm_mb
from server_load import start_daemon

from cldcb.core import wire
from cldcb.core.dataversion import Kind
from cldcb.core.ids import new_privkey, pubkey_of
from cldcb.core.seal import RecordSealer, SnapshotSealer, item_hash
from cldcb.core.session import Role
from cldcb.transport.connection import RECOVER_USER, SUBSYSTEM, Connection, ServerSpec
from cldcb.transport.sshkeys import SECP256K1_SSH_ALG

RECORD = ["INSERT INTO datastore VALUES (x'6b31', x'" + "ab" * 1000 + "', 0)"]
RSS_TARGET_MB = 150
MAX_ROUNDS = 400
P99_TARGET_US = 50_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the attacker (a child process) ----------------------------------------------------

async def big_frames(port: int, source: str, channels: int, stop_at: float,
                     tally: dict[str, float]) -> None:
    """One anonymous connection from ``source`` announcing 16 MiB frames on ``channels``
    channels."""
    try:
        conn = await asyncssh.connect(
            "127.0.0.1", port, local_addr=(source, 0), username=RECOVER_USER,
            known_hosts=None, client_keys=[],
            server_host_key_algs=[SECP256K1_SSH_ALG], agent_path=None, password=None,
            kbdint_auth=False, gss_host=None, preferred_auth="none", keepalive_interval=0)
    except (OSError, asyncssh.Error):
        tally["conn_refused"] += 1
        return
    block = bytes(256 << 10)
    async with conn:
        for _ in range(channels):
            try:
                writer, reader, _ = await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
            except (OSError, asyncssh.Error):
                tally["chan_refused"] += 1
                continue
            tally["channels"] += 1
            writer.write(struct.pack(">IB", wire.MAX_FRAME, 1))
            try:
                for _ in range(wire.MAX_FRAME // len(block)):
                    if writer.channel.is_closing() or time.monotonic() > stop_at:
                        break
                    writer.write(block)
                    await asyncio.wait_for(writer.drain(), 5)
                    tally["mib_sent"] += len(block) / (1 << 20)
            except (OSError, asyncssh.Error, TimeoutError):
                pass


def idle_sockets(port: int, count: int, sources: int) -> tuple[list[socket.socket], int]:
    held, failed = [], 0
    for i in range(count):
        s = socket.socket()
        try:
            s.bind((f"127.0.1.{1 + i % sources}", 0))
            s.connect(("127.0.0.1", port))
            held.append(s)
        except OSError:
            s.close()
            failed += 1
    return held, failed


async def attack(port: int, seconds: float, conns: int, channels: int, idle: int,
                 sources: int) -> None:
    stop_at = time.monotonic() + seconds
    idle_at = time.monotonic() + seconds / 2
    tally: dict[str, float] = dict.fromkeys(
        ("rounds", "channels", "chan_refused", "conn_refused", "mib_sent"), 0)
    held: list[socket.socket] = []
    failed = 0
    while time.monotonic() < stop_at:
        if not held and time.monotonic() >= idle_at:
            held, failed = await asyncio.to_thread(idle_sockets, port, idle, sources)
        if tally["rounds"] >= MAX_ROUNDS:
            await asyncio.sleep(0.1)
            continue
        tally["rounds"] += 1
        await asyncio.gather(*(big_frames(port, f"127.0.2.{1 + i}", channels, stop_at, tally)
                               for i in range(conns)))
    closed = 0
    for s in held:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    tally["mib_sent"] = round(tally["mib_sent"])
    print(json.dumps(dict(tally, idle_opened=len(held), idle_failed=failed,
                          idle_closed_by_server=closed)), flush=True)


# -- the registered client -------------------------------------------------------------

class Writer:
    def __init__(self, spec: ServerSpec, priv: bytes) -> None:
        self.spec, self.priv = spec, priv
        self.node_pub = pubkey_of(new_privkey())
        self.sealer = RecordSealer(self.node_pub, priv, new_privkey())
        self.link, self.dv = os.urandom(32), 0
        self.conn: Connection | None = None
        self.refused: list[str] = []
        self.connects = 0

    async def connect(self) -> bool:
        try:
            self.conn = await Connection.open(self.spec, self.priv, Role.WRITER, timeout=30)
        except Exception as exc:  # noqa: BLE001 - counted, reported
            self.refused.append(f"{type(exc).__name__}: {exc}")
            self.conn = None
            return False
        self.connects += 1
        if self.dv == 0:
            snap = SnapshotSealer(self.node_pub, self.priv, new_privkey(), 0, self.link)
            await self.conn.begin_snapshot(1, 0, self.link)
            await self.conn.send_chunk(1, 0, snap.seal_chunk(b"\0" * 4096))
            await self.conn.end_snapshot(1, snap.chunk_count, snap.seal_manifest(0))
        return True

    async def write(self) -> float | None:
        """One change; its latency in µs (None: refused or failed, noted)."""
        if self.conn is None and not await self.connect():
            return None
        assert self.conn is not None
        dv = self.dv + 1
        rec = self.sealer.seal_change(dv, Kind.NORMAL, self.link, RECORD, 0)
        t = time.perf_counter()
        try:
            reply = await self.conn.write(dv, Kind.NORMAL, self.link, rec)
        except Exception as exc:  # noqa: BLE001 - counted, reported
            self.refused.append(f"{type(exc).__name__}: {exc}")
            await self.conn.close()
            self.conn = None
            return None
        if not isinstance(reply, wire.Ack):
            self.refused.append(f"not acked: {reply}")
            return None
        self.dv, self.link = dv, item_hash(rec)
        return (time.perf_counter() - t) * 1e6

    async def stream(self, seconds: float, rate: float, reconnect_at: float | None) -> list[float]:
        lat: list[float] = []
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) < start + seconds:
            if reconnect_at is not None and now >= start + reconnect_at:
                reconnect_at = None
                if self.conn is not None:
                    await self.conn.close()
                self.conn = None
            got = await self.write()
            if got is not None:
                lat.append(got)
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        return lat


async def client_run(spec: ServerSpec, priv: bytes, args: argparse.Namespace,
                     port: int) -> dict[str, object]:
    w = Writer(spec, priv)
    if not await w.connect():
        raise SystemExit(f"the registered client cannot connect: {w.refused}")
    floor = await w.stream(args.floor_seconds, args.rate, None)
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--attacker", str(port), str(args.seconds), str(args.conns),
        str(args.channels), str(args.idle), str(args.sources), stdout=subprocess.PIPE)
    await asyncio.sleep(1.0)                      # the idle sockets are being opened
    lat = await w.stream(args.seconds, args.rate, args.seconds * 3 / 4)
    assert attacker.stdout is not None
    out, _ = await asyncio.wait_for(attacker.communicate(), args.seconds + 60)
    reconnected = w.connects == 2 and w.conn is not None
    if w.conn is not None:
        await w.conn.close()
    return {"floor": floor, "lat": lat, "refused": w.refused, "reconnected": reconnected,
            "attack": json.loads(out.decode().strip().splitlines()[-1] or "{}")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the attack")
    ap.add_argument("--floor-seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=50.0, help="the client's changes per second")
    ap.add_argument("--conns", type=int, default=3, help="anonymous connections per round")
    ap.add_argument("--channels", type=int, default=8, help="channels tried per connection")
    ap.add_argument("--idle", type=int, default=1100, help="idle TCP connections")
    ap.add_argument("--sources", type=int, default=100, help="their source addresses")
    ap.add_argument("--show-log", type=int, default=0, metavar="CHARS",
                    help="print the end of the server's log")
    ap.add_argument("--attacker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.attacker:
        a = args.attacker
        asyncio.run(attack(int(a[0]), float(a[1]), int(a[2]), int(a[3]), int(a[4]),
                           int(a[5])))
        return

    tmp = Path(tempfile.mkdtemp(prefix="cldcb-attack-"))
    proc = None
    try:
        priv = new_privkey()
        proc, spec = start_daemon(tmp, [priv])
        port = spec.address.port
        rss0 = rss_mb(proc.pid)
        res = asyncio.run(client_run(spec, priv, args, port))
        peak = vm_hwm_mb(proc.pid)
        rss_after = rss_mb(proc.pid)
        server_log = (tmp / "server.log").read_text(errors="replace")
        log_lines = server_log.count("\n")
        if args.show_log:
            print(server_log[-args.show_log:])
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    lat, floor = res["lat"], res["floor"]
    assert isinstance(lat, list) and isinstance(floor, list)
    refused = res["refused"]
    assert isinstance(refused, list)
    p50, p99, f50, f99 = pct(lat, .5), pct(lat, .99), pct(floor, .5), pct(floor, .99)
    met = peak <= RSS_TARGET_MB and not refused and p99 <= P99_TARGET_US \
        and bool(res["reconnected"])
    print(f"attack {args.seconds:g} s: rounds of {args.conns} anonymous connections x "
          f"{args.channels} channels announcing 16 MiB frames, and {args.idle} idle sockets "
          f"from {args.sources} addresses; attacker saw {res['attack']}")
    print(f"{'registered client':28} {'writes':>8} {'p50 µs':>10} {'p99 µs':>10} {'max µs':>10}")
    print(f"{'  no attack (floor)':28} {len(floor):8} {f50:10.0f} {f99:10.0f} "
          f"{max(floor or [0]):10.0f}")
    print(f"{'  under attack':28} {len(lat):8} {p50:10.0f} {p99:10.0f} {max(lat or [0]):10.0f}")
    print(f"server RSS: {rss0:.0f} MB at start, peak {peak:.0f} MB, {rss_after:.0f} MB after; "
          f"{log_lines} log lines; client refused {len(refused)}x, reconnected mid-attack: "
          f"{res['reconnected']}; targets (peak ≤ {RSS_TARGET_MB} MB, never refused, "
          f"p99 ≤ {P99_TARGET_US} µs): {'met' if met else 'NOT met'}")
    for e in refused[:5]:
        print("refused:", e)
    print(json.dumps({
        "bench": "attack", "seconds": args.seconds, "rate": args.rate,
        "writes": len(lat), "p50_us": round(p50), "p99_us": round(p99),
        "floor_p50_us": round(f50), "floor_p99_us": round(f99),
        "refused": len(refused), "reconnected": res["reconnected"],
        "server_rss_start_mb": round(rss0, 1), "server_peak_rss_mb": round(peak, 1),
        "server_rss_after_mb": round(rss_after, 1), "server_log_lines": log_lines,
        "attack": res["attack"], "target_peak_rss_mb": RSS_TARGET_MB,
        "target_p99_us": P99_TARGET_US, "met": met,
    }))


if __name__ == "__main__":
    main()
