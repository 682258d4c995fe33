#!/usr/bin/env python3
"""What a record's sealed size tells the server, and what padding costs (issue 18, item 4).

Every call of each recorded trace (``tests/data``) is sealed twice, in the
same run: as record format 1 seals it (unpadded; the *floor*: the layout before
padding, built from the same stream sealer) and as the plugin seals it now
(format 2: ``replaces`` in the header, plaintext padded to its size class,
:func:`cldcb.core.seal.padded_size`). For each:

- **identifying**: the fraction of records whose exact sealed size names the
  type of their first statement (verb and table, e.g. ``INSERT payments``):
  every record of that size in the trace has the same type. ``shape``: the
  same for the types of all its statements, in order.
- **payment alone**: of the records that insert a payment, how many have a
  sealed size no other record has;
- **bytes**: the sealed bytes of the whole trace (what the server stores,
  frames aside), and their ratio to the floor's;
- **seal µs**: the p50 time to seal one change (CPU cost of padding), next to
  the floor's.

The hook's round trip with padding is ``bench/hook_latency.py`` (its floor
sends requests of the sealed sizes, so it pays for padding's bytes too).
Prints a table, then one JSON line (DESIGN §9).
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the helpers package: tests/helpers

from helpers.traces import TRACES, load_trace  # noqa: E402
from measure import pct  # noqa: E402

from cldcb.core.dataversion import Kind, classify  # noqa: E402
from cldcb.core.ids import new_privkey, pubkey_of  # noqa: E402
from cldcb.core.seal import (  # noqa: E402
    VERSION,
    RecordSealer,
    StreamSealer,
    encode_change,
    record_context,
)

_TYPE = re.compile(r"\s*(INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?|"
                   r"DELETE\s+FROM|CREATE\s+(?:UNIQUE\s+)?\w+(?:\s+IF\s+NOT\s+EXISTS)?|"
                   r"ALTER\s+TABLE|DROP\s+\w+(?:\s+IF\s+EXISTS)?|PRAGMA|\w+)\s*([\w\"]*)",
                   re.IGNORECASE)


def statement_type(sql: str) -> str:
    """The verb and the table of a statement: ``INSERT payments``, ``UPDATE vars``."""
    m = _TYPE.match(sql)
    if m is None:
        return "?"
    return f"{m.group(1).split()[0].upper()} {m.group(2).strip(chr(34)).lower()}"


def identifying(sizes: Sequence[int], labels: Sequence[str]) -> float:
    """The fraction of items whose size alone names their label."""
    seen: dict[int, set[str]] = defaultdict(set)
    for size, label in zip(sizes, labels, strict=True):
        seen[size].add(label)
    return sum(1 for s in sizes if len(seen[s]) == 1) / len(sizes)


def alone(sizes: Sequence[int], marked: Sequence[bool]) -> int:
    """How many marked items have a size that no unmarked item has."""
    others = {s for s, m in zip(sizes, marked, strict=True) if not m}
    return sum(1 for s, m in zip(sizes, marked, strict=True) if m and s not in others)


def sealed_sizes(calls: list[tuple[int, list[str]]],
                 seal: Callable[[int, Kind, list[str]], bytes]) -> tuple[list[int], list[float]]:
    sizes, times = [], []
    for dv, writes in calls:
        kind = classify(writes)
        t = time.perf_counter_ns()
        sealed = seal(dv, kind, writes)
        times.append((time.perf_counter_ns() - t) / 1000)
        sizes.append(len(sealed))
    return sizes, times


def measure(trace: str, node_pub: bytes, client: bytes) -> dict[str, object]:
    """One trace sealed both ways: the figures of one row."""
    client_pub = pubkey_of(client)
    link = bytes(32)
    calls = load_trace(trace)
    first = [statement_type(w[0]) if w else "" for _, w in calls]
    shape = [" ; ".join(statement_type(s) for s in w) for _, w in calls]
    payment = [any(statement_type(s) == "INSERT payments" for s in w) for _, w in calls]
    v1 = StreamSealer(node_pub, client, b"record", new_privkey(), VERSION)
    v2 = RecordSealer(node_pub, client, new_privkey())
    before, t_before = sealed_sizes(calls, lambda dv, kind, w: v1.seal(
        encode_change(w, 1), record_context(client_pub, dv, kind, link)))
    after, t_after = sealed_sizes(calls, lambda dv, kind, w: v2.seal_change(
        dv, kind, link, w, 1))
    return {
        "trace": trace, "records": len(calls),
        "identifying_before": round(identifying(before, first), 4),
        "identifying_after": round(identifying(after, first), 4),
        "shape_identifying_before": round(identifying(before, shape), 4),
        "shape_identifying_after": round(identifying(after, shape), 4),
        "sizes_before": len(set(before)), "sizes_after": len(set(after)),
        "payment_inserts": sum(payment), "payment_alone_before": alone(before, payment),
        "payment_alone_after": alone(after, payment),
        "bytes_before": sum(before), "bytes_after": sum(after),
        "bytes_ratio": round(sum(after) / sum(before), 3),
        "seal_p50_us": round(pct(t_after, .5), 2),
        "floor_seal_p50_us": round(pct(t_before, .5), 2),
    }


def main() -> None:
    node_pub = pubkey_of(new_privkey())
    client = new_privkey()
    rows: list[dict[str, Any]] = [measure(trace, node_pub, client) for trace in TRACES]
    print(f"{'trace':18} {'records':>7} {'identifying':>17} {'shape ident.':>17} "
          f"{'sizes':>11} {'sealed bytes':>21} {'ratio':>6} {'seal p50 µs':>13}")
    for r in rows:
        print(f"{r['trace']:18} {r['records']:7} "
              f"{r['identifying_before']:8.1%}→{r['identifying_after']:7.1%} "
              f"{r['shape_identifying_before']:8.1%}→{r['shape_identifying_after']:7.1%} "
              f"{r['sizes_before']:5}→{r['sizes_after']:4} "
              f"{r['bytes_before']:10}→{r['bytes_after']:10} {r['bytes_ratio']:6.3f} "
              f"{r['floor_seal_p50_us']:6.1f}→{r['seal_p50_us']:5.1f}")
    print("identifying: records whose exact sealed size names their first statement's "
          "type (before → after padding); shape: the types of all its statements")
    for r in rows:
        print(f"{r['trace']}: of {r['payment_inserts']} records inserting a payment, "
              f"{r['payment_alone_before']} → {r['payment_alone_after']} have a sealed size "
              "that no other record has")
    total_before = sum(r["bytes_before"] for r in rows)
    total_after = sum(r["bytes_after"] for r in rows)
    main_trace = rows[[r["trace"] for r in rows].index("cln-channels")]
    print(json.dumps({
        "bench": "padding",
        "identifying_before": main_trace["identifying_before"],
        "identifying_after": main_trace["identifying_after"],
        "bytes_before": total_before, "bytes_after": total_after,
        "ratio": round(total_after / total_before, 3),
        "p50_us": main_trace["seal_p50_us"], "floor_p50_us": main_trace["floor_seal_p50_us"],
        "traces": rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
