"""``cldcb-server`` commands that manage clients and run the server.

``add``, ``set``, ``remove``, ``list`` manage registered clients (``add`` never
changes a registered client's settings by omission; ``set`` is the operator's
explicit word, never reachable through ``forced``); ``serve`` runs the
standalone asyncssh daemon; ``stdio`` and ``forced`` run under OpenSSH sshd
(see :mod:`cldcb.server.stdio`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import sys
import time

import click

from cldcb.cli.common import json_option, require_protocol_pipes
from cldcb.core.ids import parse_client_id
from cldcb.errors import StoreError, UsageError
from cldcb.server import hostfiles  # noqa: F401  (registers systemd-unit, sshd-config)
from cldcb.server.cli import ServerContext, main, parse_host_port, pass_server
from cldcb.store import ClientInfo, Store
from cldcb.store.settings import Settings

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
          "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
          "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


def parse_size(text: str) -> int:
    """``500MiB``, ``2G``, ``1000000`` → bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _UNITS:
        raise UsageError(f"--quota must be a size like 500MiB, 2GiB or 1000000, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _open_store(server: ServerContext) -> Store:
    server.read_key()  # a clear error when `init` was not run
    return Store.open(server.data_dir)


def add_client(server: ServerContext, client_id: str, as_json: bool, *,
               quota: int | None = None, append_only: bool = False,
               generations: int | None = None) -> None:
    """Register a client. One already registered keeps its settings, except those given
    here (only the operator at the server's shell gives any: ``forced`` never does)."""
    parse_client_id(client_id)
    client_id = client_id.lower()
    _, server_id = server.read_key()
    store = _open_store(server)
    try:
        created = store.register(client_id, Settings(quota=quota or None,
                                                     append_only=append_only,
                                                     generations=generations or 2))
        changed = False
        if not created and (quota is not None or append_only or generations is not None):
            old, new = store.change_settings(client_id, quota=quota,
                                             append_only=append_only or None,
                                             generations=generations, by="add")
            changed = old != new
        info = store.info(client_id)
    finally:
        store.close()
    public = server.public_address()
    host = socket.getfqdn()
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "cldcb"
    if as_json:
        click.echo(json.dumps({
            "client_id": client_id, "server_id": server_id, "public_address": public,
            "ssh": f"ssh://{user}@{host}", "quota": info.quota,
            "append_only": info.append_only, "generations": info.generations,
            "already_registered": not created, "server_command": server.command()}))
        return
    if created:
        click.echo(f"added client {client_id}")
    else:
        click.echo(f"client {client_id} is already registered; "
                   + ("settings changed: " if changed else "settings unchanged: ")
                   + _describe(info))
    click.echo(f"server id: {server_id}")
    if public:
        click.echo(f"reach it at: {public}")


def _describe(info: ClientInfo) -> str:
    return (f"quota {human(info.quota) if info.quota else 'none'}, "
            f"{'append-only' if info.append_only else 'not append-only'}, "
            f"{info.generations} generations kept")


@main.command()
@click.argument("client_id")
@click.option("--quota", default=None, metavar="SIZE",
              help="Most bytes this client may store (e.g. 2GiB); default: no limit.")
@click.option("--append-only", is_flag=True,
              help="Nothing the client sends can delete history (only server-side pruning).")
@click.option("--generations", default=None, type=click.IntRange(1, 1000),
              help="Complete snapshots kept, with their records, for point-in-time recovery "
                   "[default: 2].")
@json_option("Print the result as JSON (an error too).")
@pass_server
def add(server: ServerContext, client_id: str, quota: str | None, append_only: bool,
        generations: int | None, as_json: bool) -> None:
    """Register a client. On a registered one, change only the options given (to lift
    append-only, see `set`)."""
    _setup_logging("cldcb-server: %(levelname)s: %(message)s", logging.WARNING)
    add_client(server, client_id, as_json, quota=parse_size(quota) if quota else None,
               append_only=append_only, generations=generations)


@main.command("set")
@click.argument("client_id")
@click.option("--quota", default=None, metavar="SIZE",
              help="Most bytes this client may store (e.g. 2GiB); 0: no limit.")
@click.option("--append-only/--no-append-only", default=None,
              help="Whether what the client sends may delete history (lifting it is "
                   "logged in the client's settings.history).")
@click.option("--generations", default=None, type=click.IntRange(1, 1000),
              help="Complete snapshots kept, with their records, for point-in-time recovery.")
@json_option("Print the result as JSON (an error too).")
@pass_server
def set_(server: ServerContext, client_id: str, quota: str | None, append_only: bool | None,
         generations: int | None, as_json: bool) -> None:
    """Change a registered client's settings (only those given)."""
    parse_client_id(client_id)
    if quota is None and append_only is None and generations is None:
        raise UsageError("nothing to change: give --quota, --append-only, --no-append-only "
                         "or --generations")
    _setup_logging("cldcb-server: %(levelname)s: %(message)s", logging.WARNING)
    store = _open_store(server)
    try:
        old, new = store.change_settings(client_id, quota=parse_size(quota) if quota else None,
                                         append_only=append_only, generations=generations)
        info = store.info(client_id)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"client_id": info.client_id, "quota": info.quota,
                               "append_only": info.append_only,
                               "generations": info.generations, "changed": old != new}))
    else:
        click.echo(f"client {info.client_id}: "
                   + ("" if old != new else "(unchanged) ") + _describe(info))


