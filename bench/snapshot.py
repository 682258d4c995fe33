#!/usr/bin/env python3
"""A blocking snapshot of a 1 GiB database through the plugin, next to its floor.

Measured: the first ``db_write`` call of a node whose database already holds
1 GiB (first contact): the plugin copies the database (its bytes, under a read
lock; the copy is filled while it is uploaded), seals it in 1 MiB chunks and
streams it over SSH on loopback to ``cldcb-server serve``, then sends the change
on top; the call is answered once both are durable. Throughput = database size /
time of that call. Peak RSS (VmHWM) of the plugin and of the server are read from
/proc, and the CPU seconds each used during the call (all threads), next to those
of the floor's two ends.

Floor: the same number of bytes streamed in 1 MiB messages over the same SSH
transport (asyncssh, same cipher, loopback) to a minimal subsystem in its own
process that writes them to a file on the same disk and fsyncs at the end.

Target (issue 16): at least 0.8 of the floor (and 100 MB/s, DESIGN §9), peak memory
of each process under 150 MB. The ratio, not the MB/s, is what compares across
machines and loads: both are measured in the same run. Prints a table, then one JSON
line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import asyncssh  # noqa: E402
from measure import cpu_ns, vm_hwm_mb  # noqa: E402
from sshfloor import FloorSession, connect, floor_server, run_child  # noqa: E402

SINK = "sink"
CHUNK = 1024 * 1024
TARGET_RATIO = 0.8




# -- floor: stream the bytes over the same SSH transport to a sink that fsyncs -----------------

class _SinkSession(FloorSession):
    SUBSYSTEM = SINK

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._cpu = time.process_time()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        os.write(self._fd, data)

    def eof_received(self) -> bool:
        os.fsync(self._fd)
        os.close(self._fd)
        assert self._chan is not None
        self._chan.write(b"done" + struct.pack(">d", time.process_time() - self._cpu))
        self._chan.exit(0)
        return False


async def _stream(port: int, size: int) -> tuple[float, float, float]:
    """Seconds of the stream, CPU seconds of this (sending) process and of the sink's."""
    payload = os.urandom(CHUNK)
    async with await connect(port, "sink") as conn:
        writer, reader, _ = await conn.open_session(subsystem=SINK, encoding=None)
        started = time.perf_counter()
        cpu = time.process_time()
        sent = 0
        while sent < size:
            writer.write(payload)
            await writer.drain()
            sent += len(payload)
        writer.write_eof()
        done = await reader.readexactly(12)
        assert done[:4] == b"done"
        (sink_cpu,) = struct.unpack(">d", done[4:])
        return time.perf_counter() - started, time.process_time() - cpu, sink_cpu


def measure_floor(folder: Path, size: int) -> tuple[float, float, float]:
    try:
        with floor_server(__file__, "--sink-server", folder) as port:
            return asyncio.run(_stream(port, size))
    finally:
        (folder / "sink.bin").unlink(missing_ok=True)


# -- through the plugin ----------------------------------------------------------------------

