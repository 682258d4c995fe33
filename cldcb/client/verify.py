"""``cldcb-client verify``: a restore drill against the live database.

1. Read the wrapper (client key, servers, database path) and open the node key
   (``--hsm-secret`` / ``--passphrase-file`` / ``--alt-hsmd``, as ``recover``);
   it must be the wrapper's node.
2. Take a consistent copy of the live database with SQLite's backup API
   (read-only, in one step, so the copy is one committed state even while
   lightningd writes), bounded: if lightningd holds an exclusive lock for longer
   than ``COPY_TIMEOUT`` (a large transaction spilled its cache), stop with an
   error rather than wait forever. Its ``vars.data_version`` is D.
3. From every server, rebuild the backup at exactly D (``Fetch(D)``: the newest
   snapshot at or before D and the records up to D), verifying everything as
   recovery does (:mod:`cldcb.restore`).
4. Compare each rebuilt database with the copy: the ``sqlite3`` program's
   ``.dump`` of both when it is installed (what the tests compare, byte for
   byte), else Python's ``Connection.iterdump()`` (the same idea, a logical
   dump in a fixed order: schema, then each table's rows in rowid order).
   Both are streamed line by line, so memory stays bounded. A difference is
   reported by the dump line number and the table it is in, never by values.

Scratch files live in a temporary folder inside ``<lightning-dir>/<network>``
(the node's own folder, so the copies of the database, which hold secrets,
stay as private as the database itself and on a disk with room for it); it is
removed at the end. Exit status: 0 when every server's backup equals the live
database, 1 when one differs or fails. ``--json`` prints one JSON object instead
(``ok``, ``exit_code``, ``database``, ``data_version``, ``compare``, and per server
``address``, ``server_id``, ``result``: identical, differs or failed, and ``detail``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from cldcb import restore
from cldcb.cli_common import echo_json, json_option
from cldcb.client.cli import main
from cldcb.client.nodeconfig import NodePaths
from cldcb.client.progress import ProgressPrinter
from cldcb.client.recover import (
    node_dir_options,
    node_key_options,
    open_node_key,
    route_override_option,
)
from cldcb.connection import Connection
from cldcb.errors import (
    CldcbError,
    DatabaseBusy,
    ExitCode,
    PluginError,
    RecoveryError,
    VerifyError,
)
from cldcb.ids import parse_client_id
from cldcb.nodedb import connect_ro
from cldcb.nodekey import NodeKey
from cldcb.plugin.snapshot import copy_database
from cldcb.plugin.wrapper import WrapperConfig, read_wrapper
from cldcb.proxy import Proxy, parse_optional
from cldcb.session import Role

COPY_TIMEOUT = 30.0
_TABLE = re.compile(rb'^(?:INSERT INTO|CREATE TABLE|CREATE INDEX \S+ ON|CREATE UNIQUE INDEX '
                    rb'\S+ ON|DELETE FROM)\s+("(?:[^"]|"")+"|\'[^\']+\'|[\w$]+)')


def copy_live(db: Path, out: Path, timeout: float = COPY_TIMEOUT) -> int:
    """A consistent copy of ``db`` at ``out`` (the plugin's snapshot copy: read-only,
    bounded when lightningd holds the database locked); its data_version."""
    if not db.is_file():
        raise VerifyError(f"the database {db} does not exist: nothing to verify")
    try:
        copy = copy_database(db, out.parent, busy_timeout=timeout)
    except DatabaseBusy:
        raise VerifyError(f"{db} stayed locked for {timeout:.0f} s (lightningd is committing a "
                          "large transaction): run verify again in a moment") from None
    except (sqlite3.Error, PluginError) as exc:
        raise VerifyError(f"cannot copy {db}: {exc}") from None
    os.replace(copy.path, out)
    return copy.data_version


def _dump_lines(db: Path, work: Path) -> Iterator[bytes]:
    program = shutil.which("sqlite3")
    if program is None:
        con = connect_ro(db)
        try:
            for line in con.iterdump():
                yield line.encode("utf-8", "surrogateescape") + b"\n"
        finally:
            con.close()
        return
    out = work / f"{db.name}.dump"
    with open(out, "wb") as f:
        done = subprocess.run([program, str(db), ".dump"], stdout=f, stderr=subprocess.PIPE,
                              check=False, timeout=3600)
    if done.returncode != 0:
        raise VerifyError(f"sqlite3 .dump of {db.name} failed: "
                         f"{done.stderr.decode('utf-8', 'replace').strip()}")
    try:
        with open(out, "rb") as f:
            yield from f
    finally:
        out.unlink(missing_ok=True)


def compare_method() -> str:
    return "sqlite3 .dump" if shutil.which("sqlite3") else "Python iterdump"


def _table_of(line: bytes | None) -> bytes:
    m = _TABLE.match(line or b"")
    return m.group(1).strip(b"\"'") if m else b""


def compare(live: Path, rebuilt: Path, work: Path) -> str | None:
    """None if the two databases dump identically, else where they first differ.

    The table named is the one both differing lines belong to, else the one the
    dumps were in when they parted (a row only one side has).
    """
    context = b""
    for number, (a, b) in enumerate(itertools.zip_longest(_dump_lines(live, work),
                                                          _dump_lines(rebuilt, work)), 1):
        if a == b:
            context = _table_of(a) or context
            continue
        table = _table_of(a) if _table_of(a) == _table_of(b) and _table_of(a) else context
        where = f" (table {table.decode('utf-8', 'replace')})" if table else ""
        if a is None or b is None:
            short = "the live database" if a is None else "the backup"
            return f"{short} ends early: the dumps differ from line {number}{where}"
        return f"the dumps differ from line {number}{where}"
    return None


Outcome = dict[str, str | None]
"""One server's: ``address``, ``server_id``, ``result`` (identical, differs, failed),
``detail`` (where the dumps differ, why it failed; None when identical)."""


async def _drill(cfg: WrapperConfig, node: NodeKey, live: Path, data_version: int,
                 work: Path, proxy: Proxy | None = None) -> list[Outcome]:
    results: list[Outcome] = []
    client_pub = parse_client_id(cfg.client_id)
    for n, spec in enumerate(cfg.specs(proxy)):
        name = str(spec.address)
        out = work / f"server-{n}.sqlite3"
        printer = ProgressPrinter(name)
        outcome: Outcome = {"address": name, "server_id": spec.server_id}
        try:
            async with await Connection.open(spec, cfg.client_priv, Role.READER) as conn:
                await restore.rebuild(conn, node, client_pub, out, at=data_version,
                                      source=name, progress=printer.progress)
            printer.done()
            diff = compare(live, out, work)
            outcome.update(result="identical" if diff is None else "differs", detail=diff)
        except CldcbError as exc:
            printer.done()
            outcome.update(result="failed", detail=str(exc))
        finally:
            restore.discard(out)
        results.append(outcome)
    return results


@main.command()
@node_dir_options
@node_key_options
@json_option()
@route_override_option
@click.pass_context
def verify(ctx: click.Context, lightning_dir: Path, network: str, hsm_secret: Path | None,
           passphrase_file: Path | None, alt_hsmd: Path | None, as_json: bool,
           proxy: str | None) -> None:
    """Restore drill: rebuild the backup at the live database's data_version and compare.

    Exits 1 when a server's backup differs from the live database or cannot be
    rebuilt.
    """
    paths = NodePaths(lightning_dir, network)
    cfg = read_wrapper(paths.wrapper)
    db = cfg.database_path(paths.network_dir)
    with open_node_key(lightning_dir, network, hsm_secret, passphrase_file, alt_hsmd) as node:
        if node.node_id != cfg.node_id:
            raise RecoveryError(f"the node key is node {node.node_id}, but the wrapper backs "
                                f"up node {cfg.node_id}: give this node's hsm_secret")
        work = Path(tempfile.mkdtemp(prefix=".cldcb-verify-", dir=paths.network_dir))
        try:
            live = work / "live.sqlite3"
            data_version = copy_live(db, live)
            if not as_json:
                click.echo(f"live database {db}: data_version {data_version} (consistent "
                           f"copy); comparing with {compare_method()}")
            results = asyncio.run(_drill(cfg, node, live, data_version, work,
                                         parse_optional(proxy)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(r["result"] == "identical" for r in results)
    code = ExitCode.OK if ok else ExitCode.FAILURE
    if as_json:
        echo_json({"ok": ok, "exit_code": int(code), "database": str(db),
                   "data_version": data_version, "compare": compare_method(),
                   "servers": results})
        ctx.exit(code)
    for r in results:
        click.echo(f"server {r['address']}: " + (
            f"backup at data_version {data_version} is IDENTICAL to the live database"
            if r["result"] == "identical" else f"{str(r['result']).upper()}: {r['detail']}"))
    ctx.exit(code)