@main.command()
@click.argument("client_id")
@pass_server
def remove(server: ServerContext, client_id: str) -> None:
    """Unregister a client; its stored data is kept aside, not deleted."""
    parse_client_id(client_id)
    store = _open_store(server)
    try:
        if not store.is_registered(client_id.lower()):
            raise UsageError(f"client {client_id} is not registered here (see "
                             "`cldcb-server list`)")
        store.remove_client(client_id.lower())
    finally:
        store.close()
    click.echo(f"removed client {client_id.lower()}; its backup data was kept aside in "
               f"{server.data_dir}")


@main.command("list")
@json_option("Print the result as JSON (an error too).")
@pass_server
def list_(server: ServerContext, as_json: bool) -> None:
    """Registered clients: bytes used, newest data_version, last seen."""
    store = _open_store(server)
    try:
        clients = store.list_clients()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([{
            "client_id": c.client_id, "bytes_used": c.bytes_used, "quota": c.quota,
            "append_only": c.append_only, "generations": c.generations,
            "newest_data_version": c.newest_data_version, "last_seen_ms": c.last_seen_ms,
        } for c in clients], indent=1))
        return
    if not clients:
        click.echo("no clients registered (add one with `cldcb-server add CLIENT_ID`)")
        return
    click.echo(f"{'client id':68} {'used':>10} {'quota':>10} {'data_version':>12}  last seen")
    for c in clients:
        seen = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.last_seen_ms / 1000))
                if c.last_seen_ms else "never")
        dv = "-" if c.newest_data_version is None else str(c.newest_data_version)
        click.echo(f"{c.client_id:68} {human(c.bytes_used):>10} {human(c.quota):>10} "
                   f"{dv:>12}  {seen}")


def _setup_logging(fmt: str = "%(asctime)s %(name)s %(levelname)s %(message)s",
                   level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt)


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
_POSITIVE_INT = click.IntRange(min=1)
_POSITIVE_SECONDS = click.FloatRange(min=0, min_open=True)


@main.command()
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Address to listen on, e.g. 0.0.0.0:29735 (port 0: any free port).")
@click.option("--max-connections", type=_POSITIVE_INT, default=None,
              help="Logged-in client connections in all [default: 1000, or "
                   "$CLDCB_SERVER_MAX_CONNECTIONS].")
@click.option("--max-unauthenticated", type=_POSITIVE_INT, default=None,
              help="Connections not logged in as a registered client (anonymous ones "
                   "included); when full, the oldest makes room [default: 100, or "
                   "$CLDCB_SERVER_MAX_UNAUTHENTICATED].")
