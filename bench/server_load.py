#!/usr/bin/env python3
"""One server, many clients: N concurrent clients each writing R changes per second.

A real ``cldcb-server serve`` subprocess on 127.0.0.1; the clients are real
asyncssh connections from this process, each sending sealed 2 KiB records
(after the first snapshot every client needs). Measures the time from write
to ack, counts errors, and compares with the floor: a bare append + fsync
loop of the same record size on the same disk, measured in the same run.

A second floor puts the same load on the least a server can do per change
over the same SSH transport: a minimal asyncssh subsystem that appends each
request to a per-connection file and fsyncs it in a thread pool, then answers
(``--floor-server``, a child process). On a small machine, where the load
generator shares the cores with the server, that bare server may itself miss
the target: its row says what the machine allows.

Target (DESIGN §9): 200 clients × 20 changes/s, no error, p99 ack ≤ 20 ms.
Prints a table, then one JSON line.

``--heavy H --heavy-record-mib M`` measures fairness instead: the same ordinary
clients first alone (their floor, same daemon, same run), then while H heavy
clients stream M MiB records as fast as the server takes them (each keeps
:data:`HEAVY_WINDOW` writes unanswered; in a process of their own, so that sealing
their records does not hold up this one's measurements); prints the ordinary clients'
p50/p99 in both phases and the heavy clients' throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection as Connection_
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from measure import cpu_seconds, pct, vm_hwm_mb  # noqa: E402
from sshfloor import (  # noqa: E402
    FLOOR_SUBSYSTEM,
    RequestSession,
    connect,
    floor_server,
    run_child,
)

from cldcb.core import wire  # noqa: E402
from cldcb.core.dataversion import Kind  # noqa: E402
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of  # noqa: E402
from cldcb.core.seal import RecordSealer, SnapshotSealer, item_hash  # noqa: E402
from cldcb.core.session import Role  # noqa: E402
from cldcb.store import Store  # noqa: E402
from cldcb.transport.connection import Connection, ServerAddress, ServerSpec  # noqa: E402

SERVER = [sys.executable, "-m", "cldcb.server.admin"]
HEAVY_WINDOW = 32
"""Writes a heavy client keeps unanswered."""
RECORD = ["INSERT INTO datastore VALUES (x'6b31', x'" + "ab" * 1000 + "', 0)",
          "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 1"]




def floor_loop(folder: Path, n: int) -> list[float]:
    """Bare append + fsync of a 2 KiB record, n times."""
    payload = os.urandom(len("".join(RECORD)) + 100)
    path = folder / "floor.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, payload)
            os.fsync(fd)
            out.append((time.perf_counter() - t) * 1e6)
    finally:
        os.close(fd)
        path.unlink()
    return out






def start_daemon(tmp: Path, privs: list[bytes]) -> tuple[subprocess.Popen[bytes], ServerSpec]:
    """``cldcb-server serve`` on 127.0.0.1 (any port) with a data dir in ``tmp`` where these
    clients are registered, its log in ``tmp/server.log``; the process and its spec."""
    data = tmp / "data"
    server_id = subprocess.run([*SERVER, "--data-dir", str(data), "init"], check=True,
                               capture_output=True, text=True).stdout.strip()
    store = Store.open(data)
    for p in privs:
        store.add_client(client_id_from_pubkey(pubkey_of(p)))
    store.close()
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen([*SERVER, "--data-dir", str(data), "serve", "--listen",
                                 "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().decode().rsplit(":", 1)[1])
    return proc, ServerSpec(ServerAddress("cldcb", "127.0.0.1", port), server_id)


class Run:
    """Shared state of the load run."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.errors: list[str] = []
        self.ready = 0
        self.gate = asyncio.Event()
        self.stop_at = 0.0
        self.heavy_bytes = 0


async def paced(run: Run, rate: float, send: Callable[[], Awaitable[str | None]]) -> None:
    """Wait for the gate, then ``send()`` ``rate`` times a second until the run ends."""
    run.ready += 1
    await run.gate.wait()
    period = 1.0 / rate
    next_t = time.monotonic() + period * (os.urandom(1)[0] / 255)
    while True:
        now = time.monotonic()
        if now >= run.stop_at:
            return
        if next_t > now:
            await asyncio.sleep(next_t - now)
        next_t += period
        t = time.perf_counter()
        error = await send()
        run.lat.append((time.perf_counter() - t) * 1e6)
        if error:
            run.errors.append(error)
            return


