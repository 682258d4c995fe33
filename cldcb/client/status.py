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

Exit status (:class:`~cldcb.errors.ExitCode`, the README's table): 0 when all
is well; else the code of the most serious problem, in this order: 1 (failure:
the database cannot be read, or, with lightningd stopped, a server holds more
than one data_version beyond the database: the database is older than its
backup and must not be started), 5 (plugin-down: the plugin is not running
while lightningd is), 4 (outage: a server cannot be reached or holds nothing),
3 (lag: a server is behind the database by more than ``--max-lag``
data_versions, default 0). Other errors (no wrapper, ...) exit non-zero with
``error: …``. ``--json`` prints one JSON object with the same facts, a
``problems`` list and the ``exit_code`` (an error too is one JSON object);
``--prometheus FILE`` also writes the facts in Prometheus' text format
(:mod:`cldcb.client.prometheus`), replacing FILE atomically.

The plugin's status file is shown only while the plugin runs: once it does not
(its file says it exited, or its pid is gone), ``status`` says so and when the
file was last written, never the state the plugin last saw as if it were now.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import click

from cldcb.cli_common import echo_json, json_option
from cldcb.client.cli import main
from cldcb.client.nodeconfig import NodePaths
from cldcb.client.prometheus import write_textfile
from cldcb.client.recover import format_time, node_dir_options, route_override_option
from cldcb.connection import Connection, ServerSpec
from cldcb.errors import CldcbError, ExitCode, StatusError
from cldcb.nodedb import connect_ro, read_data_version
from cldcb.plugin.status import read_status_file
from cldcb.plugin.wrapper import WrapperConfig, read_wrapper
from cldcb.proxy import Proxy, parse_optional
from cldcb.restore import pid_alive
from cldcb.rpc import LightningRpc
from cldcb.session import Role

SERVER_TIMEOUT = 15.0
SEVERITY = (ExitCode.FAILURE, ExitCode.PLUGIN_DOWN, ExitCode.OUTAGE, ExitCode.LAG)
"""A status problem's exit code, most serious first: status exits with the first it has."""


def database_data_version(db: Path, timeout: float = 10.0) -> int:
    """``vars.data_version`` of the live database, read-only."""
    if not db.is_file():
        raise StatusError(f"the database {db} does not exist")
    try:
        con = connect_ro(db, timeout=timeout)
        try:
            held = read_data_version(con)
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StatusError(f"cannot read vars.data_version from {db}: {exc}") from None
    if held is None:
        raise StatusError(f"{db} has no vars.data_version: is it lightningd's database?")
    return held


def _pid_alive(pid: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and pid_alive(pid)


def plugin_state(path: Path) -> dict[str, Any]:
    """What the plugin's status file says, and whether the plugin runs."""
    try:
        data = read_status_file(path)
    except FileNotFoundError:
        return {"file": None, "running": False, "why": f"{path} does not exist"}
    except (OSError, ValueError) as exc:
        return {"file": None, "running": False, "why": f"{path} is unreadable ({exc})"}
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
    codes: set[ExitCode] = set()

    def problem(code: ExitCode, text: str) -> None:
        problems.append(text)
        codes.add(code)

    try:
        node_dv: int | None = database_data_version(db)
    except CldcbError as exc:
        node_dv = None
        problem(ExitCode.FAILURE, str(exc))
    running = LightningRpc.for_node(paths.lightning_dir, paths.network).is_running()
    plugin = plugin_state(paths.status_file)
    if running and not plugin["running"]:
        problem(ExitCode.PLUGIN_DOWN,
                f"lightningd is running but the cldcb plugin is not ({plugin['why']}): "
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
            problem(ExitCode.OUTAGE, f"{name}: cannot be reached: {srv.get('error')}")
            continue
        if newest is None:
            problem(ExitCode.OUTAGE, f"{name}: holds nothing for this client yet")
            continue
        if node_dv is None:
            continue
        srv["lag"] = lag = node_dv - newest
        if lag > max_lag:
            problem(ExitCode.LAG, f"{name}: {lag} data_versions behind the database (newest "
                            f"{newest}, database {node_dv}, --max-lag {max_lag})")
        elif lag < -1 and not running:
            problem(ExitCode.FAILURE,
                    f"{name}: holds data_version {newest}, the database only {node_dv}: "
                            "the database is older than its backup; do not start lightningd "
                            "on it (see `cldcb-client recover`)")
    return {"client_id": cfg.client_id, "node_id": cfg.node_id, "database": str(db),
            "database_data_version": node_dv, "lightningd_running": running,
            "plugin_running": plugin["running"], "plugin_why": plugin["why"] or None,
            "plugin_status": plugin["file"],
            "max_lag": max_lag, "servers": servers, "problems": problems,
            "ok": not problems,
            "exit_code": int(next((c for c in SEVERITY if c in codes), ExitCode.OK))}


def _age(ms: int | None, now: float) -> str:
    if not ms:
        return "never"
    secs = max(0.0, now - ms / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= size:
            return f"{secs / size:.1f} {unit} ago"
    return f"{secs:.0f} s ago"


def _known(value: Any, unknown: str = "unknown") -> str:
    """``value`` for a person: ``unknown`` (never "None") when it is not known."""
    return unknown if value is None else str(value)


def _plugin_line(report: dict[str, Any], now: float) -> str:
    pf = report["plugin_status"] or {}
    written = pf.get("written_at")
    when = (f"status last written {_age(int(written * 1000), now)}"
            if isinstance(written, int | float) else "")
    if report["plugin_running"]:
        return f"plugin running (pid {pf.get('pid')}" + (f", {when})" if when else ")")
    why = report.get("plugin_why") or ""
    return "plugin not running" + (f" ({why}" + (f"; {when})" if when else ")")
                                   if why or when else "")


def _print(report: dict[str, Any]) -> None:
    now = time.time()
    click.echo(f"node {report['node_id']}, client {report['client_id'][:14]}…")
    click.echo(f"database {report['database']}: data_version "
               f"{_known(report['database_data_version'], 'unknown (it cannot be read)')}")
    click.echo(f"lightningd {'running' if report['lightningd_running'] else 'not running'}; "
               + _plugin_line(report, now))
    for srv in report["servers"]:
        route = f", {srv['route']}" if srv.get("route", "direct") != "direct" else ""
        head = f"server {srv['address']} ({srv['server_id'][:14]}…{route}): "
        if not srv["reachable"]:
            click.echo(head + "UNREACHABLE")
            continue
        if srv["newest_data_version"] is None:
            text = head + "holds nothing yet"
        else:
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
        if ps and report["plugin_running"]:     # a stopped plugin's view is not now
            click.echo(f"    plugin says: {ps.get('state')}, last ack "
                       f"{_known(ps.get('last_acked_data_version'), 'none yet')}"
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
@json_option()
@click.option("--prometheus", "prometheus", type=click.Path(path_type=Path, dir_okay=False),
              default=None, metavar="FILE",
              help="Also write the state in Prometheus' text format to FILE (replaced "
                   "atomically), e.g. for node_exporter's textfile collector.")
@route_override_option
@click.pass_context
def status(ctx: click.Context, lightning_dir: Path, network: str, max_lag: int,
           as_json: bool, prometheus: Path | None, proxy: str | None) -> None:
    """Show what every server holds against the node's database; exit non-zero on a problem.

    Exit 3: a server lags by more than --max-lag; 4: a server is unreachable or
    holds nothing; 5: the plugin is not running while lightningd is; 1: the
    database cannot be read or is older than its backup (see the README's exit codes).
    """
    try:
        report = gather(NodePaths(lightning_dir, network), max_lag, parse_optional(proxy))
    except CldcbError as exc:
        if prometheus is not None:
            write_textfile(prometheus, None, error_code=exc.exit_code)
        raise
    if prometheus is not None:
        write_textfile(prometheus, report)
    if as_json:
        echo_json(report)
    else:
        _print(report)
    ctx.exit(report["exit_code"])