@click.option("--max-per-source", type=_POSITIVE_INT, default=None,
              help="Unauthenticated connections from one address [default: 10, or "
                   "$CLDCB_SERVER_MAX_PER_SOURCE].")
@click.option("--idle-timeout", type=_POSITIVE_SECONDS, default=None, metavar="SECONDS",
              help="Close a client's connection silent this long [default: 3600, or "
                   "$CLDCB_SERVER_IDLE_TIMEOUT].")
@click.option("--anonymous-idle-timeout", type=_POSITIVE_SECONDS, default=None,
              metavar="SECONDS",
              help="The same before login and for anonymous sessions [default: 60, or "
                   "$CLDCB_SERVER_ANONYMOUS_IDLE_TIMEOUT].")
@click.option("--log-level", type=click.Choice(list(LOG_LEVELS), case_sensitive=False),
              default="info", envvar="CLDCB_SERVER_LOG_LEVEL",
              help="How much goes to the log (stderr): info is cldcb's own lines (one per "
                   "session); debug adds asyncssh's, per connection [default: info, or "
                   "$CLDCB_SERVER_LOG_LEVEL].")
@pass_server
def serve(server: ServerContext, listen: str, log_level: str, **limits: float | None) -> None:
    """Run the standalone SSH daemon (subsystem `cldcb`).

    What strangers can make it hold is bounded by the limits below (and one channel
    per connection, $CLDCB_SERVER_CHANNELS_PER_CONNECTION); the defaults are safe."""
    import dataclasses

    from cldcb.server.admission import Limits
    from cldcb.server.daemon import serve as run

    given = {name: value for name, value in limits.items() if value is not None}
    bounds = dataclasses.replace(Limits.from_env(), **given)
    host, _, port = listen.rpartition(":")
    parse_host_port(f"{host}:{port if port != '0' else 1}", "--listen")
    priv, server_id = server.read_key()
    _open_store(server).close()
    level = LOG_LEVELS[log_level.lower()]
    _setup_logging(level=level)
    # asyncssh's per-connection lines are not the operator's log, except to debug
    logging.getLogger("asyncssh").setLevel(level if level <= logging.DEBUG
                                           else max(level, logging.WARNING))
    logging.getLogger("cldcb.server").info("server id %s", server_id)
    try:
        asyncio.run(run(server.data_dir, priv, host.strip("[]"), int(port), limits=bounds))
    except OSError as exc:
        raise StoreError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


@main.command()
@click.option("--client", "client_id", default=None, metavar="CLIENT_ID",
              help="Pin the session to this client (authorized_keys forced command).")
@pass_server
def stdio(server: ServerContext, client_id: str | None) -> None:
    """Serve one session on stdin/stdout (OpenSSH Subsystem or forced command)."""
    from cldcb.server.stdio import run_stdio

    require_protocol_pipes("cldcb-server stdio",
                           "sshd (a Subsystem line or an authorized_keys forced command)")
    if client_id is not None:
        parse_client_id(client_id)
    priv, _ = server.read_key()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="cldcb-server: %(message)s")
    asyncio.run(run_stdio(server.data_dir, priv, client_id))


@main.command()
@click.option("--allow", required=True, metavar="VERB[,VERB]",
              help="What the SSH key may run; only `add` exists.")
@pass_server
def forced(server: ServerContext, allow: str) -> None:
    """Forced command for setup keys: runs only `cldcb-server add CLIENT_ID [--json]`."""
    from cldcb.server.stdio import FORCED_VERBS, parse_forced_command

    verbs = tuple(v.strip() for v in allow.split(",") if v.strip())
    unknown = [v for v in verbs if v not in FORCED_VERBS]
    if not verbs or unknown:
        raise UsageError(f"--allow takes a list of {', '.join(FORCED_VERBS)}; "
                         f"got {allow!r}")
    client_id, as_json = parse_forced_command(os.environ.get("SSH_ORIGINAL_COMMAND"), verbs)
    add_client(server, client_id, as_json)   # no options: settings never change


if __name__ == "__main__":
    main()