async def first_snapshot(conn: Connection, node_pub: bytes,
                         priv: bytes) -> tuple[bytes, RecordSealer]:
    """The snapshot every new client needs first; its anchor and the client's sealer."""
    anchor = os.urandom(32)
    snap = SnapshotSealer(node_pub, priv, new_privkey(), 0, anchor)
    await conn.begin_snapshot(1, 0, anchor)
    await conn.send_chunk(1, 0, snap.seal_chunk(b"\0" * 4096))
    await conn.end_snapshot(1, snap.chunk_count, snap.seal_manifest(0))
    return anchor, RecordSealer(node_pub, priv, new_privkey())


async def open_writer(spec: ServerSpec, priv: bytes, run: Run,
                      what: str) -> Connection | None:
    """A writer's connection, or None with the failure counted in ``run.errors``."""
    try:
        return await Connection.open(spec, priv, Role.WRITER, timeout=120)
    except Exception as exc:  # noqa: BLE001 - counted, reported
        run.errors.append(f"{what}: {exc}")
        return None


async def one_client(spec: ServerSpec, node_pub: bytes, priv: bytes, rate: float,
                     run: Run) -> None:
    conn = await open_writer(spec, priv, run, "connect")
    if conn is None:
        return
    try:
        anchor, sealer = await first_snapshot(conn, node_pub, priv)
        chain = [anchor, 0]

        async def send() -> str | None:
            link, dv = chain[0], chain[1] + 1
            rec = sealer.seal_change(dv, Kind.NORMAL, link, RECORD, int(time.time() * 1000))
            reply = await conn.write(dv, Kind.NORMAL, link, rec)
            if not isinstance(reply, wire.Ack):
                return f"not acked: {reply}"
            chain[:] = [item_hash(rec), dv]
            return None

        await paced(run, rate, send)
    except Exception as exc:  # noqa: BLE001 - counted, reported
        run.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        await conn.close()


