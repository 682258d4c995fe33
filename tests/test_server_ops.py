"""The server operator's view: how much the daemon logs, and changing the public address."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from helpers.servers import CldcbServer, run_server_cmd

from cldcb.core.ids import client_id_from_pubkey, pubkey_of
from cldcb.core.session import Role
from cldcb.transport.connection import Connection

CONNECTIONS = 4


def log_of_a_few_connections(tmp_path: Path, *serve_args: str,
                             env: dict[str, str] | None = None) -> list[str]:
    """The daemon's log lines over ``CONNECTIONS`` client sessions, start to stop."""
    srv = CldcbServer(tmp_path / "data", serve_args=list(serve_args),
                      extra_env=env or {}).init()
    priv = os.urandom(32)
    srv.add(client_id_from_pubkey(pubkey_of(priv)))
    srv.start()

    async def sessions() -> None:
        for _ in range(CONNECTIONS):
            async with await Connection.open(srv.spec, priv, Role.READER) as conn:
                await conn.status()

    try:
        asyncio.run(asyncio.wait_for(sessions(), 120))
    finally:
        assert srv.stop() == 0
    return [line for line in srv.log().splitlines() if not line.startswith("listening on")]


def test_serve_log_levels(tmp_path: Path) -> None:
    default = log_of_a_few_connections(tmp_path / "default")
    # the operator's log: cldcb's own lines only, one per session, none of asyncssh's
    assert not [line for line in default if " asyncssh " in line], default
    assert sum(" session from " in line for line in default) == CONNECTIONS
    assert len(default) <= CONNECTIONS + 4, default
    quiet = log_of_a_few_connections(tmp_path / "warning", "--log-level", "warning")
    assert quiet == [], quiet
    by_env = log_of_a_few_connections(tmp_path / "env", env={"CLDCB_SERVER_LOG_LEVEL": "error"})
    assert by_env == [], by_env
    debug = log_of_a_few_connections(tmp_path / "debug", "--log-level", "debug")
    assert sum(" asyncssh " in line for line in debug) >= CONNECTIONS   # for the hard cases
    bad = run_server_cmd(tmp_path / "default" / "data", "serve", "--listen", "127.0.0.1:0",
                         "--log-level", "loud", check=False)
    assert bad.returncode == 2 and "--log-level" in bad.stderr


def test_set_address_changes_the_public_address_not_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_server_cmd(data, "init", "--public-address", "old.example:29735")
    key = (data / "server_key").read_bytes()
    server_id = run_server_cmd(data, "id").stdout.strip()
    done = run_server_cmd(data, "set-address", "new.example:4000")
    assert "old.example:29735" in done.stdout and "new.example:4000" in done.stdout
    assert (data / "server_key").read_bytes() == key
    assert run_server_cmd(data, "id").stdout.strip() == server_id
    client_id = client_id_from_pubkey(pubkey_of(os.urandom(32)))
    added = json.loads(run_server_cmd(data, "add", client_id, "--json").stdout)
    assert added["public_address"] == "new.example:4000"
    bad = run_server_cmd(data, "set-address", "no-port", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --public-address")
    assert json.loads((data / "server.json").read_text())["public_address"] == "new.example:4000"
    cleared = run_server_cmd(data, "set-address", "--clear")
    assert "new.example:4000" in cleared.stdout
    added = json.loads(run_server_cmd(data, "add", client_id, "--json").stdout)
    assert added["public_address"] is None
    uninit = run_server_cmd(tmp_path / "none", "set-address", "a.example:1", check=False)
    assert uninit.returncode == 1 and "cldcb-server init" in uninit.stderr


def test_server_json_commands_report_errors_as_json(tmp_path: Path) -> None:
    client_id = client_id_from_pubkey(pubkey_of(os.urandom(32)))
    for args in (["list", "--json"], ["add", client_id, "--json"],
                 ["set", client_id, "--quota", "1MiB", "--json"]):
        done = run_server_cmd(tmp_path / "not-initialised", *args, check=False)
        assert done.returncode == 1, args
        error = json.loads(done.stdout)
        assert error["ok"] is False and error["exit_code"] == 1
        assert "cldcb-server init" in error["error"] and done.stderr.startswith("error: ")
