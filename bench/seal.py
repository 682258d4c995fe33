#!/usr/bin/env python3
"""Cost of sealing a typical change (2 KiB) and a 1 MiB snapshot chunk.

The floor is the bare ChaCha20-Poly1305 AEAD on the same bytes, measured in
the same run. The process keeps freed memory as the plugin does
(:func:`cldcb.cli.malloc.keep_freed_memory`; ``--default-malloc`` not). Prints a
table, then one JSON line (DESIGN §9).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from measure import pct

from cldcb.cli.malloc import keep_freed_memory
from cldcb.core.dataversion import Kind
from cldcb.core.ids import new_privkey, pubkey_of
from cldcb.core.seal import RecordSealer, SnapshotSealer


def timed(fn, n: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out




def main() -> None:
    if "--default-malloc" not in sys.argv[1:]:
        keep_freed_memory()
    node_pub = pubkey_of(new_privkey())
    client = new_privkey()
    change = ["INSERT INTO datastore VALUES (x'6b31', x'" + "ab" * 1000 + "', 0)",
              "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 41"]
    change_bytes = sum(len(w) for w in change)
    chunk = os.urandom(1 << 20)
    aead = ChaCha20Poly1305(os.urandom(32))
    nonce = bytes(12)
    plain_change = "".join(change).encode()

    rs = RecordSealer(node_pub, client, new_privkey())
    link = bytes(32)
    n = 20000
    rec = timed(lambda: rs.seal_change(42, Kind.NORMAL, link, change, 1), n)
    rec_floor = timed(lambda: aead.encrypt(nonce, plain_change, link), n)

    ss = SnapshotSealer(node_pub, client, new_privkey(), 41, link)
    m = 200
    snap = timed(lambda: ss.seal_chunk(chunk), m)
    snap_floor = timed(lambda: aead.encrypt(nonce, chunk, b""), m)
    setup = timed(lambda: RecordSealer(node_pub, client, new_privkey()), 500)

    mb = len(chunk) / 1e6
    rows = [
        ("seal a 2 KiB change", pct(rec, .5), pct(rec, .99), pct(rec_floor, .5)),
        ("seal a 1 MiB chunk", pct(snap, .5), pct(snap, .99), pct(snap_floor, .5)),
        ("new stream (2 ECDH + HKDF)", pct(setup, .5), pct(setup, .99), float("nan")),
    ]
    print(f"{'operation':32} {'p50 µs':>10} {'p99 µs':>10} {'floor p50 µs':>13} {'ratio':>7}")
    for name, p50, p99, floor in rows:
        print(f"{name:32} {p50:10.1f} {p99:10.1f} {floor:13.1f} {p50 / floor:7.2f}")
    chunk_mb_s = mb / (statistics.median(snap) / 1e6)
    floor_mb_s = mb / (statistics.median(snap_floor) / 1e6)
    print(f"change size {change_bytes} bytes; chunk throughput {chunk_mb_s:.0f} MB/s "
          f"(bare AEAD {floor_mb_s:.0f} MB/s)")
    print(json.dumps({
        "bench": "seal", "p50_us": round(pct(rec, .5), 2), "p99_us": round(pct(rec, .99), 2),
        "floor_p50_us": round(pct(rec_floor, .5), 2),
        "ratio": round(pct(rec, .5) / pct(rec_floor, .5), 2),
        "chunk_p50_us": round(pct(snap, .5), 1),
        "floor_chunk_p50_us": round(pct(snap_floor, .5), 1),
        "chunk_ratio": round(pct(snap, .5) / pct(snap_floor, .5), 3),
        "mb_per_s": round(chunk_mb_s, 1), "floor_mb_per_s": round(floor_mb_s, 1),
        "stream_setup_p50_us": round(pct(setup, .5), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
