#!/usr/bin/env python3
"""Hook stalls while snapshots are taken: the local mirror next to today's copies.

Both rows in the same run, on the same disk, each with its own node folder and
two ``cldcb-server serve`` (A and B, quorum 1), through the real plugin
started by the simulated lightningd (``tests/simlightningd.py``):

1. *build* (not measured): the node starts with an empty database (the
   first-contact snapshot, tiny, is the only one allowed to block), then
   grows it to ``--size-mb`` MiB through the change stream (each change adds
   one 1 MiB row, ``zeroblob``, so the records stay small); compaction is put
   off meanwhile (``CLDCB_PLUGIN_TEST_COMPACTION_INTERVAL``); the node stops.
2. *compaction* (measured): the node starts again; both servers hold the
   tiny snapshot and a log larger than it, so they ask for a compaction at
   the first call: a snapshot of the whole database. The simulated
   lightningd streams small changes (one row and the data_version bump, one
   every ``--pause`` seconds) until both compactions are durable.
3. *catch-up* (measured): B is killed, changes go on, B comes back and is
   caught up by a snapshot of the whole database while the changes go on,
   until B holds the newest change.

Rows: ``mirror`` (the default: snapshots are copied from the plugin's local
mirror, off the hook path) and ``no mirror`` (``# mirror = off``: the copy is
made inside the hook call that starts the snapshot, as before the mirror).
For each phase: calls, p50, p99 and the longest hook call; the *behind* row
(B is down, no snapshot under way) is the floor of the same run. The
compaction phase starts with the node's first call, once the plugin is
connected to both servers (it connects at its start, before lightningd's
first call here: the connection's time is not a snapshot's stall); without
the mirror that call makes the copy. Target: the longest call during compaction and catch-up
≤ 50 ms with the mirror.

Disk hygiene: before each measured phase the bench writes back what the page
cache holds dirty (``os.sync()``) and pauses :data:`SETTLE_SECONDS` (``--settle``),
so that no phase pays for the writeback of the database just built, or of the
phase before (an fsync waits behind it). It prints how many MB were dirty at
each phase's start. Without it (``--settle 0``) the floor row itself had calls
of 100-170 ms, each a server's record fsync taking that long.

The copy of the database that ``no mirror`` makes inside the call is timed
by the plugin (its log says ``copied the database … in X s``) and printed too.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the helpers package: tests/helpers

from measure import pct, vm_hwm_mb  # noqa: E402

from cldcb.plugin.main import ENV_COMPACTION_INTERVAL  # noqa: E402

GROW_BYTES = 1024 * 1024
SETTLE_SECONDS = 2.0
TARGET_MS = 50.0
SCHEMA = ["CREATE TABLE vars (name TEXT PRIMARY KEY, intval INTEGER)",
          "CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB)",
          "CREATE TABLE payments (id INTEGER PRIMARY KEY, note TEXT)",
          "INSERT INTO vars VALUES ('data_version', 1)"]
BUMP = "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version'"


def dirty_mb() -> float:
    """Dirty and under-writeback page cache, in MB (/proc/meminfo)."""
    kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(("Dirty:", "Writeback:")):
            kib += int(line.split()[1])
    return kib / 1024


def _growth(i: int) -> list[str]:
    return [f"INSERT INTO filler (data) VALUES (zeroblob({GROW_BYTES}))", BUMP]


def _small(i: int) -> list[str]:
    return [f"INSERT INTO payments (note) VALUES ('payment {i} {'x' * (i % 200)}')", BUMP]


class Run:
    """One row: a node, two servers, the plugin with or without its mirror."""

    def __init__(self, folder: Path, mirror: bool, pause: float, settle: float) -> None:
        from helpers.servers import CldcbServer
        from helpers.simlightningd import SimLightningd

        from cldcb.core.ids import (
            client_id_from_pubkey,
            new_privkey,
            node_id_from_pubkey,
            pubkey_of,
        )
        from cldcb.plugin.wrapper import (
            ServerEntry,
            WrapperConfig,
            default_plugin_path,
            write_wrapper,
        )

        self.pause = pause
        self.settle_s = settle
        self.dirty: dict[str, float] = {}
        client = new_privkey()
        self.servers = []
        for name in ("a", "b"):
            server = CldcbServer(folder / f"server-{name}" / "data").init()
            server.add(client_id_from_pubkey(pubkey_of(client)))
            self.servers.append(server.start())
        ld = folder / "lightning"
        (ld / "regtest").mkdir(parents=True)
        wrapper = ld / "regtest" / "cldcb-plugin-wrapper"
        write_wrapper(wrapper, WrapperConfig(
            client_id=client_id_from_pubkey(pubkey_of(client)), client_priv=client,
            node_id=node_id_from_pubkey(pubkey_of(new_privkey())),
            servers=tuple(ServerEntry(s.address, s.server_id) for s in self.servers),
            quorum=1, plugin_path=default_plugin_path(), mirror=mirror))
        self.node = SimLightningd(ld, wrapper, hook_timeout=600)
        self.dv = 0
        self.calls = 0
        self.plugin_mb = 0.0

    def call(self, writes: list[str]) -> float:
        """One change; its hook latency in ms."""
        self.dv += 1
        c = self.node.db_write(self.dv, writes)
        self.calls += 1
        if self.pause:
            time.sleep(self.pause)
        assert c.latency is not None
        return c.latency * 1e3

    def settle(self, phase: str) -> None:
        """Before a measured phase: write back what is dirty, then pause (see above)."""
        self.dirty[phase] = round(dirty_mb(), 1)
        if self.settle_s > 0:
            os.sync()
            time.sleep(self.settle_s)

    def logs_since(self, mark: int, text: str) -> list[str]:
        return [m for m in self.node.log_messages()[mark:] if text in m]

    def build(self, size_mb: int) -> None:
        self.node.env[ENV_COMPACTION_INTERVAL] = "1e9"
        self.node.start()
        self.node.init()
        self.call(SCHEMA)
        for i in range(size_mb):
            self.call(_growth(i))
        self.node.close()
        del self.node.env[ENV_COMPACTION_INTERVAL]

    def stream_until(self, done: Any, what: str, timeout: float = 1800) -> list[float]:
        lat: list[float] = []
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}:\n"
                                 + "\n".join(self.node.log_messages()[-20:]))
            lat.append(self.call(_small(self.calls)))
        return lat

    def measure(self) -> dict[str, Any]:
        node = self.node
        mark = len(node.log_messages())
        node.start()
        node.init()
        connected = time.monotonic() + 120          # the plugin connects at its start:
        while len(self.logs_since(mark, ": connected, holds")) < 2:       # not a snapshot's
            if time.monotonic() > connected:                         # stall, not measured
                raise SystemExit("the plugin did not connect to both servers in 120 s")
            assert node.plugin is not None
            node.plugin.pump(0.05)                   # (reads what the plugin logs)
        self.settle("compaction")
        first = self.call(_small(self.calls))      # (no mirror: the copy is made in it)
        compact = [first] + self.stream_until(
            lambda: len([m for m in self.logs_since(mark, "compaction snapshot at")
                         if "is durable" in m]) >= 2, "the compactions")
        a, b = self.servers
        b.kill()
        self.settle("behind")
        behind = [self.call(_small(self.calls)) for _ in range(200)]
        self.settle("catch_up")
        mark = len(node.log_messages())
        b.start(b.port)
        catch_up = self.stream_until(
            lambda: bool(self.logs_since(mark, f"server {b.address}: snapshot at data_version")),
            "B's catch-up")
        assert node.plugin is not None
        self.plugin_mb = vm_hwm_mb(node.plugin.pid)
        copies = [float(m.rsplit(" in ", 1)[1].split()[0])
                  for m in node.log_messages() if "copied the database at" in m]
        mirror_copies = [float(m.split(") held in ", 1)[1].split()[0])
                         for m in node.log_messages() if "snapshot of the mirror at" in m]
        node.close()
        return {"compaction": compact, "behind": behind, "catch_up": catch_up,
                "db_copies_s": copies[1:], "mirror_copies_s": mirror_copies,
                "dirty_mb": self.dirty,
                "thrown_away": sum("mirror is thrown away" in m for m in node.log_messages())}

    def stop(self) -> None:
        if self.node.plugin is not None:
            self.node.close()
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="database size (MiB)")
    ap.add_argument("--pause", type=float, default=0.002,
                    help="seconds between two changes of the measured stream")
    ap.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                    help="seconds of pause after os.sync() before each measured phase "
                         "(0: neither)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the nodes and servers live (default: a temporary folder "
                         "on the disk; the copy's time depends on that disk)")
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    mb: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cldcb-stall-", dir=args.dir) as tmp:
        runs = {"mirror": Run(Path(tmp) / "mirror", True, args.pause, args.settle),
                "no mirror": Run(Path(tmp) / "nomirror", False, args.pause, args.settle)}
        try:
            for name, run in runs.items():
                started = time.monotonic()
                run.build(args.size_mb)
                print(f"{name}: built {args.size_mb} MiB in {time.monotonic() - started:.0f} s",
                      file=sys.stderr)
            for name, run in runs.items():
                results[name] = run.measure()
                mb[name] = run.plugin_mb
                print(f"{name}: measured", file=sys.stderr)
        finally:
            for run in runs.values():
                run.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"hook calls while a {args.size_mb} MiB database is snapshotted (two servers, "
          f"quorum 1; a change every {args.pause * 1e3:g} ms; os.sync() and "
          f"{args.settle:g} s of pause before each phase; load {os.getloadavg()[0]:.1f})")
    print(f"{'':28} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'dirty MB':>9}")
    out: dict[str, Any] = {"bench": "stall", "size_mb": args.size_mb}
    for name, r in results.items():
        for phase in ("behind", "compaction", "catch_up"):
            xs = r[phase]
            print(f"{name + ': ' + phase.replace('_', '-'):28} {len(xs):6} {pct(xs, .5):8.2f} "
                  f"{pct(xs, .99):8.2f} {max(xs):8.1f} {r['dirty_mb'].get(phase, 0):9.1f}")
        key = "mirror" if name == "mirror" else "no_mirror"
        during = r["compaction"] + r["catch_up"]
        out[f"{key}_max_ms"] = round(max(during), 1)
        out[f"{key}_p99_ms"] = round(pct(during, .99), 2)
        out[f"{key}_p50_ms"] = round(pct(during, .5), 2)
        out[f"{key}_floor_p50_ms"] = round(pct(r["behind"], .5), 2)
        out[f"{key}_peak_rss_mb"] = round(mb[name], 1)
        out[f"{key}_floor_max_ms"] = round(max(r["behind"]), 1)
        out[f"{key}_db_copies_s"] = r["db_copies_s"]
        if name == "mirror":
            out["mirror_copies_s"] = r["mirror_copies_s"]
            out["mirror_thrown_away"] = r["thrown_away"]
        print(f"{name}: copies of the database inside a hook call (s): "
              f"{r['db_copies_s'] or 'none'}; copies of the mirror (s): "
              f"{r['mirror_copies_s'] or 'none'}; peak RSS plugin {mb[name]:.0f} MB")
    out["floor_p50_ms"] = out["mirror_floor_p50_ms"]
    out["settle_s"] = args.settle
    out["load"] = round(os.getloadavg()[0], 2)
    out["ratio"] = round(out["mirror_max_ms"] / out["no_mirror_max_ms"], 4)
    out["peak_rss_mb"] = out["mirror_peak_rss_mb"]
    out["target_met"] = out["mirror_max_ms"] <= TARGET_MS
    print(f"longest hook call during compaction and catch-up: mirror {out['mirror_max_ms']} ms, "
          f"no mirror {out['no_mirror_max_ms']} ms (target with the mirror ≤ {TARGET_MS:g} ms)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
