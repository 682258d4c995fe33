"""``cldcb-client installplugin`` / ``uninstallplugin`` / ``sshkey`` against real servers.

A running node is :class:`simrpc.SimRpcNode` (a simulated lightningd RPC socket
that really launches the wrapper and feeds it db_write calls from a real
trace); a stopped node is a folder with an ``hsm_secret`` of every format
Core Lightning writes. The server is a real ``cldcb-server serve``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.installkit import (
    PtyRun,
    client_env,
    file_leaks,
    process_leaks,
    run_cli,
    scanned_pids,
    secret_forms,
    text_leaks,
)
from helpers.servers import CldcbServer
from helpers.simlightningd import SimLightningd
from helpers.simrpc import SimRpcNode, vector
from helpers.traces import load_trace

from cldcb.client.nodeconfig import (
    NodePaths,
    add_important_plugin,
    has_important_plugin,
    remove_important_plugin,
)
from cldcb.core import hsm_secret, wire
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.recognition import find_own, make_recognition, message_for_client
from cldcb.core.session import Role
from cldcb.node.keyfile import read_client_key
from cldcb.node.nodekey import LocalNodeKey
from cldcb.plugin.wrapper import WRAPPER_NAME, read_wrapper
from cldcb.transport.connection import Connection, ServerSpec

DOUBLE = Path(__file__).parent / "hsmd_double.py"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CldcbServer]:
    srv = CldcbServer(tmp_path_factory.mktemp("install-daemon") / "data").init().start()
    yield srv
    srv.stop()


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _status(spec: ServerSpec, priv: bytes) -> wire.Status:
    async with await Connection.open(spec, priv, Role.READER) as conn:
        return await conn.status()


async def _entries(spec: ServerSpec) -> list[bytes]:
    async with await Connection.open(spec, None) as conn:
        return await conn.list_recognitions()


async def _put(spec: ServerSpec, priv: bytes, entry: bytes) -> None:
    async with await Connection.open(spec, priv, Role.READER) as conn:
        await conn.put_recognition(entry)


def new_client(tmp_path: Path, daemon: CldcbServer, name: str = "client.key",
               ) -> tuple[Path, bytes, str]:
    key = tmp_path / name
    made = run_cli("newclient", str(key))
    assert made.returncode == 0, made.stderr
    priv, cid = read_client_key(key)
    daemon.add(cid)
    return key, priv, cid


def other_nodes_entries(daemon: CldcbServer, count: int = 2) -> None:
    """Recognition entries of other nodes' clients, and a malformed one (one entry per
    client: the server keeps each client's newest). The server refuses a malformed
    entry on put, so that one is written into its data directory, as an older server
    version may have kept it."""
    for _ in range(count):
        node = LocalNodeKey(new_privkey())
        priv = new_privkey()
        daemon.add(client_id_from_pubkey(pubkey_of(priv)))
        zbase = node.sign_message(message_for_client(priv, node.pubkey)).zbase
        run(_put(daemon.spec, priv, make_recognition(priv, node.pubkey, zbase,
                                                     new_privkey()).encode()))
    junk_id = client_id_from_pubkey(pubkey_of(new_privkey()))
    daemon.add(junk_id)
    (daemon.data_dir / "recognitions" / f"{junk_id}.entry").write_bytes(b"\x01not an entry")


def install_args(ln: Path, key: Path, daemon: CldcbServer, *extra: str) -> list[str]:
    return ["installplugin", "--lightning-dir", str(ln), "--network", "regtest",
            "--client-privkey", str(key), "--server", daemon.address,
            "--server-id", daemon.server_id, "--wait", "60", *extra]


def config_lines(ln: Path) -> list[str]:
    return [x for x in (ln / "regtest" / "config").read_text().splitlines()
            if x.startswith("important-plugin=")]


def wait_tip(spec: ServerSpec, priv: bytes, data_version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = run(_status(spec, priv))
        if st.has_tip and st.tip_data_version >= data_version:
            return
        assert time.monotonic() < deadline, f"server tip {st.tip_data_version} < {data_version}"
        time.sleep(0.2)


def node_secret(name: str) -> bytes:
    v = vector(name)
    return hsm_secret.node_key(bytes.fromhex(v["file_hex"]), v["passphrase"])


# --- a running node --------------------------------------------------------------------

def test_installplugin_on_a_running_node(daemon: CldcbServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = client_env(home)
    other_nodes_entries(daemon)
    key, priv, cid = new_client(tmp_path, daemon)
    ln = tmp_path / "ln"
    with SimRpcNode(ln) as node:
        (node.network_dir / "config").write_text("# the operator's own settings\nalias=SIM\n")
        done = run_cli(*install_args(ln, key, daemon), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "lightningd is running" in out and "plugin start" in out
        assert "holds the first snapshot" in out and "the backup is running" in out
        assert "may be deleted" in out
        assert node.methods[:3] == ["getinfo", "listconfigs", "signmessage"]

        # the plugin runs; the wrapper is 0700, owned by the folder's owner
        pid = node.plugin_pid
        assert pid is not None
        wrapper = node.network_dir / WRAPPER_NAME
        st = wrapper.stat()
        assert st.st_mode & 0o777 == 0o700
        assert st.st_uid == node.network_dir.stat().st_uid
        cfg = read_wrapper(wrapper)
        assert (cfg.client_id, cfg.node_id) == (cid, node.node_key.node_id)
        assert cfg.client_priv == priv and cfg.database == "lightningd.sqlite3"
        assert [(s.address, s.server_id) for s in cfg.servers] == [(daemon.address,
                                                                     daemon.server_id)]
        assert config_lines(ln) == [f"important-plugin={wrapper}"]
        assert "alias=SIM" in (node.network_dir / "config").read_text()

        # the first snapshot is on the server, and the node key finds its entry among others
        status = run(_status(daemon.spec, priv))
        assert status.snapshot_data_version >= 0
        entries = run(_entries(daemon.spec))
        assert len(entries) >= 4
        found = find_own(entries, node.node_key)
        assert [(e.client_pub, p) for e, p in found] == [(pubkey_of(priv), priv)]

        # the backup goes on, and nothing secret is in any process, log or other file
        data_version = node.feed(25)
        wait_tip(daemon.spec, priv, data_version)
        forms = secret_forms(priv, node_secret("plain32"))
        assert pid in scanned_pids()
        assert process_leaks(forms) == []
        assert file_leaks([tmp_path, daemon.data_dir], forms, allowed=[wrapper, key]) == []
        assert text_leaks({"stdout": done.stdout, "stderr": done.stderr,
                           "server log": daemon.log(),
                           "plugin log": "\n".join(node.sim.log_messages())}, forms) == []

        # twice: still one config line, the same plugin goes on
        again = run_cli(*install_args(ln, key, daemon), env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already running with this configuration" in again.stdout
        assert config_lines(ln) == [f"important-plugin={wrapper}"]
        assert node.plugin_pid == pid

        # the key file may go: the wrapper holds the key
        key.unlink()
        data_version = node.feed(10)
        wait_tip(daemon.spec, priv, data_version)

        # uninstall: asks first, then stops the plugin, removes the line and the wrapper
        refused = run_cli("uninstallplugin", "--lightning-dir", str(ln), "--network",
                          "regtest", env=env)
        assert refused.returncode != 0 and "--yes" in refused.stderr
        assert wrapper.exists() and node.plugin_pid == pid
        removed = run_cli("uninstallplugin", "--lightning-dir", str(ln), "--network",
                          "regtest", "--yes", env=env)
        assert removed.returncode == 0, removed.stderr
        assert "no backup holds" in removed.stdout
        assert not wrapper.exists() and config_lines(ln) == []
        assert "alias=SIM" in (node.network_dir / "config").read_text()
        assert node.plugin_pid is None


def test_a_custom_sqlite_wallet_is_backed_up_and_postgres_is_refused(
        daemon: CldcbServer, tmp_path: Path) -> None:
    key, priv, _ = new_client(tmp_path, daemon)
    ln = tmp_path / "ln"
    db = ln / "elsewhere" / "wallet.sqlite3"
    db.parent.mkdir(parents=True)
    with SimRpcNode(ln, wallet=f"sqlite3://{db}:/backup/copy.sqlite3", db_name=str(db),
                    preplay=40) as node:
        done = run_cli(*install_args(ln, key, daemon))
        assert done.returncode == 0, done.stdout + done.stderr
        assert read_wrapper(node.network_dir / WRAPPER_NAME).database == str(db)
        assert run(_status(daemon.spec, priv)).snapshot_data_version >= 0

    ln2 = tmp_path / "ln2"
    with SimRpcNode(ln2, wallet="postgres://ln:hunter2@db.example/lightning",
                    preplay=3) as node:
        refused = run_cli(*install_args(ln2, key, daemon))
        assert refused.returncode != 0
        assert "PostgreSQL" in refused.stderr and "hunter2" not in refused.stderr
        assert not (node.network_dir / WRAPPER_NAME).exists()
        assert not (node.network_dir / "config").exists()
        assert node.plugin_pid is None


def test_a_plugin_that_cannot_start_is_not_made_important(daemon: CldcbServer,
                                                          tmp_path: Path) -> None:
    key, _, _ = new_client(tmp_path, daemon)
    ln = tmp_path / "ln"
    with SimRpcNode(ln, preplay=3, broken_plugin=True) as node:
        failed = run_cli(*install_args(ln, key, daemon))
        assert failed.returncode != 0
        assert "exited before replying to getmanifest" in failed.stderr
        assert "not added to lightningd's config" in failed.stderr
        assert (node.network_dir / WRAPPER_NAME).exists()
        assert not (node.network_dir / "config").exists()


# --- a stopped node ---------------------------------------------------------------------

def stopped_node(tmp_path: Path, name: str) -> Path:
    ln = tmp_path / "ln"
    (ln / "regtest").mkdir(parents=True)
    (ln / "regtest" / "hsm_secret").write_bytes(bytes.fromhex(vector(name)["file_hex"]))
    return ln


@pytest.mark.parametrize("how", ["file", "pty"])
@pytest.mark.parametrize("name", ["plain32", "enc73", "mn_nopass", "mn_pass"])
def test_installplugin_on_a_stopped_node(daemon: CldcbServer, tmp_path: Path, name: str,
                                         how: str) -> None:
    v = vector(name)
    ln = stopped_node(tmp_path, name)
    key, priv, cid = new_client(tmp_path, daemon)
    args = install_args(ln, key, daemon)
    home = tmp_path / "home"
    home.mkdir()
    if how == "file":
        if v["passphrase"]:
            pass_file = tmp_path / "passphrase"
            pass_file.write_text(v["passphrase"] + "\n")
            args += ["--passphrase-file", str(pass_file)]
        done = run_cli(*args, env=client_env(home))
        assert done.returncode == 0, done.stdout + done.stderr
        output = done.stdout + done.stderr
    else:
        term = PtyRun.cli(*args, env=client_env(home))
        if v["passphrase"]:
            term.expect(r"Passphrase for hsm_secret .*: ")
            term.send(v["passphrase"] + "\n")
        assert term.wait() == 0, term.output
        output = term.output
    assert "its next start begins the backup" in output
    if v["passphrase"]:
        assert v["passphrase"] not in output
    cfg = read_wrapper(ln / "regtest" / WRAPPER_NAME)
    assert (cfg.client_id, cfg.node_id, cfg.client_priv) == (cid, v["node_id"], priv)
    assert config_lines(ln) == [f"important-plugin={ln / 'regtest' / WRAPPER_NAME}"]
    node = LocalNodeKey(node_secret(name))  # (earlier tests installed clients of it too)
    assert priv in [p for _, p in find_own(run(_entries(daemon.spec)), node)]


def test_the_next_start_of_a_stopped_node_begins_the_backup(daemon: CldcbServer,
                                                            tmp_path: Path) -> None:
    """Also: the wrapper and a new config belong to the owner of the node's folder."""
    ln = stopped_node(tmp_path, "plain32")
    net = ln / "regtest"
    if os.geteuid() == 0:
        os.chown(net, 4242, 4242)
    key, priv, _ = new_client(tmp_path, daemon)
    done = run_cli(*install_args(ln, key, daemon, "--outage-limit", "30", "--quorum", "1"))
    assert done.returncode == 0, done.stdout + done.stderr
    wrapper = net / WRAPPER_NAME
    if os.geteuid() == 0:
        assert (wrapper.stat().st_uid, (net / "config").stat().st_uid) == (4242, 4242)
    cfg = read_wrapper(wrapper)
    assert (cfg.quorum, cfg.outage_limit) == (1, 30)
    sim = SimLightningd(ln, wrapper, network="regtest").start()
    try:
        sim.run_trace(load_trace("cln-workload"), stop=40)
        committed = sim.committed_data_version()
    finally:
        sim.close()
    status = run(_status(daemon.spec, priv))
    assert status.snapshot_data_version >= 0 and status.tip_data_version == committed


