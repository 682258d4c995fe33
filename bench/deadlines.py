#!/usr/bin/env python3
"""How soon the things that must give up do: the figures the tests no longer time.

Each row is measured ``--rounds`` times next to its floor, in the same run:

- ``decoder``: a 5 MB JSON-RPC message fed to the plugin's decoder in 4 KiB reads
  (what a long ``db_write`` does), next to one feed of the whole message (the floor: a
  single parse). The decoder parses only once a ``}`` came, so the ratio stays small.
- ``copy_busy``: the plugin's database copy giving up on a spilled transaction
  (``DatabaseBusy``), next to the busy timeout it is given (the floor, 0.5 s).
- ``alt_hsmd``: an alternative hsmd that never answers ``hsmd_init``: the error and the
  program stopped, next to the timeout given (0.5 s) plus the stop grace (0.5 s).
- ``keepalive``: a hung SSH peer (SIGSTOP) dropped by :class:`cldcb.transport.keepalive.Keepalive`
  (interval 0.2 s, 2 unanswered), next to ``interval × (count_max + 1)``.

Prints a table, then one JSON line (DESIGN §9). On 127.0.0.1 only; the echo server
(``tests/helpers/echo.py``) is a subprocess stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the helpers package: tests/helpers

import asyncssh  # noqa: E402
from helpers.echo import echo_server  # noqa: E402
from measure import pct  # noqa: E402

from cldcb.errors import CldcbError  # noqa: E402
from cldcb.node import alt_hsmd, jsonrpc  # noqa: E402
from cldcb.node.alt_hsmd import AltHsmdNodeKey  # noqa: E402
from cldcb.plugin.snapshot import DatabaseBusy, copy_database  # noqa: E402
from cldcb.transport.keepalive import Keepalive  # noqa: E402

BUSY_TIMEOUT = 0.5
HSMD_TIMEOUT = 0.5
INTERVAL = 0.2
COUNT_MAX = 2


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def decoder() -> tuple[float, float]:
    big = jsonrpc.encode({"id": "x", "params": {"writes": ["a" * 5_000_000]}})

    def reads() -> None:
        d = jsonrpc.MessageDecoder()
        out = []
        for i in range(0, len(big), 4096):
            out += d.feed(big[i:i + 4096])
        assert len(out) == 1

    return timed(reads), timed(lambda: jsonrpc.MessageDecoder().feed(big))


def copy_busy(folder: Path) -> tuple[float, float]:
    db = folder / "lightningd.sqlite3"
    db.unlink(missing_ok=True)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("CREATE TABLE t (x BLOB)")
    con.execute("PRAGMA cache_size = 10")
    con.execute("BEGIN")
    for _ in range(300):
        con.execute("INSERT INTO t VALUES (?)", (os.urandom(1000),))

    def give_up() -> None:
        try:
            copy_database(db, folder, busy_timeout=BUSY_TIMEOUT)
        except DatabaseBusy:
            return
        raise AssertionError("the copy did not give up")

    took = timed(give_up)
    con.execute("ROLLBACK")
    con.close()
    return took, BUSY_TIMEOUT


def silent_hsmd(folder: Path) -> tuple[float, float]:
    program = folder / "silent"
    program.write_text("#!/bin/sh\nexec sleep 60\n")
    program.chmod(0o700)
    lightning_dir = folder / "node"
    (lightning_dir / "regtest").mkdir(parents=True, exist_ok=True)
    (lightning_dir / "regtest" / "hsm_secret").write_bytes(b"\x01" * 32)

    def refused() -> None:
        try:
            with AltHsmdNodeKey(program, lightning_dir, "regtest", timeout=HSMD_TIMEOUT):
                pass
        except CldcbError:
            return
        raise AssertionError("the silent hsmd was not given up")

    return timed(refused), HSMD_TIMEOUT + alt_hsmd._STOP_GRACE


async def _hung_peer(port: int, proc: subprocess.Popen[bytes]) -> float:
    conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, username="x",
                                  client_keys=None, preferred_auth="none",
                                  keepalive_interval=0)
    chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None)
    ka = Keepalive(conn, interval=INTERVAL, count_max=COUNT_MAX)
    try:
        chan.write(b"x")
        await asyncio.sleep(0.1)
        os.kill(proc.pid, signal.SIGSTOP)
        started = time.perf_counter()
        async with asyncio.timeout(30):
            await conn.wait_closed()
        return time.perf_counter() - started
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        ka.stop()
        conn.close()


def keepalive() -> tuple[float, float]:
    with echo_server() as (port, proc):
        return asyncio.run(_hung_peer(port, proc)), INTERVAL * (COUNT_MAX + 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cldcb-bench-deadlines-") as tmp:
        folder = Path(tmp)
        for _ in range(args.rounds):          # the rows take turns
            rows.setdefault("decoder", []).append(decoder())
            rows.setdefault("copy_busy", []).append(copy_busy(folder))
            rows.setdefault("alt_hsmd", []).append(silent_hsmd(folder))
            rows.setdefault("keepalive", []).append(keepalive())
    print(f"{'row':<10} {'p50 ms':>9} {'max ms':>9} {'floor ms':>9} {'ratio':>6}")
    result: dict[str, object] = {"rounds": args.rounds}
    for name, samples in rows.items():
        took = [s[0] for s in samples]
        floor = statistics.median(s[1] for s in samples)
        p50 = pct(took, 0.5)
        print(f"{name:<10} {p50 * 1e3:9.1f} {max(took) * 1e3:9.1f} {floor * 1e3:9.1f} "
              f"{p50 / floor:6.2f}")
        result[name] = {"p50_us": round(p50 * 1e6), "max_us": round(max(took) * 1e6),
                        "floor_us": round(floor * 1e6), "ratio": round(p50 / floor, 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
