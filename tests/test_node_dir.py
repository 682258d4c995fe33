"""Which node a client command is about: ``--lightning-dir`` found as lightningd would,
``--network`` advice, and ``recover`` asking for its server on a terminal (issue 14)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.installkit import CLIENT, PtyRun, client_env, run_cli
from helpers.servers import CldcbServer
from helpers.simrpc import vector


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CldcbServer]:
    srv = CldcbServer(tmp_path_factory.mktemp("node-dir") / "data").init().start()
    yield srv
    srv.stop()


def regtest_node(root: Path) -> Path:
    """A lightning dir with a regtest node's hsm_secret (nothing else)."""
    (root / "regtest").mkdir(parents=True)
    (root / "regtest" / "hsm_secret").write_bytes(bytes.fromhex(vector("plain32")["file_hex"]))
    return root


def run_in(cwd: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLIENT, *args], cwd=cwd, capture_output=True, text=True,
                          env=client_env(home), stdin=subprocess.DEVNULL, timeout=180)


def list_args(daemon: CldcbServer) -> list[str]:
    return ["recover", "--network", "regtest", "--list", "--server", daemon.address,
            "--server-id", daemon.server_id]


NODE_ID = "02a414a5c6be395d730a8b410f680de52b3c5d04ec3ee6ac8a4d4fdc14b2fba6c9"
#: what --list ends with for that node's key on a server holding nothing: the key was read
#: from the folder found and that server was asked
LISTED_NOTHING = f"error: no server holds a backup of node {NODE_ID}"


def listed_nothing(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode == 1 and LISTED_NOTHING in done.stderr


@pytest.mark.parametrize("where", ["lightning dir", "network folder"])
def test_recover_finds_the_node_from_the_current_folder(daemon: CldcbServer, tmp_path: Path,
                                                        where: str) -> None:
    ln = regtest_node(tmp_path / "ln")
    home = tmp_path / "home"
    home.mkdir()
    done = run_in(ln if where == "lightning dir" else ln / "regtest", *list_args(daemon),
                  home=home)
    assert listed_nothing(done), done.stderr
    assert f"using --lightning-dir {ln} (the current folder" in done.stderr


def test_the_default_is_lightningds_own(daemon: CldcbServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    ln = regtest_node(home / ".lightning")
    done = run_in(tmp_path, *list_args(daemon), home=home)
    assert listed_nothing(done), done.stderr
    assert f"using --lightning-dir {ln} (lightningd's default)" in done.stderr


def test_nothing_found_and_no_terminal_names_the_option(daemon: CldcbServer,
                                                        tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = run_in(tmp_path, *list_args(daemon), home=home)
    assert done.returncode != 0
    assert done.stderr.startswith("error: missing --lightning-dir")


def test_a_regtest_node_is_told_about_network(tmp_path: Path) -> None:
    ln = regtest_node(tmp_path / "ln")
    key = tmp_path / "client.key"
    assert run_cli("newclient", str(key)).returncode == 0
    done = run_cli("installplugin", "--lightning-dir", str(ln), "--client-privkey", str(key),
                   "--server", "127.0.0.1:1", "--server-id", "52" + "00" * 32)
    assert done.returncode != 0
    assert "give --network regtest" in done.stderr and "--hsm-secret" not in done.stderr
    assert not (ln / "bitcoin").exists() and sorted(p.name for p in ln.iterdir()) == ["regtest"]


def test_recover_asks_for_the_server_on_a_terminal(daemon: CldcbServer, tmp_path: Path) -> None:
    ln = regtest_node(tmp_path / "ln")
    home = tmp_path / "home"
    home.mkdir()
    term = PtyRun.cli("recover", "--lightning-dir", str(ln), "--network", "regtest", "--list",
                      env=client_env(home))
    term.expect(r"Server address \(HOST:PORT or ssh://USER@HOST\): ")
    term.send(daemon.address + "\n")
    term.expect(r"Its server id \(52…/53…\): ")
    term.send(daemon.server_id + "\n")
    assert term.wait() == 1, term.output
    after = term.output.split("server id")[-1]
    assert f"{daemon.address}: 0 recognition entries" in after and LISTED_NOTHING in after

    refused = run_cli("recover", "--lightning-dir", str(ln), "--network", "regtest",
                      env=client_env(home))
    assert refused.returncode != 0
    assert refused.stderr.startswith("error: missing --server")
    assert not (ln / "regtest" / "lightningd.sqlite3").exists()