async def heavy_client(spec: ServerSpec, node_pub: bytes, priv: bytes, mib: float,
                       run: Run, stop: EventType) -> None:
    """Streams records of ``mib`` MiB, :data:`HEAVY_WINDOW` unanswered at a time, from the
    gate until ``stop`` is set; counts the bytes acked in ``run.heavy_bytes``."""
    conn = await open_writer(spec, priv, run, "heavy connect")
    if conn is None:
        return
    try:
        anchor, sealer = await first_snapshot(conn, node_pub, priv)
        body = ["INSERT INTO datastore VALUES (x'6b32', x'"
                + os.urandom(int(mib * (1 << 20)) // 2).hex() + "', 0)"]
        link, dv = anchor, 0
        window = asyncio.Semaphore(HEAVY_WINDOW)
        failed: list[str] = []

        def done(answer: object, size: int) -> None:
            window.release()
            if isinstance(answer, wire.Ack):
                run.heavy_bytes += size
            elif not failed:
                failed.append(f"heavy: not acked: {answer}")

        run.ready += 1
        await run.gate.wait()
        while not stop.is_set() and not failed:
            await window.acquire()
            dv += 1
            rec = sealer.seal_change(dv, Kind.NORMAL, link, body, int(time.time() * 1000))
            conn.write_nowait(dv, Kind.NORMAL, link, rec,
                              functools.partial(done, size=len(rec)))
            link = item_hash(rec)
        for _ in range(HEAVY_WINDOW):          # the last answers, before closing
            await window.acquire()
        run.errors += failed
    except Exception as exc:  # noqa: BLE001 - counted, reported
        run.errors.append(f"heavy {type(exc).__name__}: {exc}")
    finally:
        await conn.close()


def heavy_process(spec: ServerSpec, node_pub: bytes, privs: list[bytes], mib: float,
                  ready: EventType, stop: EventType, out: Connection_) -> None:
    """The heavy clients, in a child process: sets ``ready`` once they are connected,
    streams until ``stop``; sends (MiB acked, seconds, errors) to ``out``."""
    async def body() -> tuple[float, float, list[str]]:
        run = Run()
        tasks = [asyncio.create_task(heavy_client(spec, node_pub, p, mib, run, stop))
                 for p in privs]
        while run.ready + len(run.errors) < len(privs):
            await asyncio.sleep(0.05)
        ready.set()
        t0 = time.monotonic()
        run.gate.set()
        await asyncio.gather(*tasks)
        return run.heavy_bytes / (1 << 20), time.monotonic() - t0, run.errors

    out.send(asyncio.run(body()))


async def floor_client(port: int, rate: float, run: Run) -> None:
    """The same pacing against the bare server: one request of a sealed record's size."""
    try:
        conn = await connect(port, "floor")
        writer, reader, _ = await conn.open_session(subsystem=FLOOR_SUBSYSTEM, encoding=None)
    except Exception as exc:  # noqa: BLE001 - counted, reported
        run.errors.append(f"connect: {exc}")
        return
    payload = os.urandom(len("".join(RECORD)) + 100)
    frame = len(payload).to_bytes(4, "big") + payload

    async def send() -> str | None:
        writer.write(frame)
        await reader.readexactly(8)
        return None

    try:
        await paced(run, rate, send)
    except Exception as exc:  # noqa: BLE001 - counted, reported
        run.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


async def load(clients: list[Callable[[Run], Awaitable[None]]],
               seconds: float) -> tuple[Run, float]:
    run = Run()
    t0 = time.monotonic()
    tasks = []
    for i, client in enumerate(clients):
        tasks.append(asyncio.create_task(client(run)))
        if i % 20 == 19:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 180
    while run.ready + len(run.errors) < len(clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    setup_s = time.monotonic() - t0
    run.stop_at = time.monotonic() + seconds
    run.gate.set()
    await asyncio.gather(*tasks)
    return run, setup_s


def measure_floor_server(folder: Path, args: argparse.Namespace) -> Run:
    with floor_server(__file__, "--floor-server", folder) as port:
        run, _ = asyncio.run(load(
            [functools.partial(floor_client, port, args.rate) for _ in range(args.clients)],
            args.seconds))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0, help="changes per second per client")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--heavy", type=int, default=0,
                    help="fairness mode: this many heavy clients (see the module docstring)")
    ap.add_argument("--heavy-record-mib", type=float, default=1.0)
    ap.add_argument("--floor-server", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_server:
        folder = Path(args.floor_server[0])
        executor = ThreadPoolExecutor(16)
        sessions = itertools.count()
        run_child(lambda: RequestSession(folder / f"floor-{next(sessions)}.log", executor),
                  int(args.floor_server[1]))
        return

    if args.heavy:
        fairness(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="cldcb-bench-"))
    proc = None
    try:
        privs = [new_privkey() for _ in range(args.clients)]
        floor = floor_loop(tmp, 3000)
        proc, spec = start_daemon(tmp, privs)
        node_pub = pubkey_of(new_privkey())
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        run, setup_s = asyncio.run(load(
            [functools.partial(one_client, spec, node_pub, p, args.rate) for p in privs],
            args.seconds))
        lat, errors = run.lat, run.errors
        server_rss = vm_hwm_mb(proc.pid)
        server_cpu = cpu_seconds(proc.pid)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        bare = measure_floor_server(tmp, args)
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    expected = args.clients * args.rate * args.seconds
    p50, p99 = pct(lat, .5), pct(lat, .99)
    f50, f99 = pct(floor, .5), pct(floor, .99)
    print(f"{args.clients} clients x {args.rate:g} changes/s for {args.seconds:g} s "
          f"(setup {setup_s:.1f} s); {len(lat)} acks of ~{expected:.0f} planned; "
          f"{len(errors)} errors")
    print(f"{'':28} {'p50 µs':>10} {'p99 µs':>10} {'max µs':>10}")
    print(f"{'write → ack via daemon':28} {p50:10.0f} {p99:10.0f} {max(lat or [0]):10.0f}")
    b50, b99 = pct(bare.lat, .5), pct(bare.lat, .99)
    print(f"{'same load, bare SSH server':28} {b50:10.0f} {b99:10.0f} {max(bare.lat or [0]):10.0f}"
          f"   ({len(bare.lat)} acks, {len(bare.errors)} errors)")
    print(f"{'floor: append + fsync':28} {f50:10.0f} {f99:10.0f} {max(floor):10.0f}")
    print(f"ratio p50 {p50 / f50:.1f}x, p99 {p99 / f99:.1f}x; to the bare SSH server under the "
          f"same load: p50 {p50 / b50:.2f}x, p99 {p99 / b99:.2f}x, acks "
          f"{len(lat) / max(1, len(bare.lat)):.2f}x; target p99 ≤ 20000 µs: "
          f"{'met' if p99 <= 20000 and not errors else 'NOT met'} (bare server: "
          f"{'met' if b99 <= 20000 and not bare.errors else 'NOT met'})")
    print(f"load generator CPU {ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime:.1f} s;"
          f" server CPU {server_cpu:.1f} s ({server_cpu / max(1, len(lat)) * 1e6:.0f} µs per ack "
          f"incl. setup); server peak RSS {server_rss:.0f} MB")
    for e in errors[:5]:
        print("error:", e)
    print(json.dumps({
        "bench": "server_load", "clients": args.clients, "rate": args.rate,
        "seconds": args.seconds, "acks": len(lat), "errors": len(errors),
        "p50_us": round(p50), "p99_us": round(p99), "floor_p50_us": round(f50),
        "floor_p99_us": round(f99), "ratio": round(p50 / f50, 2),
        "bare_server_acks": len(bare.lat), "bare_server_p50_us": round(b50),
        "bare_server_p99_us": round(b99), "ratio_to_bare_p99": round(p99 / b99, 2),
        "ratio_p99": round(p99 / f99, 2), "target_p99_us": 20000,
        "peak_rss_mb": round(server_rss, 1),
        "client_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


def fairness(args: argparse.Namespace) -> None:
    """``--heavy``: the ordinary clients alone, then beside the heavy ones (one daemon)."""
    tmp = Path(tempfile.mkdtemp(prefix="cldcb-bench-"))
    proc = None
    try:
        privs = [new_privkey() for _ in range(2 * args.clients + args.heavy)]
        proc, spec = start_daemon(tmp, privs)
        node_pub = pubkey_of(new_privkey())
        ordinary = [functools.partial(one_client, spec, node_pub, p, args.rate) for p in privs]
        alone, _ = asyncio.run(load(ordinary[:args.clients], args.seconds))
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        got, out = ctx.Pipe(duplex=False)
        child = ctx.Process(target=heavy_process, args=(
            spec, node_pub, privs[2 * args.clients:], args.heavy_record_mib, ready, stop, out))
        child.start()
        try:
            if not ready.wait(120):
                raise SystemExit("error: the heavy clients did not connect within 120 s")
            beside, _ = asyncio.run(load(ordinary[args.clients:2 * args.clients],
                                         args.seconds))
            stop.set()
            heavy_mib, heavy_s, heavy_errors = got.recv() if got.poll(120) else (0, 1, [
                "the heavy clients did not finish"])
        finally:
            stop.set()
            child.join(30)
        beside.errors += heavy_errors
        server_rss = vm_hwm_mb(proc.pid)
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    a50, a99, h50, h99 = (pct(alone.lat, .5), pct(alone.lat, .99),
                          pct(beside.lat, .5), pct(beside.lat, .99))
    heavy_mib_s = heavy_mib / heavy_s
    print(f"{args.clients} ordinary clients x {args.rate:g} changes/s for {args.seconds:g} s, "
          f"alone then beside {args.heavy} heavy client(s) streaming "
          f"{args.heavy_record_mib:g} MiB records ({HEAVY_WINDOW} unanswered each)")
    print(f"{'ordinary write → ack':28} {'p50 µs':>10} {'p99 µs':>10} {'max µs':>10} "
          f"{'acks':>7} {'errors':>7}")
    for name, r in (("alone (floor)", alone), ("beside the heavy clients", beside)):
        print(f"{name:28} {pct(r.lat, .5):10.0f} {pct(r.lat, .99):10.0f} "
              f"{max(r.lat or [0]):10.0f} {len(r.lat):7d} {len(r.errors):7d}")
    print(f"p99 beside / alone {h99 / a99:.1f}x; heavy clients stored {heavy_mib_s:.1f} MiB/s; "
          f"server peak RSS {server_rss:.0f} MB")
    for e in (alone.errors + beside.errors)[:5]:
        print("error:", e)
    print(json.dumps({
        "bench": "server_load_fairness", "clients": args.clients, "rate": args.rate,
        "seconds": args.seconds, "heavy": args.heavy, "heavy_record_mib": args.heavy_record_mib,
        "heavy_window": HEAVY_WINDOW, "alone_p50_us": round(a50), "alone_p99_us": round(a99),
        "beside_p50_us": round(h50), "beside_p99_us": round(h99),
        "p99_ratio": round(h99 / a99, 2), "heavy_mib_s": round(heavy_mib_s, 1),
        "acks": len(beside.lat), "errors": len(alone.errors) + len(beside.errors),
        "peak_rss_mb": round(server_rss, 1),
    }))


if __name__ == "__main__":
    main()
