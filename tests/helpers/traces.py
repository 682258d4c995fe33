"""Real ``db_write`` traffic from Core Lightning v26.06, kept in ``tests/data``.

See ``tests/data`` (copied from the recording's README): each trace is a
list of hook calls ``(data_version, writes)`` in the order lightningd sent
them, with the ``sqlite3 .dump`` of the node's real database at the end.
Replaying a trace into an empty file with the data_version rules gives a
dump byte-identical to :func:`expected_dump`.
"""

from __future__ import annotations

import functools
import gzip
import json
import subprocess
from pathlib import Path

from cldcb.core.dataversion import DecideFn, classify, decide
from cldcb.node.replay import Replayer
from helpers.environment import DATA, require_tool

TRACES = ("cln-workload", "cln-crash-restart", "cln-channels")

#: sha256 of each expected dump (uncompressed), as published with the traces.
EXPECTED_SHA256 = {
    "cln-workload": "0f1c1061f2dff4325b3a18a3c7bd9bf7b40c5eb626ec62f33e0f389219e38848",
    "cln-crash-restart": "b1b098e70ae7f6606c5a72046a9b4b7b5a3a336394ac5f488ca7ab36c35e0bbf",
    "cln-channels": "92b6fb2c1c2b9e76ec145ec560e1f845c1ffbb2094323647d1048144f77fd93c",
}

Trace = list[tuple[int, list[str]]]


def _data_file(name: str, suffix: str) -> Path:
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; known: {', '.join(TRACES)}")
    for candidate in (DATA / f"{name}{suffix}.gz", DATA / f"{name}{suffix}"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{name}{suffix}[.gz] is missing from {DATA}")


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


@functools.cache
def _load(name: str) -> tuple[tuple[int, tuple[str, ...]], ...]:
    calls = []
    for line in _read_bytes(_data_file(name, ".jsonl")).decode("utf-8").splitlines():
        if line.strip():
            call = json.loads(line)
            calls.append((int(call["data_version"]), tuple(call["writes"])))
    return tuple(calls)


def load_trace(name: str) -> Trace:
    """The hook calls of trace ``name``: ``[(data_version, [sql, ...]), ...]`` (a fresh copy)."""
    return [(dv, list(writes)) for dv, writes in _load(name)]


def expected_dump_bytes(name: str) -> bytes:
    """``sqlite3 .dump`` of the node's real database at the end of trace ``name``."""
    return _read_bytes(_data_file(name, ".expected.sql"))


def expected_dump(name: str) -> str:
    """:func:`expected_dump_bytes` as text (UTF-8; undecodable bytes kept as surrogates)."""
    return expected_dump_bytes(name).decode("utf-8", "surrogateescape")


def sqlite_dump_bytes(db_path: Path) -> bytes:
    """Output of ``sqlite3 DB .dump`` (fails under CI=true, skips elsewhere, without sqlite3)."""
    program = require_tool("sqlite3")
    done = subprocess.run([program, str(db_path), ".dump"], capture_output=True, check=False,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"sqlite3 .dump failed ({done.returncode}): "
                           f"{done.stderr.decode('utf-8', 'replace').strip()}")
    return done.stdout


def sqlite_dump(db_path: Path) -> str:
    """:func:`sqlite_dump_bytes` as text, decoded like :func:`expected_dump`."""
    return sqlite_dump_bytes(db_path).decode("utf-8", "surrogateescape")


def replay_trace(name: str, db_path: Path, *, foreign_keys: bool = True,
                 decide_fn: DecideFn = decide, calls: slice = slice(None),
                 batch: int | None = None) -> int:
    """Replay trace ``name`` (or the slice ``calls`` of it) into ``db_path``, with
    ``batch`` kept changes per transaction (the Replayer's default when None).

    Returns ``vars.data_version`` read back at the end.
    """
    with Replayer(db_path, foreign_keys=foreign_keys, decide_fn=decide_fn,
                  batch=batch) as replayer:
        for data_version, writes in _load(name)[calls]:
            replayer.apply(data_version, classify(writes), writes)
        return replayer.finish()
