#!/usr/bin/env python3
"""Disaster recovery of a 1 GiB snapshot plus 100,000 records, next to a plain copy.

Setup (not timed): a SQLite database of ``--size-mb`` (a ``vars`` table with
``data_version`` and a table of 4 KiB rows), sealed in 1 MiB chunks to the
node key of the ``plain32`` vector, then ``--records`` changes sealed as the
plugin seals them (each: insert a 300-byte row, update a random 4 KiB row,
bump ``data_version``), all written into a real server's store (with fsync
switched off, since ingestion is not what is measured), a recognition entry,
and ``cldcb-server serve`` on 127.0.0.1.

Timed: ``cldcb-client recover`` as a subprocess, from a folder holding only
``hsm_secret``: anonymous listing, fetch over SSH on loopback, every tag and
the chain verified, the replay, ``PRAGMA integrity_check``, the database
moved into place, the wrapper written. Peak RSS: the high-water mark of the client
process and of its replay process (each polled from /proc).

Floor, in the same run: a plain copy (``cp``, then fsync) of the same bytes
the server holds for this client (the snapshot file and the log segments)
into the same folder. Prints a table, then one JSON line (DESIGN §9).
Target (issue 16): ≤ 10 s for 1 GiB + 100,000 records, peak RSS < 150 MB.

    python3 bench/recover.py [--size-mb 1024] [--records 100000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from cldcb.core.dataversion import Kind, advance, decide, snapshot_tip  # noqa: E402
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of  # noqa: E402
from cldcb.core.recognition import make_recognition, message_for_client  # noqa: E402
from cldcb.core.seal import RecordSealer, SnapshotSealer, item_hash  # noqa: E402
from cldcb.node.nodekey import LocalNodeKey  # noqa: E402
from cldcb.store import OsFileLayer, Store  # noqa: E402

SERVER = [sys.executable, "-m", "cldcb.server.admin"]
CLIENT = [sys.executable, "-m", "cldcb.client.app"]
PLAIN32 = "fe77a220dcb864fb843f0161a4a33f2a8844b89c7160476af9ebe196b6e9e0ed"
CHUNK = 1 << 20
ROW = 4000
TARGET_S = 10.0
TARGET_RSS_MB = 150.0
#: Lines of recover's progress output whose first appearance ends a phase.
MARKS = (b"snapshot   0.0%", b"snapshot 100.0%", b": verified: data_version")
marks: dict[bytes, float] = {}
child_peaks: dict[int, float] = {}


class NoSync(OsFileLayer):
    """The real file system without fsync: for building the server's store quickly."""

    def fsync(self, fd: int, *, data_only: bool = False) -> None:
        pass

    def pwrite_durable(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return self.pwrite(fd, data, offset)

    def fsync_dir(self, path: Path) -> None:
        pass


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_database(path: Path, size_mb: int) -> tuple[int, int]:
    """A Core-Lightning-like database of about ``size_mb``; (data_version, rows)."""
    rows = size_mb * (1 << 20) // (ROW + 120)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = OFF")
    con.execute("PRAGMA synchronous = OFF")
    con.execute("CREATE TABLE vars (name VARCHAR(32), val VARCHAR(255), intval INTEGER, "
                "blobval BLOB, PRIMARY KEY (name))")
    con.execute("INSERT INTO vars (name, intval) VALUES ('data_version', 1)")
    con.execute("CREATE TABLE channel_htlcs (id INTEGER PRIMARY KEY, state INTEGER, "
                "payload BLOB)")
    con.execute("CREATE TABLE payments (id INTEGER PRIMARY KEY, payment_hash BLOB, "
                "status INTEGER, description TEXT)")
    con.execute("BEGIN")
    blob = os.urandom(ROW)
    for i in range(rows):
        con.execute("INSERT INTO channel_htlcs VALUES (?, 0, ?)",
                    (i, blob[i % 64:] + blob[:i % 64]))
    con.execute("COMMIT")
    con.close()
    return 1, rows


def changes(start: int, count: int, rows: int, seed: int = 7):  # noqa: ANN201 - generator
    rnd = random.Random(seed)
    for n in range(count):
        dv = start + 1 + n
        yield dv, [
            f"INSERT INTO payments (id, payment_hash, status, description) VALUES ({n}, "
            f"x'{rnd.randbytes(32).hex()}', 0, '{rnd.randbytes(100).hex()}')",
            f"UPDATE channel_htlcs SET state = {dv} WHERE id = {rnd.randrange(rows)}",
            f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND "
            f"intval = {dv - 1}",
        ]


def build_store(data_dir: Path, db: Path, start: int, rows: int, records: int,
                node: LocalNodeKey, client_priv: bytes) -> int:
    """Seal the snapshot and the records into the client's store; bytes held."""
    client_id = client_id_from_pubkey(pubkey_of(client_priv))
    store = Store.open(data_dir, fs=NoSync())
    cs = store.client(client_id)
    now = int(time.time() * 1000)
    anchor = os.urandom(32)
    sealer = SnapshotSealer(node.pubkey, client_priv, new_privkey(), start, anchor)
    upload = cs.begin_snapshot(start, anchor, now)
    with open(db, "rb") as f:
        while data := f.read(CHUNK):
            upload.add_chunk(sealer.chunk_count, sealer.seal_chunk(data))
    upload.commit(sealer.chunk_count, sealer.seal_manifest(now), now)
    rs = RecordSealer(node.pubkey, client_priv, new_privkey())
    tip = snapshot_tip(start, anchor)
    for dv, writes in changes(start, records, rows):
        decision = decide(tip, dv, Kind.NORMAL)
        assert decision.link is not None
        sealed = rs.seal_change(dv, Kind.NORMAL, decision.link, writes, now)
        cs.append(dv, int(Kind.NORMAL), decision.link, sealed, now)
        tip = advance(tip, dv, Kind.NORMAL, item_hash(sealed), decision=decision)
    signed = node.sign_message(message_for_client(client_priv, node.pubkey))
    store.put_recognition(client_id, make_recognition(client_priv, node.pubkey, signed.zbase,
                                                      new_privkey()).encode())
    cs.close()
    folder = data_dir / "clients" / client_id
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".snap", ".log"))