def test_installplugin_with_alt_hsmd(daemon: CldcbServer, tmp_path: Path) -> None:
    ln = stopped_node(tmp_path, "mn_pass")
    program = tmp_path / "hsmd"
    program.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                       f"{shlex.quote(str(DOUBLE))} \"$@\"\n")
    program.chmod(0o755)
    pass_file = tmp_path / "passphrase"
    pass_file.write_text(vector("mn_pass")["passphrase"])
    key, priv, _ = new_client(tmp_path, daemon)
    done = run_cli(*install_args(ln, key, daemon, "--alt-hsmd", str(program),
                                 "--passphrase-file", str(pass_file)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--alt-hsmd" in done.stdout
    assert read_wrapper(ln / "regtest" / WRAPPER_NAME).node_id == vector("mn_pass")["node_id"]
    node = LocalNodeKey(node_secret("mn_pass"))
    assert priv in [p for _, p in find_own(run(_entries(daemon.spec)), node)]


def test_missing_values_are_asked_on_a_terminal_or_named(daemon: CldcbServer,
                                                        tmp_path: Path) -> None:
    ln = stopped_node(tmp_path, "plain32")
    key, _, cid = new_client(tmp_path, daemon)
    base = ["installplugin", "--lightning-dir", str(ln), "--network", "regtest"]
    missing = run_cli(*base)
    assert missing.returncode == 2 and "missing --client-privkey" in missing.stderr
    missing = run_cli(*base, "--client-privkey", str(key))
    assert missing.returncode == 2 and "missing --server" in missing.stderr
    assert not (ln / "regtest" / WRAPPER_NAME).exists()

    term = PtyRun.cli("installplugin", "--network", "regtest")
    term.expect("lightning-dir: ")
    term.send(f"{ln}\n")
    term.expect("Client key file.*: ")
    term.send(f"{key}\n")
    term.expect("Server address.*: ")
    term.send(f"{daemon.address}\n")
    term.expect("server id.*: ")
    term.send(f"{daemon.server_id}\n")
    assert term.wait() == 0, term.output
    assert read_wrapper(ln / "regtest" / WRAPPER_NAME).client_id == cid


def test_a_wrapper_of_another_client_is_replaced_only_when_confirmed(
        daemon: CldcbServer, tmp_path: Path) -> None:
    ln = stopped_node(tmp_path, "plain32")
    first, _, cid1 = new_client(tmp_path, daemon, "first.key")
    second, _, cid2 = new_client(tmp_path, daemon, "second.key")
    assert run_cli(*install_args(ln, first, daemon)).returncode == 0
    refused = run_cli(*install_args(ln, second, daemon))
    assert refused.returncode != 0 and "--yes" in refused.stderr and cid1 in refused.stderr
    wrapper = ln / "regtest" / WRAPPER_NAME
    assert read_wrapper(wrapper).client_id == cid1
    before = wrapper.read_bytes()
    done = run_cli(*install_args(ln, second, daemon, "--yes"))
    assert done.returncode == 0, done.stderr
    assert read_wrapper(wrapper).client_id == cid2
    assert len(config_lines(ln)) == 1
    (kept,) = (ln / "regtest").glob(WRAPPER_NAME + ".replaced-*")   # the old key, kept
    assert kept.read_bytes() == before and read_wrapper(kept).client_id == cid1
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700 and str(kept) in done.stdout


def test_an_unregistered_client_changes_nothing_locally(daemon: CldcbServer,
                                                       tmp_path: Path) -> None:
    ln = stopped_node(tmp_path, "plain32")
    key = tmp_path / "client.key"
    assert run_cli("newclient", str(key)).returncode == 0
    refused = run_cli(*install_args(ln, key, daemon))
    assert refused.returncode != 0
    assert "nothing was installed locally" in refused.stderr
    assert sorted(p.name for p in (ln / "regtest").iterdir()) == ["hsm_secret"]


def test_sshkey_from_the_key_file_or_the_wrapper(daemon: CldcbServer, tmp_path: Path) -> None:
    ln = stopped_node(tmp_path, "plain32")
    key, _, cid = new_client(tmp_path, daemon)
    assert run_cli(*install_args(ln, key, daemon)).returncode == 0
    from_key = run_cli("sshkey", "--client-privkey", str(key))
    from_wrapper = run_cli("sshkey", "--lightning-dir", str(ln), "--network", "regtest")
    assert from_key.returncode == 0 and from_key.stdout == from_wrapper.stdout
    line = from_key.stdout.strip()
    # the server program by its absolute path, never whatever PATH finds first
    forced = re.match(rf'restrict,command="(/\S+) stdio --client {cid}" ssh-ed25519 ', line)
    assert forced and Path(forced[1]).name == "cldcb-server" and Path(forced[1]).is_file()
    assert run_cli("sshkey").returncode == 2


# --- the config line --------------------------------------------------------------------

def test_important_plugin_line_once_and_removed(tmp_path: Path) -> None:
    paths = NodePaths(tmp_path / "ln", "testnet")
    paths.network_dir.mkdir(parents=True)
    wrapper = paths.wrapper
    paths.config.write_text("alias=x\n# important-plugin=/old/commented\nrgb=ff0000")
    paths.config.chmod(0o640)
    assert add_important_plugin(paths) is True
    assert add_important_plugin(paths) is False
    text = paths.config.read_text()
    assert text == f"alias=x\n# important-plugin=/old/commented\nrgb=ff0000\n" \
                   f"important-plugin={wrapper}\n"
    assert paths.config.stat().st_mode & 0o777 == 0o640
    # a line in the top-level config counts too, and removal clears both
    paths.top_config.write_text(f"important-plugin={wrapper}\nplugin=/other\n")
    paths.config.write_text("alias=x\n")
    assert has_important_plugin(paths) and add_important_plugin(paths) is False
    assert remove_important_plugin(paths) == [paths.top_config]
    assert paths.top_config.read_text() == "plugin=/other\n"
    # a symlinked config is edited where it points
    real = tmp_path / "real-config"
    real.write_text("alias=y\n")
    paths.config.unlink()
    paths.config.symlink_to(real)
    assert add_important_plugin(paths) is True
    assert paths.config.is_symlink() and f"important-plugin={wrapper}" in real.read_text()
    assert remove_important_plugin(paths) == [paths.config]
    assert real.read_text() == "alias=y\n"
