"""``cldcb-client status``: is every change of the node on every server? For cron and monitors.

What it looks at, all read-only:

- the wrapper (``<lightning-dir>/<network>/cldcb-plugin-wrapper``): the client
  key, the servers, the database's path;
- the node's database: its ``vars.data_version`` (read first, so that a server
  can only look ahead of it, never falsely behind, while lightningd runs);
- lightningd's RPC socket (is lightningd running?) and the plugin's status file
  ``cldcb-status.json`` (is the plugin running: the file says so and its pid
  exists; what it says of each server);
- each server, asked as the client (a READER session: it never disturbs the
  plugin's writing session): its newest data_version and when it received it,
  its newest complete snapshot and its age, bytes used and quota.

Exit status: 0 when all is well; 1 when there is a problem (DESIGN section 10):
a server cannot be reached or holds nothing, a server is behind the
database by more than ``--max-lag`` data_versions (default 0), the plugin is
not running while lightningd is, or, with lightningd stopped, a server holds
more than one data_version beyond the database (the database is older than
its backup: it must not be started); other errors (no wrapper, ...) exit
non-zero with ``error: …``. ``--json`` prints one JSON object with the same
facts and a ``problems`` list.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import click

from cldcb.client.cli import main
from cldcb.client.nodeconfig import NodePaths
from cldcb.client.recover import format_time, node_dir_options
from cldcb.connection import Connection, ServerSpec
from cldcb.errors import CldcbError
from cldcb.plugin.status import read_status_file
from cldcb.plugin.wrapper import WrapperConfig, read_wrapper
from cldcb.proxy import Proxy, parse_optional
from cldcb.restore import pid_alive
from cldcb.rpc import LightningRpc
from cldcb.session import Role

SERVER_TIMEOUT = 15.0


def database_data_version(db: Path, timeout: float = 10.0) -> int:
    """``vars.data_version`` of the live database, read-only."""
    if not db.is_file():
        raise CldcbError(f"the database {db} does not exist")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
        try:
            row = con.execute("SELECT intval FROM vars WHERE name = 'data_version'").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise CldcbError(f"cannot read vars.data_version from {db}: {exc}") from None
    if row is None:
        raise CldcbError(f"{db} has no vars.data_version: is it lightningd's database?")
    return int(row[0])


def _pid_alive(pid: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and pid_alive(pid)


def plugin_state(path: Path) -> dict[str, Any]:
    """What the plugin's status file says, and whether the plugin runs."""
    try:
        data = read_status_file(path)
    except FileNotFoundError:
        return {"file": None, "running": False, "why": f"{path.name} does not exist"}
    except (OSError, ValueError) as exc:
        return {"file": None, "running": False, "why": f"{path.name} is unreadable ({exc})"}
    running = bool(data.get("running")) and _pid_alive(data.get("pid"))
    why = "" if running else (f"its pid {data.get('pid')} is gone" if data.get("running")
                              else "it says the plugin exited")
    return {"file": data, "running": running, "why": why}


async def _ask(spec: ServerSpec, cfg: WrapperConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"address": str(spec.address), "server_id": spec.server_id,
                           "route": spec.describe_route(), "reachable": False}
    try:
        async with await Connection.open(spec, cfg.client_priv, Role.READER,
                                         timeout=spec.timeout(SERVER_TIMEOUT)) as conn:
            st = await conn.status()
    except CldcbError as exc:
        out["error"] = str(exc)
        return out
    newest = (st.tip_data_version if st.has_tip
              else st.snapshot_data_version if st.snapshot_data_version >= 0 else None)
    out.update(reachable=True, newest_data_version=newest,
               newest_received_ms=st.tip_time if st.has_tip else None,
               snapshot_data_version=(st.snapshot_data_version
                                      if st.snapshot_data_version >= 0 else None),
               snapshot_ms=st.snapshot_time if st.snapshot_data_version >= 0 else None,
               bytes_used=st.bytes_used, quota=st.quota or None,
               append_only=st.append_only, wants_snapshot=st.want_snapshot)
    return out


async def _ask_all(cfg: WrapperConfig, proxy: Proxy | None) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(_ask(s, cfg) for s in cfg.specs(proxy))))


