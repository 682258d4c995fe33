#!/usr/bin/env python3
"""Priority inversion through the GIL: why the mirror's thread is not made nicer.

A process like the plugin: its main thread wakes up every ``--period`` ms (a
hook call arriving) and needs the GIL at once; a background thread runs
Python code (the mirror's apply and check: SQLite calls with Python between
them, the GIL held for that Python). ``--hogs`` other processes (the servers,
lightningd, anything else on the machine) keep the CPUs busy. Rounds
alternate the background thread's nice value between 0 (the process's) and
``--nice``. How late the main thread's wake-ups are is measured, in the same
run, for both.

A nicer thread gets the CPU less often, but while it holds the GIL the main
thread cannot run either: it waits until the nicer thread is scheduled again
and lets go. On the 2-core test machine (load 4) a background thread at nice
10 made the main thread's wake-ups late by p50 20 ms, max 158–366 ms, against
p50 5–7 ms, max 36–207 ms at nice 0. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from measure import pct


def _round(nice: int, seconds: float, period: float, hogs: int) -> list[float]:
    """Wake-up lateness (ms) of this thread while a thread at ``nice`` runs Python code."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    stop = threading.Event()

    def background() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i                      # Python bytecode: the GIL is held

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    late: list[float] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            time.sleep(period)
            late.append((time.monotonic() - t - period) * 1e3)
    finally:
        stop.set()
        for p in procs:
            p.kill()
            p.wait()
        thread.join(10)
    return late


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nice", type=int, default=10, help="the nicer round's nice value")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of a round")
    ap.add_argument("--period", type=float, default=0.002, help="seconds between wake-ups")
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2,
                    help="busy processes beside (default: one per CPU)")
    args = ap.parse_args()
    late: dict[int, list[float]] = {0: [], args.nice: []}
    for _ in range(args.rounds):
        for nice in (0, args.nice):
            late[nice] += _round(nice, args.seconds, args.period, args.hogs)
    load = os.getloadavg()[0]
    print(f"main thread's wake-up lateness while a thread runs Python code ({args.hogs} busy "
          f"processes beside, {args.rounds} alternating rounds of {args.seconds:g} s; "
          f"load {load:.1f})")
    print(f"{'background thread':22} {'wake-ups':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    out: dict[str, object] = {"bench": "gil_priority", "load": round(load, 2)}
    for nice, xs in late.items():
        print(f"{'nice ' + str(nice):22} {len(xs):9} {pct(xs, .5):8.2f} {pct(xs, .99):8.2f} "
              f"{max(xs):8.1f}")
        out[f"nice{nice}_p50_ms"] = round(pct(xs, .5), 2)
        out[f"nice{nice}_p99_ms"] = round(pct(xs, .99), 2)
        out[f"nice{nice}_max_ms"] = round(max(xs), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
