"""What every program answers the way operators expect (issue 14): ``--version`` on each,
``--debug`` anywhere on the line, ``cldcb-plugin --help`` a success."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_cli_keys import CLIENT, SERVER, console_script, run

from cldcb import __version__

PLUGIN = console_script("cldcb-plugin")


@pytest.mark.parametrize("program", [CLIENT, SERVER, PLUGIN])
def test_version(program: str) -> None:
    done = run(program, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{Path(program).name} {__version__}"


def test_plugin_help_is_a_success() -> None:
    done = run(PLUGIN, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: cldcb-plugin [--debug] WRAPPER_PATH" in done.stdout


def test_plugin_without_a_wrapper_is_a_usage_error() -> None:
    done = run(PLUGIN)
    assert done.returncode == 2
    assert "usage: cldcb-plugin [--debug] WRAPPER_PATH" in done.stderr


@pytest.mark.parametrize("where", ["after the command", "at the end"])
def test_debug_anywhere_on_the_line(tmp_path: Path, where: str) -> None:
    absent = str(tmp_path / "absent")
    args = (["nodeid", "--debug", "--hsm-secret", absent] if where == "after the command"
            else ["nodeid", "--hsm-secret", absent, "--debug"])
    done = run(CLIENT, *args)
    assert done.returncode != 0
    assert "Traceback" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("error: ")
    plain = run(CLIENT, "nodeid", "--hsm-secret", absent)
    assert "Traceback" not in plain.stderr and plain.stderr.startswith("error: ")


def test_debug_on_the_server_after_the_command(tmp_path: Path) -> None:
    done = run(SERVER, "--data-dir", str(tmp_path / "none"), "id", "--debug")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "error: no server key" in done.stderr


def test_plugin_debug_shows_the_traceback_of_a_bad_wrapper(tmp_path: Path) -> None:
    wrapper = tmp_path / "cldcb-plugin-wrapper"
    wrapper.write_text("not a wrapper\n")
    # stdin and stdout pipes, as lightningd gives them (else it stops on those first)
    done = subprocess.run([PLUGIN, str(wrapper), "--debug"], capture_output=True, text=True,
                          input="", timeout=60)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "cldcb-plugin: error: " in done.stderr


# --- the forced command names the server program by its absolute path ---------------------

def test_sshkey_names_the_server_program_by_its_absolute_path(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    client_id = run(CLIENT, "newclient", str(key)).stdout.strip()
    server = os.path.abspath(Path(CLIENT).parent / "cldcb-server")
    done = run(CLIENT, "sshkey", "--client-privkey", str(key))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f'restrict,command="{server} stdio --client {client_id}" '
                                  "ssh-ed25519 ")
    assert f"forced command: {server}" in done.stderr and "--server-command" in done.stderr
    given = run(CLIENT, "sshkey", "--client-privkey", str(key), "--server-command",
                "/opt/cldcb/bin/cldcb-server")
    assert given.stdout.startswith('restrict,command="/opt/cldcb/bin/cldcb-server stdio '
                                   f'--client {client_id}" ')


def test_add_reports_the_command_that_runs_this_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run(SERVER, "--data-dir", str(data), "init").returncode == 0
    key = tmp_path / "client.key"
    client_id = run(CLIENT, "newclient", str(key)).stdout.strip()
    done = run(SERVER, "--data-dir", str(data), "add", client_id, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["server_command"] == f"{SERVER} --data-dir {data}"
    # run by a relative path from its own folder: still absolute
    env = {**os.environ, "CLDCB_SERVER_DIR": str(data)}
    relative = subprocess.run(["./cldcb-server", "add", client_id, "--json"],
                              cwd=Path(SERVER).parent, capture_output=True, text=True, env=env,
                              timeout=60)
    assert json.loads(relative.stdout)["server_command"] == f"{SERVER} --data-dir {data}"