def measure_plugin(folder: Path, size_mb: int) -> dict[str, float]:
    from servers import CldcbServer
    from simlightningd import SimLightningd
    from test_plugin_harness import make_big_database

    from cldcb.ids import client_id_from_pubkey, new_privkey, node_id_from_pubkey, pubkey_of
    from cldcb.plugin.wrapper import ServerEntry, WrapperConfig, default_plugin_path, write_wrapper

    server = CldcbServer(folder / "server").init()
    client = new_privkey()
    cid = client_id_from_pubkey(pubkey_of(client))
    server.add(cid)
    server.start()
    try:
        ld = folder / "lightning"
        (ld / "regtest").mkdir(parents=True)
        wrapper = ld / "regtest" / "cldcb-plugin-wrapper"
        write_wrapper(wrapper, WrapperConfig(
            client_id=cid, client_priv=client,
            node_id=node_id_from_pubkey(pubkey_of(new_privkey())),
            servers=(ServerEntry(server.address, server.server_id),),
            plugin_path=default_plugin_path()))
        node = SimLightningd(ld, wrapper)
        t = time.perf_counter()
        make_big_database(node.db_path, size_mb, 41)
        made = time.perf_counter() - t
        db_size = node.db_path.stat().st_size
        node.start()
        node.init()
        assert node.plugin is not None and server.proc is not None
        cpu = cpu_ns(node.plugin.pid), cpu_ns(server.proc.pid)
        try:
            call = node.db_write(42, ["UPDATE vars SET intval = intval + 1 WHERE "
                                      "name = 'data_version' AND intval = 41"])
            assert call.outcome == "committed" and call.latency is not None
            plugin_cpu = (cpu_ns(node.plugin.pid) - cpu[0]) / 1e9
            server_cpu = (cpu_ns(server.proc.pid) - cpu[1]) / 1e9
            plugin_mb = vm_hwm_mb(node.plugin.pid)
            server_mb = vm_hwm_mb(server.proc.pid)
        finally:
            node.close()
        copy_s, overlapped = float("nan"), False
        for m in node.log_messages():
            if "copied the database" in m:
                copy_s = float(m.rsplit(" in ", 1)[1].split()[0])
                overlapped = "while it was uploaded" in m
        return {"bytes": db_size, "seconds": call.latency, "copy_seconds": copy_s,
                "copy_overlapped": overlapped,
                "plugin_mb": plugin_mb, "server_mb": server_mb, "make_seconds": made,
                "plugin_cpu": plugin_cpu, "server_cpu": server_cpu}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--sink-server", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink_server:
        path = Path(args.sink_server[0]) / "sink.bin"
        run_child(lambda: _SinkSession(path), int(args.sink_server[1]))
        return
    with tempfile.TemporaryDirectory(prefix="cldcb-bench-") as tmp:
        folder = Path(tmp)
        r = measure_plugin(folder, args.size_mb)
        floor_s, floor_client_cpu, floor_server_cpu = measure_floor(folder, r["bytes"])
    mb = r["bytes"] / 1e6
    mbps = mb / r["seconds"]
    floor_mbps = mb / floor_s
    print(f"snapshot of a {r['bytes'] / 2**20:.0f} MiB database (made in "
          f"{r['make_seconds']:.1f} s)")
    print(f"{'':40} {'seconds':>9} {'MB/s':>9} {'CPU s: sender':>14} {'receiver':>9}")
    print(f"{'through the plugin (first db_write)':40} {r['seconds']:9.2f} {mbps:9.1f} "
          f"{r['plugin_cpu']:14.2f} {r['server_cpu']:9.2f}")
    what = "  the local copy, during the upload" if r["copy_overlapped"] else \
        "  of which the local copy"
    print(f"{what:40} {r['copy_seconds']:9.2f} "
          f"{mb / r['copy_seconds']:9.1f}")
    print(f"{'floor: same bytes over SSH + fsync':40} {floor_s:9.2f} {floor_mbps:9.1f} "
          f"{floor_client_cpu:14.2f} {floor_server_cpu:9.2f}")
    met = (mbps >= TARGET_RATIO * floor_mbps and mbps >= 100 and r["plugin_mb"] < 150
           and r["server_mb"] < 150)
    print(f"ratio {mbps / floor_mbps:.2f} of the floor (target ≥ {TARGET_RATIO}) and ≥ 100 MB/s; "
          f"peak RSS plugin {r['plugin_mb']:.0f} MB, server {r['server_mb']:.0f} MB (target "
          f"< 150 MB): {'met' if met else 'MISSED'}; load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({
        "bench": "snapshot", "bytes": r["bytes"], "seconds": round(r["seconds"], 3),
        "mb_per_s": round(mbps, 1), "floor_mb_per_s": round(floor_mbps, 1),
        "ratio": round(mbps / floor_mbps, 3), "copy_seconds": round(r["copy_seconds"], 3),
        "peak_rss_mb": round(r["plugin_mb"], 1),
        "plugin_cpu_s": round(r["plugin_cpu"], 2), "server_cpu_s": round(r["server_cpu"], 2),
        "floor_cpu_s": [round(floor_client_cpu, 2), round(floor_server_cpu, 2)],
        "server_peak_rss_mb": round(r["server_mb"], 1),
        "load_average": round(os.getloadavg()[0], 1), "target_ratio": TARGET_RATIO,
        "target_met": met}))


if __name__ == "__main__":
    main()
