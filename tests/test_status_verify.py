"""``cldcb-client status`` and ``cldcb-client verify`` against real servers.

One module-wide backup: the workload trace played by the simulated lightningd
through the real plugin to two daemons (quorum: all). Each test works on its
own copy of the node's folder (the wrapper names the database relatively, so
a copy is a node of its own backed up to the same servers) and changes it to
make the situation it checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from demo import NETWORK, Target, client, install_client, play, vector_secret
from helpers.readme_tables import exit_codes
from helpers.servers import CldcbServer, free_port
from helpers.traces import replay_trace

from cldcb.client import verify as verify_mod
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.errors import CldcbError
from cldcb.node.nodekey import LocalNodeKey
from cldcb.plugin.status import STATUS_NAME, write_status_file
from cldcb.plugin.wrapper import WRAPPER_NAME, ServerEntry, read_wrapper, write_wrapper

pytestmark = pytest.mark.timeout(300)
TRACE = "cln-workload"
CODES = exit_codes()      # the README's table


@dataclass
class Setup:
    template: Path          # a lightning-dir, as the backup left it
    servers: list[CldcbServer]
    data_version: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("status-verify")
    servers = [CldcbServer(root / f"server{i}").init().start() for i in range(2)]
    try:
        lightning_dir = root / "node"
        network_dir = lightning_dir / NETWORK
        network_dir.mkdir(parents=True)
        secret = bytes.fromhex(vector_secret("plain32")["file_hex"])
        (network_dir / "hsm_secret").write_bytes(secret)
        client_priv = new_privkey()
        for s in servers:
            s.add(client_id_from_pubkey(pubkey_of(client_priv)))
        install_client(network_dir, LocalNodeKey.from_hsm_secret_bytes(secret),
                       [Target(s.address, s.server_id) for s in servers], client_priv)
        data_version = play(lightning_dir, TRACE)
        yield Setup(lightning_dir, servers, data_version)
    finally:
        for s in servers:
            s.stop()


def node_copy(setup: Setup, tmp_path: Path) -> Path:
    lightning_dir = tmp_path / "ln"
    shutil.copytree(setup.template, lightning_dir)
    return lightning_dir


def db_of(lightning_dir: Path) -> Path:
    return lightning_dir / NETWORK / "lightningd.sqlite3"


def commit_unseen(lightning_dir: Path, changes: int) -> int:
    """Commit ``changes`` batches straight into the database (no plugin saw them)."""
    con = sqlite3.connect(db_of(lightning_dir), isolation_level=None)
    try:
        for _ in range(changes):
            con.execute("BEGIN")
            con.execute("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version'")
            con.execute("COMMIT")
        return con.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0]
    finally:
        con.close()


def status(lightning_dir: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return client("status", "--lightning-dir", str(lightning_dir), "--network", NETWORK, *more)


def verify(lightning_dir: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return client("verify", "--lightning-dir", str(lightning_dir), "--network", NETWORK, *more)


# --- status ------------------------------------------------------------------------------

def test_status_all_in_step(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    done = status(ln)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: every server holds" in done.stdout
    assert done.stdout.count(f"newest data_version {setup.data_version} (lag 0)") == 2
    report = json.loads(status(ln, "--json").stdout)
    assert report["ok"] and report["problems"] == []
    assert report["database_data_version"] == setup.data_version
    assert not report["lightningd_running"] and not report["plugin_running"]
    assert [s["lag"] for s in report["servers"]] == [0, 0]
    assert all(s["snapshot_data_version"] is not None for s in report["servers"])
    assert report["plugin_status"]["running"] is False  # the plugin's own file, after exit


def test_status_lag(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    commit_unseen(ln, 2)
    done = status(ln)
    assert done.returncode == CODES["lag"]
    assert "2 data_versions behind the database" in done.stdout
    assert status(ln, "--max-lag", "2").returncode == 0


def test_status_server_down(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    wrapper = ln / NETWORK / WRAPPER_NAME
    cfg = read_wrapper(wrapper)
    dead = f"127.0.0.1:{free_port()}"
    write_wrapper(wrapper, replace(cfg, servers=(cfg.servers[0], ServerEntry(
        dead, cfg.servers[1].server_id))))
    done = status(ln, "--json")
    assert done.returncode == CODES["outage"]
    report = json.loads(done.stdout)
    assert report["exit_code"] == CODES["outage"]
    assert report["servers"][0]["reachable"] and not report["servers"][1]["reachable"]
    assert any(p.startswith(f"{dead}: cannot be reached") for p in report["problems"])


def test_status_database_older_than_its_backup(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    db = db_of(ln)
    db.unlink()
    older = replay_trace(TRACE, db, calls=slice(0, 700))
    done = status(ln)
    assert done.returncode == CODES["failure"]
    assert f"the database only {older}" in done.stdout and "do not start" in done.stdout


class FakeLightningd:
    """Something listening on the RPC socket, so lightningd looks like it is running."""

    def __init__(self, network_dir: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = os.open(network_dir, os.O_PATH | os.O_DIRECTORY)
        try:
            self.sock.bind(f"/proc/self/fd/{fd}/lightning-rpc")
        finally:
            os.close(fd)
        self.sock.listen(5)

    def close(self) -> None:
        self.sock.close()


def test_status_plugin_not_running_while_lightningd_is(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    network_dir = ln / NETWORK
    fake = FakeLightningd(network_dir)
    try:
        done = status(ln)  # the status file says the plugin exited
        assert done.returncode == CODES["plugin-down"]
        assert "lightningd is running but the cldcb plugin is not" in done.stdout
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        status_file = network_dir / STATUS_NAME
        data = json.loads(status_file.read_text())
        write_status_file(status_file, {**data, "running": True, "pid": gone.pid})
        done = status(ln)
        assert done.returncode == CODES["plugin-down"]
        assert f"its pid {gone.pid} is gone" in done.stdout
        # A plugin that runs (this process stands in for it): all is well.
        write_status_file(status_file, {**data, "running": True, "pid": os.getpid()})
        done = status(ln)
        assert done.returncode == 0, done.stdout
        assert "lightningd running; plugin running" in done.stdout
        status_file.unlink()
        done = status(ln)
        assert done.returncode == CODES["plugin-down"]
        assert f"{status_file} does not exist" in done.stdout     # the real path
    finally:
        fake.close()


def test_status_never_shows_a_stopped_plugins_state_as_now(setup: Setup,
                                                           tmp_path: Path) -> None:
    """A plugin killed while connecting left "connecting" in its file: that is not now."""
    ln = node_copy(setup, tmp_path)
    status_file = ln / NETWORK / STATUS_NAME
    data = json.loads(status_file.read_text())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    servers = [{**s, "state": "connecting", "connected": False} for s in data["servers"]]
    write_status_file(status_file, {**data, "running": True, "pid": gone.pid,
                                    "servers": servers})
    fake = FakeLightningd(ln / NETWORK)
    try:
        for running in (True, False):   # with lightningd running, then stopped
            if not running:
                fake.close()
            done = status(ln)
            assert "plugin says" not in done.stdout and "connecting" not in done.stdout
            assert "plugin not running (its pid" in done.stdout
            assert "status last written" in done.stdout
    finally:
        fake.close()


def test_status_human_output_never_says_none(setup: Setup, tmp_path: Path) -> None:
    """Unknown values (no database, a server holding nothing, no ack) are said in words."""
    ln = node_copy(setup, tmp_path)
    db_of(ln).unlink()
    wrapper = ln / NETWORK / WRAPPER_NAME
    cfg = read_wrapper(wrapper)
    empty = CldcbServer(tmp_path / "empty").init()
    empty.add(cfg.client_id)
    empty.start()
    try:
        write_wrapper(wrapper, replace(cfg, servers=(*cfg.servers, ServerEntry(
            empty.address, empty.server_id))))
        status_file = ln / NETWORK / STATUS_NAME
        data = json.loads(status_file.read_text())
        servers = [{**s, "last_acked_data_version": None} for s in data["servers"]]
        write_status_file(status_file, {**data, "running": True, "pid": os.getpid(),
                                        "servers": servers, "data_version": None})
        done = status(ln)
    finally:
        empty.stop()
    assert done.returncode == CODES["failure"], done.stdout + done.stderr
    assert "None" not in done.stdout and "null" not in done.stdout
    assert "data_version unknown" in done.stdout
    assert f"server {empty.address}" in done.stdout and "holds nothing" in done.stdout
    assert "last ack none yet" in done.stdout


def test_status_json_error_is_json(tmp_path: Path) -> None:
    (tmp_path / NETWORK).mkdir()
    done = status(tmp_path, "--json")
    assert done.returncode == CODES["failure"]
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["exit_code"] == CODES["failure"]
    assert WRAPPER_NAME in report["error"] and done.stderr.startswith("error: ")


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^{}]*\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\["\\n])*)"(,|$)')


def parse_prometheus(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A strict reader of Prometheus' text format (0.0.4): every sample's metric has one
    HELP and one TYPE line before it, labels are well quoted, values are floats."""
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    helped: set[str] = set()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helped, line
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter", "untyped") and name not in typed, line
            typed[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            assert name in typed and name in helped, f"{name} has no TYPE/HELP before it"
            pairs: list[tuple[str, str]] = []
            body = (labels or "{}")[1:-1]
            while body:
                lm = _LABEL.match(body)
                assert lm, f"bad labels in {line!r}"
                pairs.append((lm.group(1), lm.group(2)))
                body = body[lm.end():]
            key = tuple(sorted(pairs))
            assert key not in out.setdefault(name, {}), f"duplicate sample {line!r}"
            out[name][key] = float(value)
    return out


def test_status_prometheus_textfile(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    prom = tmp_path / "textfile" / "cldcb.prom"
    prom.parent.mkdir()
    addresses = [s.address for s in setup.servers]

    def scrape(*more: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        status(ln, "--prometheus", str(prom), *more)
        assert [p.name for p in prom.parent.iterdir()] == ["cldcb.prom"]   # no temp left
        return parse_prometheus(prom.read_text())

    m = scrape()
    per_server = {(("server", a),) for a in addresses}
    assert set(m["cldcb_backup_lag_data_versions"]) == per_server
    assert set(m["cldcb_backup_lag_data_versions"].values()) == {0}
    assert set(m["cldcb_backup_last_ack_age_seconds"]) == per_server
    assert all(v >= 0 for v in m["cldcb_backup_last_ack_age_seconds"].values())
    assert m["cldcb_backup_outage"][()] == 0 and m["cldcb_plugin_running"][()] == 0
    assert m["cldcb_status_exit_code"][()] == 0 and m["cldcb_status_success"][()] == 1
    commit_unseen(ln, 3)
    m = scrape()
    assert set(m["cldcb_backup_lag_data_versions"].values()) == {3}
    assert m["cldcb_status_exit_code"][()] == CODES["lag"]
    wrapper = ln / NETWORK / WRAPPER_NAME
    cfg = read_wrapper(wrapper)
    dead = f"127.0.0.1:{free_port()}"
    write_wrapper(wrapper, replace(cfg, servers=(cfg.servers[0], ServerEntry(
        dead, cfg.servers[1].server_id))))
    m = scrape()
    assert m["cldcb_backup_outage"][()] == 1
    assert m["cldcb_backup_server_up"][(("server", dead),)] == 0
    assert (("server", dead),) not in m["cldcb_backup_lag_data_versions"]
    wrapper.unlink()            # status cannot run at all: the file says so
    m = scrape()
    assert m["cldcb_status_success"][()] == 0


def test_status_without_wrapper(tmp_path: Path) -> None:
    (tmp_path / NETWORK).mkdir()
    done = status(tmp_path)
    assert done.returncode != 0 and done.stderr.startswith("error: ")
    assert WRAPPER_NAME in done.stderr


# --- verify ------------------------------------------------------------------------------

def test_verify_identical(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    done = verify(ln)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(f"backup at data_version {setup.data_version} is IDENTICAL") == 2
    assert "sqlite3 .dump" in done.stdout
    assert not [p for p in os.listdir(ln / NETWORK) if p.startswith(".cldcb-verify")]


def test_verify_detects_a_differing_live_database(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    con = sqlite3.connect(db_of(ln))
    con.execute("UPDATE vars SET val = 'tampered' WHERE name = 'genesis_hash'"
                if con.execute("SELECT 1 FROM vars WHERE name='genesis_hash'").fetchone()
                else "INSERT INTO vars (name, val) VALUES ('cldcb-drill', 'x')")
    con.commit()
    con.close()
    done = verify(ln)
    assert done.returncode == 1
    assert done.stdout.count("DIFFERS: the dumps differ from line") == 2
    assert "(table vars)" in done.stdout


def test_verify_json(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    done = verify(ln, "--json")
    assert done.returncode == CODES["ok"], done.stdout + done.stderr
    report = json.loads(done.stdout)          # one object, no human text beside it
    assert report["ok"] is True and report["exit_code"] == CODES["ok"]
    assert report["data_version"] == setup.data_version
    assert report["database"] == str(db_of(ln))
    assert [s["result"] for s in report["servers"]] == ["identical", "identical"]
    assert [s["address"] for s in report["servers"]] == [s.address for s in setup.servers]
    ahead = commit_unseen(ln, 1)
    done = verify(ln, "--json")
    assert done.returncode == CODES["failure"]
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["data_version"] == ahead
    assert {s["result"] for s in report["servers"]} == {"failed"}
    assert all("it is behind" in s["detail"] for s in report["servers"])
    other = tmp_path / "other_secret"
    other.write_bytes(bytes(range(1, 33)))
    done = verify(ln, "--json", "--hsm-secret", str(other))
    assert done.returncode == CODES["failure"]
    assert "give this node's hsm_secret" in json.loads(done.stdout)["error"]


def test_verify_live_database_ahead_of_the_backup(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    ahead = commit_unseen(ln, 1)
    done = verify(ln)
    assert done.returncode == 1
    assert f"not {ahead}: it is behind" in done.stdout


def test_verify_with_another_nodes_key(setup: Setup, tmp_path: Path) -> None:
    ln = node_copy(setup, tmp_path)
    other = tmp_path / "other_secret"
    other.write_bytes(bytes(range(1, 33)))
    done = verify(ln, "--hsm-secret", str(other))
    assert done.returncode != 0 and "give this node's hsm_secret" in done.stderr


def test_compare_without_the_sqlite3_program(setup: Setup, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    a = db_of(setup.template)
    b = tmp_path / "b.sqlite3"
    shutil.copy(a, b)
    with_program = verify_mod.compare(a, b, tmp_path)
    monkeypatch.setattr(verify_mod.shutil, "which", lambda name: None)
    assert verify_mod.compare_method() == "Python iterdump"
    assert with_program is None and verify_mod.compare(a, b, tmp_path) is None
    con = sqlite3.connect(b)
    con.execute("INSERT INTO vars (name, val) VALUES ('zzz', 'x')")
    con.commit()
    con.close()
    assert "(table vars)" in (verify_mod.compare(a, b, tmp_path) or "")


def test_copy_of_a_locked_database_is_bounded(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    replay_trace("cln-crash-restart", db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(CldcbError, match="stayed locked"):
            verify_mod.copy_live(db, tmp_path / "copy.sqlite3", timeout=0.5)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert verify_mod.copy_live(db, tmp_path / "copy2.sqlite3") > 0