def _hwm_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def measured(cmd: list[str]) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MiB, exit status, stderr tail) of one program.

    The peak is the process's own high-water mark (``VmHWM``, polled until it
    exits): ``wait4``'s ``ru_maxrss`` would report at least this (big) Python
    process's size, which a forked child inherits across exec. The peaks of its
    child processes (recover's replay process) are kept in :data:`child_peaks`.
    """
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    err = bytearray()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.extend(line)
            for mark in MARKS:
                if mark in line and mark not in marks:
                    marks[mark] = time.monotonic() - started

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _hwm_mib(proc.pid))
        for child in _children(proc.pid):
            child_peaks[child] = max(child_peaks.get(child, 0.0), _hwm_mib(child))
        time.sleep(0.02)
    reader.join()
    return (time.monotonic() - started, peak, proc.returncode,
            err.decode("utf-8", "replace")[-3000:])


def copy_floor(files: list[Path], dest: Path) -> tuple[float, float]:
    """``cp`` the files into ``dest``, then fsync the copies: (seconds, peak RSS MiB of cp)."""
    started = time.monotonic()
    _, rss, code, err = measured(["cp", *map(str, files), str(dest)])
    if code != 0:
        raise SystemExit(f"cp failed: {err}")
    for p in dest.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - started, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cldcb-bench-recover-", dir=args.workdir))
    server = None
    try:
        node = LocalNodeKey.from_hsm_secret_bytes(bytes.fromhex(PLAIN32))
        client_priv = new_privkey()
        data_dir = work / "server"
        sid = subprocess.run([*SERVER, "--data-dir", str(data_dir), "init"], check=True,
                             capture_output=True, text=True).stdout.strip()
        subprocess.run([*SERVER, "--data-dir", str(data_dir), "add",
                        client_id_from_pubkey(pubkey_of(client_priv))], check=True,
                       capture_output=True)
        say(f"building a {args.size_mb} MiB database ...")
        t = time.monotonic()
        source = work / "source.sqlite3"
        start, rows = make_database(source, args.size_mb)
        db_bytes = source.stat().st_size
        say(f"  {db_bytes / 1e6:.0f} MB in {time.monotonic() - t:.1f} s; sealing it and "
            f"{args.records} records into the server's store ...")
        t = time.monotonic()
        held = build_store(data_dir, source, start, rows, args.records, node, client_priv)
        source.unlink()
        say(f"  {held / 1e6:.0f} MB held by the server, in {time.monotonic() - t:.1f} s")
        with socket_port() as port:
            pass
        log = open(work / "server.log", "wb")  # noqa: SIM115 - closed in finally
        server = subprocess.Popen([*SERVER, "--data-dir", str(data_dir), "serve", "--listen",
                                   f"127.0.0.1:{port}"], stdout=log, stderr=log)
        wait_port(port)
        subprocess.run(["sync"], check=False)

        say("floor: cp of the same bytes (snapshot file and log segments), then fsync ...")
        floor_dir = work / "floor"
        floor_dir.mkdir()
        folder = data_dir / "clients" / client_id_from_pubkey(pubkey_of(client_priv))
        files = [p for p in sorted(folder.rglob("*")) if p.suffix in (".snap", ".log")]
        copy_s, copy_rss = copy_floor(files, floor_dir)
        shutil.rmtree(floor_dir)

        say("recover: cldcb-client recover ...")
        lightning_dir = work / "node"
        (lightning_dir / "bitcoin").mkdir(parents=True)
        (lightning_dir / "bitcoin" / "hsm_secret").write_bytes(bytes.fromhex(PLAIN32))
        child_peaks.clear()
        rec_s, rec_rss, code, err = measured(
            [*CLIENT, "recover", "--lightning-dir", str(lightning_dir), "--server",
             f"127.0.0.1:{port}", "--server-id", sid])
        if code != 0:
            raise SystemExit(f"recover failed ({code}):\n{err}")
        db = lightning_dir / "bitcoin" / "lightningd.sqlite3"
        con = sqlite3.connect(db)
        (dv,) = con.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()
        con.close()
        assert dv == start + args.records, dv
        t = time.monotonic()
        con = sqlite3.connect(db)
        con.execute("PRAGMA integrity_check").fetchall()
        con.close()
        check_s = time.monotonic() - t
        mb = held / 1e6
        child_rss = max(child_peaks.values(), default=0.0)
        met = rec_s <= TARGET_S and max(rec_rss, child_rss) < TARGET_RSS_MB
        print(f"{'':34} {'seconds':>9} {'MB/s':>8} {'peak RSS MiB':>13}")
        print(f"{'recover (fetch+verify+replay+check)':34} {rec_s:9.1f} {mb / rec_s:8.1f} "
              f"{rec_rss:13.1f}")
        print(f"{'  its replay process':34} {'':9} {'':8} {child_rss:13.1f}")
        print(f"{'floor: cp + fsync of the same bytes':34} {copy_s:9.1f} {mb / copy_s:8.1f} "
              f"{copy_rss:13.1f}")
        ends = [marks.get(m, float("nan")) for m in MARKS] + [rec_s]
        names = ("connect_list_status", "download_snapshot", "replay_and_check", "install")
        phases = {n: b - a for n, a, b in zip(names, [0.0, *ends[:-1]], ends, strict=True)}
        print("recover phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        print(f"snapshot {db_bytes / 1e6:.0f} MB + {args.records} records "
              f"({held / 1e6:.0f} MB held); data_version {dv}; ratio {rec_s / copy_s:.1f}x; "
              f"PRAGMA integrity_check alone: {check_s:.1f} s; target <= {TARGET_S:.0f} s and "
              f"< {TARGET_RSS_MB:.0f} MB: {'met' if met else 'MISSED'}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(json.dumps({
            "bench": "recover", "snapshot_mb": round(db_bytes / 1e6, 1),
            "records": args.records, "held_mb": round(mb, 1),
            "seconds": round(rec_s, 2), "floor_seconds": round(copy_s, 2),
            "ratio": round(rec_s / copy_s, 2), "mb_per_s": round(mb / rec_s, 1),
            "floor_mb_per_s": round(mb / copy_s, 1), "peak_rss_mb": round(rec_rss, 1),
            "replay_process_peak_rss_mb": round(child_rss, 1),
            "floor_peak_rss_mb": round(copy_rss, 1),
            "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                       / 1024, 1),
            "integrity_check_seconds": round(check_s, 2),
            "phases_seconds": {k: round(v, 2) for k, v in phases.items()},
            "target_seconds": TARGET_S,
            "target_rss_mb": TARGET_RSS_MB, "load_average": round(os.getloadavg()[0], 1),
            "target_met": met}))
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        if args.keep:
            say(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


class socket_port:  # noqa: N801 - a tiny context manager
    def __enter__(self) -> int:
        import socket
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return int(self.s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.s.close()


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the server did not listen on {port}")


if __name__ == "__main__":
    sys.exit(main())