def gather(paths: NodePaths, max_lag: int, proxy: Proxy | None = None) -> dict[str, Any]:
    """Every fact ``status`` reports, and the list of problems."""
    cfg = read_wrapper(paths.wrapper)
    db = cfg.database_path(paths.network_dir)
    problems: list[str] = []
    try:
        node_dv: int | None = database_data_version(db)
    except CldcbError as exc:
        node_dv = None
        problems.append(str(exc))
    running = LightningRpc.for_node(paths.lightning_dir, paths.network).is_running()
    plugin = plugin_state(paths.status_file)
    if running and not plugin["running"]:
        problems.append(f"lightningd is running but the cldcb plugin is not ({plugin['why']}): "
                        "changes may be committed that no server holds; restart lightningd "
                        "(its important-plugin line makes it start the plugin)")
    servers = asyncio.run(_ask_all(cfg, proxy))
    plugin_servers = {s.get("server_id"): s for s in
                      ((plugin["file"] or {}).get("servers") or []) if isinstance(s, dict)}
    for srv in servers:
        name = srv["address"]
        srv["plugin"] = plugin_servers.get(srv["server_id"])
        newest = srv.get("newest_data_version")
        if not srv["reachable"]:
            problems.append(f"{name}: cannot be reached: {srv.get('error')}")
            continue
        if newest is None:
            problems.append(f"{name}: holds nothing for this client yet")
            continue
        if node_dv is None:
            continue
        srv["lag"] = lag = node_dv - newest
        if lag > max_lag:
            problems.append(f"{name}: {lag} data_versions behind the database (newest "
                            f"{newest}, database {node_dv}, --max-lag {max_lag})")
        elif lag < -1 and not running:
            problems.append(f"{name}: holds data_version {newest}, the database only {node_dv}: "
                            "the database is older than its backup; do not start lightningd "
                            "on it (see `cldcb-client recover`)")
    return {"client_id": cfg.client_id, "node_id": cfg.node_id, "database": str(db),
            "database_data_version": node_dv, "lightningd_running": running,
            "plugin_running": plugin["running"], "plugin_status": plugin["file"],
            "max_lag": max_lag, "servers": servers, "problems": problems,
            "ok": not problems}


def _age(ms: int | None, now: float) -> str:
    if not ms:
        return "never"
    secs = max(0.0, now - ms / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= size:
            return f"{secs / size:.1f} {unit} ago"
    return f"{secs:.0f} s ago"


def _print(report: dict[str, Any]) -> None:
    now = time.time()
    pf = report["plugin_status"] or {}
    click.echo(f"node {report['node_id']}, client {report['client_id'][:14]}…")
    click.echo(f"database {report['database']}: data_version "
               f"{report['database_data_version']}")
    click.echo(f"lightningd {'running' if report['lightningd_running'] else 'not running'}; "
               f"plugin {'running' if report['plugin_running'] else 'not running'}"
               + (f" (pid {pf.get('pid')}, status written "
                  f"{_age(int(pf['written_at'] * 1000), now)})"
                  if isinstance(pf.get("written_at"), int | float) else ""))
    for srv in report["servers"]:
        route = f", {srv['route']}" if srv.get("route", "direct") != "direct" else ""
        head = f"server {srv['address']} ({srv['server_id'][:14]}…{route}): "
        if not srv["reachable"]:
            click.echo(head + "UNREACHABLE")
            continue
        text = (head + f"newest data_version {srv['newest_data_version']}"
                + (f" (lag {srv['lag']})" if "lag" in srv else "")
                + f", received {_age(srv['newest_received_ms'], now)}")
        if srv["snapshot_data_version"] is not None:
            text += (f"; snapshot at {srv['snapshot_data_version']} "
                     f"({format_time(srv['snapshot_ms'])}, {_age(srv['snapshot_ms'], now)})")
        text += f"; {srv['bytes_used'] / (1 << 20):.1f} MiB used"
        if srv["quota"]:
            text += f" of {srv['quota'] / (1 << 20):.0f}"
        click.echo(text)
        ps = srv.get("plugin")
        if ps:
            click.echo(f"    plugin says: {ps.get('state')}, last ack "
                       f"{ps.get('last_acked_data_version')}"
                       + (f", last error: {ps['last_error']}" if ps.get("last_error") else ""))
    if report["problems"]:
        click.echo("PROBLEMS:")
        for p in report["problems"]:
            click.echo(f"  - {p}")
    else:
        click.echo("OK: every server holds the database's newest change")


@main.command()
@node_dir_options
@click.option("--max-lag", type=click.IntRange(min=0), default=0, show_default=True,
              help="How many data_versions a server may be behind the database.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--proxy", default=None, metavar="socks5://HOST:PORT",
              help="Reach every server through this SOCKS5 proxy [default: the route the "
                   "wrapper records for each].")
@click.pass_context
def status(ctx: click.Context, lightning_dir: Path, network: str, max_lag: int,
           as_json: bool, proxy: str | None) -> None:
    """Show what every server holds against the node's database; exit 1 on a problem.

    A problem: a server unreachable or behind by more than --max-lag, or the
    plugin not running while lightningd is.
    """
    report = gather(NodePaths(lightning_dir, network), max_lag, parse_optional(proxy))
    if as_json:
        click.echo(json.dumps(report, indent=1, default=str))
    else:
        _print(report)
    if report["problems"]:
        ctx.exit(1)
