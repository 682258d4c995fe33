"""Disaster recovery end to end: real servers, the real plugin, ``cldcb-client recover``.

One module-wide world: a ``cldcb-server serve`` daemon and a private OpenSSH
sshd (``cldcb`` subsystem) on 127.0.0.1, and three nodes, each backed up to
both servers (quorum: all) by the real plugin under the simulated lightningd
playing a real Core Lightning trace:

- ``plain32`` (the same node as ``enc73``): the channel trace, its sshd key
  in subsystem mode;
- ``mn_nopass``: the workload trace, its sshd key pinned by a forced command;
- ``mn_pass``: the crash-restart trace (an uncommitted batch replaced).

Then everything but ``hsm_secret`` is deleted, and every test recovers into a
fresh folder holding only that ``hsm_secret``. Tampering tests run a copy of
the daemon's data directory (same server key) whose log files were edited the
way a dishonest server would edit them (frames re-encoded with valid
checksums), so that the store serves them as if they were genuine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from demo import (
    CLIENT_CMD,
    NETWORK,
    Target,
    client,
    delete_all_but_hsm_secret,
    dump,
    install_client,
    play,
    vector_secret,
)
from helpers.servers import CldcbServer, PrivateSshd, _write_key
from helpers.traces import expected_dump_bytes

from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.node.nodekey import LocalNodeKey
from cldcb.plugin.wrapper import WRAPPER_NAME, read_wrapper
from cldcb.store import Store
from cldcb.store.frames import encode_record
from cldcb.store.log import segment_records

pytestmark = pytest.mark.timeout(600)

NODES = {"plain32": "cln-channels", "mn_nopass": "cln-workload", "mn_pass": "cln-crash-restart"}
SECRET_NODE = {"plain32": "plain32", "enc73": "plain32", "mn_nopass": "mn_nopass",
               "mn_pass": "mn_pass"}


@dataclass
class Backup:
    name: str
    trace: str
    client_id: str
    data_version: int
    dump: bytes


@dataclass
class World:
    root: Path
    daemon: CldcbServer
    sshd: PrivateSshd
    operator_key: Path
    backups: dict[str, Backup]

    def daemon_args(self) -> list[str]:
        return ["--server", self.daemon.address, "--server-id", self.daemon.server_id]

    def sshd_args(self, with_key: bool = True) -> list[str]:
        args = ["--server", self.sshd.address(), "--server-id", self.sshd.server_id,
                "--host-key", self.sshd.host_key]
        return args + (["--ssh-key", str(self.operator_key)] if with_key else [])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("recover-e2e")
    daemon = CldcbServer(root / "daemon").init().start()
    sshd = PrivateSshd(root / "sshd").init()
    operator_key = root / "operator_key"
    sshd.authorize_line(_write_key(operator_key) + " operator")
    sshd.start()
    try:
        backups = {}
        for name, trace in NODES.items():
            secret = vector_secret(name)
            lightning_dir = root / f"node-{name}"
            network_dir = lightning_dir / NETWORK
            network_dir.mkdir(parents=True)
            file_bytes = bytes.fromhex(secret["file_hex"])
            (network_dir / "hsm_secret").write_bytes(file_bytes)
            node = LocalNodeKey.from_hsm_secret_bytes(file_bytes, secret["passphrase"])
            client_priv = new_privkey()
            client_id = client_id_from_pubkey(pubkey_of(client_priv))
            daemon.add(client_id)
            sshd.add(client_id)
            sshd.authorize_client(client_priv, client_id, forced=(name == "mn_nopass"))
            install_client(network_dir, node, [
                Target(daemon.address, daemon.server_id),
                Target(sshd.address(), sshd.server_id, sshd.host_key)], client_priv)
            data_version = play(lightning_dir, trace)
            original = dump(network_dir / "lightningd.sqlite3")
            assert original == expected_dump_bytes(trace)
            delete_all_but_hsm_secret(network_dir)
            assert os.listdir(network_dir) == ["hsm_secret"]
            backups[name] = Backup(name, trace, client_id, data_version, original)
        yield World(root, daemon, sshd, operator_key, backups)
    finally:
        daemon.stop()
        sshd.stop()


def fresh_node(tmp_path: Path, secret_name: str) -> Path:
    """A lightning-dir whose network folder holds only the node's hsm_secret."""
    lightning_dir = tmp_path / "lightning"
    (lightning_dir / NETWORK).mkdir(parents=True)
    (lightning_dir / NETWORK / "hsm_secret").write_bytes(
        bytes.fromhex(vector_secret(secret_name)["file_hex"]))
    return lightning_dir


def recover_args(lightning_dir: Path, *more: str) -> list[str]:
    return ["recover", "--lightning-dir", str(lightning_dir), "--network", NETWORK, *more]


def run_in_pty(args: list[str], answer: str, prompt: bytes = b"Passphrase",
               timeout: float = 120) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as its controlling terminal and stdin/out/err;
    type ``answer`` when ``prompt`` appears. Returns (exit status, everything shown)."""
    master, slave = pty.openpty()

    def make_controlling() -> None:
        import fcntl
        import termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=make_controlling)
    os.close(slave)
    shown = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                shown += data
                if not answered and prompt in shown:
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif proc.poll() is not None:
                break
        else:
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(30), shown.decode("utf-8", "replace")
    finally:
        os.close(master)


def check_recovered(lightning_dir: Path, backup: Backup, out: str) -> None:
    network_dir = lightning_dir / NETWORK
    assert dump(network_dir / "lightningd.sqlite3") == backup.dump == \
        expected_dump_bytes(backup.trace)
    cfg = read_wrapper(network_dir / WRAPPER_NAME)
    assert cfg.client_id == backup.client_id
    assert (network_dir / WRAPPER_NAME).stat().st_mode & 0o777 == 0o700
    assert f"important-plugin={network_dir / WRAPPER_NAME}" in \
        (network_dir / "config").read_text().splitlines()
    assert sorted(os.listdir(network_dir)) == sorted(
        ["hsm_secret", "lightningd.sqlite3", WRAPPER_NAME, "config"])
    assert f"data_version {backup.data_version}" in out
    assert "WARNING: Never start lightningd on an older copy" in out


CASES = [("plain32", "daemon", ""), ("enc73", "daemon", "file"), ("mn_nopass", "daemon", ""),
         ("mn_pass", "daemon", "file"), ("plain32", "sshd", ""), ("enc73", "sshd", "pty"),
         ("mn_nopass", "sshd", ""), ("mn_pass", "sshd", "pty")]


@pytest.mark.parametrize(("secret", "transport", "passphrase"), CASES,
                         ids=[f"{s}-{t}{'-' + p if p else ''}" for s, t, p in CASES])
def test_recover_every_format_over_both_transports(world: World, tmp_path: Path, secret: str,
                                                   transport: str, passphrase: str) -> None:
    backup = world.backups[SECRET_NODE[secret]]
    lightning_dir = fresh_node(tmp_path, secret)
    args = recover_args(lightning_dir, *(world.daemon_args() if transport == "daemon"
                                         else world.sshd_args()))
    if passphrase == "file":
        pass_file = tmp_path / "passphrase"
        pass_file.write_text(vector_secret(secret)["passphrase"] + "\n")
        args += ["--passphrase-file", str(pass_file)]
    if passphrase == "pty":
        code, out = run_in_pty([*CLIENT_CMD, *args], vector_secret(secret)["passphrase"])
        assert vector_secret(secret)["passphrase"] not in out  # not echoed
    else:
        done = client(*args)
        code, out = done.returncode, done.stdout + done.stderr
    assert code == 0, out
    check_recovered(lightning_dir, backup, out)


def test_sshd_with_known_hosts_and_default_keys(world: World, tmp_path: Path) -> None:
    """No --host-key, no --ssh-key: ~/.ssh/known_hosts and ~/.ssh/id_ed25519, as ssh does."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(world.operator_key, home / ".ssh" / "id_ed25519")
    (home / ".ssh" / "known_hosts").write_text(
        f"[127.0.0.1]:{world.sshd.port} {world.sshd.host_key}\n")
    lightning_dir = fresh_node(tmp_path, "mn_nopass")
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(home)
    done = client(*recover_args(lightning_dir, "--server", world.sshd.address(),
                                "--server-id", world.sshd.server_id), env=env)
    assert done.returncode == 0, done.stderr
    check_recovered(lightning_dir, world.backups["mn_nopass"], done.stdout + done.stderr)
    cfg = read_wrapper(lightning_dir / NETWORK / WRAPPER_NAME)
    assert cfg.servers[0].host_key == world.sshd.host_key
    # the key taken from known_hosts is shown, by its fingerprint, to be checked
    fingerprint = asyncssh.import_public_key(world.sshd.host_key).get_fingerprint("sha256")
    assert f"from ~/.ssh/known_hosts: ssh-ed25519 {fingerprint}" in done.stderr, done.stderr
    # Without any known host key: an error naming --host-key, nothing written.
    (home / ".ssh" / "known_hosts").unlink()
    other = fresh_node(tmp_path / "b", "mn_nopass")
    done = client(*recover_args(other, "--server", world.sshd.address(),
                                "--server-id", world.sshd.server_id), env=env)
    assert done.returncode != 0 and "--host-key" in done.stderr
    assert f"put it in {home / '.ssh' / 'known_hosts'}" in done.stderr      # the real path
    assert os.listdir(other / NETWORK) == ["hsm_secret"]


def test_several_servers_both_verified(world: World, tmp_path: Path) -> None:
    lightning_dir = fresh_node(tmp_path, "plain32")
    done = client(*recover_args(lightning_dir, *world.sshd_args(), *world.daemon_args()))
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    check_recovered(lightning_dir, world.backups["plain32"], out)
    assert "USED: data_version" in out and "same state: data_version" in out
    assert "single server" not in out
    assert len(read_wrapper(lightning_dir / NETWORK / WRAPPER_NAME).servers) == 2


def test_recover_json(world: World, tmp_path: Path) -> None:
    """--json: one JSON object on stdout (progress and notes stay on stderr), errors too."""
    backup = world.backups["plain32"]
    lightning_dir = fresh_node(tmp_path, "plain32")
    done = client(*recover_args(lightning_dir, *world.daemon_args(), *world.sshd_args(),
                                "--json"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    network_dir = lightning_dir / NETWORK
    assert report["ok"] is True and report["exit_code"] == 0
    assert report["database"] == str(network_dir / "lightningd.sqlite3")
    assert report["data_version"] == backup.data_version
    assert report["client_id"] == backup.client_id
    assert report["wrapper"] == str(network_dir / WRAPPER_NAME)
    assert "Never start lightningd on an older copy" in report["warning"]
    assert [s["address"] for s in report["servers"]] == [world.daemon.address,
                                                          world.sshd.address()]
    assert sorted(s["outcome"] for s in report["servers"]) == ["same state", "used"]
    assert all(s["data_version"] == backup.data_version for s in report["servers"])
    assert dump(network_dir / "lightningd.sqlite3") == backup.dump
    again = client(*recover_args(lightning_dir, *world.daemon_args(), "--json"))
    assert again.returncode == 1
    error = json.loads(again.stdout)
    assert error["ok"] is False and error["exit_code"] == 1
    assert "already exists" in error["error"]


def test_refuses_to_overwrite_an_existing_database(world: World, tmp_path: Path) -> None:
    lightning_dir = fresh_node(tmp_path, "plain32")
    db = lightning_dir / NETWORK / "lightningd.sqlite3"
    db.write_bytes(b"the node's precious database")
    done = client(*recover_args(lightning_dir, *world.daemon_args()))
    assert done.returncode != 0
    assert "already exists" in done.stderr and "never overwrites" in done.stderr
    assert db.read_bytes() == b"the node's precious database"
    assert sorted(os.listdir(lightning_dir / NETWORK)) == ["hsm_secret", "lightningd.sqlite3"]


@pytest.mark.parametrize("secret", ["enc73", "mn_pass"])
def test_wrong_passphrase_writes_nothing(world: World, tmp_path: Path, secret: str) -> None:
    lightning_dir = fresh_node(tmp_path, secret)
    pass_file = tmp_path / "passphrase"
    pass_file.write_text("not the passphrase\n")
    done = client(*recover_args(lightning_dir, *world.daemon_args(),
                                "--passphrase-file", str(pass_file)))
    assert done.returncode != 0
    assert done.stderr.startswith("error: the passphrase does not ")
    assert "not the passphrase" not in done.stderr + done.stdout
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]


def test_missing_passphrase_without_a_terminal(world: World, tmp_path: Path) -> None:
    lightning_dir = fresh_node(tmp_path, "mn_pass")
    done = subprocess.run([*CLIENT_CMD, *recover_args(lightning_dir, *world.daemon_args())],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode != 0 and "--passphrase-file" in done.stderr
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]


def test_unknown_node_finds_nothing(world: World, tmp_path: Path) -> None:
    lightning_dir = tmp_path / "lightning"
    (lightning_dir / NETWORK).mkdir(parents=True)
    (lightning_dir / NETWORK / "hsm_secret").write_bytes(bytes(range(1, 33)))
    done = client(*recover_args(lightning_dir, *world.daemon_args()))
    assert done.returncode != 0 and "no server holds a backup of node" in done.stderr
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]


# --- dishonest and stale servers ----------------------------------------------------------

def copy_daemon(world: World, where: Path, long_chain: str | None = None) -> CldcbServer:
    """A second daemon on a copy of the daemon's data directory (same server key).

    With ``long_chain`` (a client id), only that client's oldest kept snapshot is left in
    the copy, so that the chain it serves has many records after its snapshot, however
    the world's plugin compacted. Where (and whether) that plugin compacted depends on
    timing: a compaction can end just before the trace does, leaving a few records after
    the newest snapshot (six were seen, too few to tamper with the middle one and
    withhold five), or none may have ended at all (one snapshot: the first contact's).
    The oldest kept snapshot is the first contact's or one the newest compaction's log
    had outgrown (a server asks for a compaction only then), and every record after it
    is kept up to the same tip."""
    shutil.copytree(world.daemon.data_dir, where / "data")
    if long_chain is not None:
        snaps = sorted((where / "data" / "clients" / long_chain / "snapshots").glob("*.snap"))
        assert snaps, "the world's daemon holds no snapshot of this client"
        for newer in snaps[1:]:
            newer.unlink()
    return CldcbServer(where / "data", server_id=world.daemon.server_id)


def fetched_records(data_dir: Path, client_id: str) -> list[tuple[int, bytes]]:
    cs = Store.open(data_dir).client(client_id)
    try:
        plan = cs.fetch(-1)
        assert plan is not None
        with plan:
            return [(r.data_version, r.sealed) for r in plan.records()]
    finally:
        cs.close()


def edit_log(data_dir: Path, client_id: str, how: str) -> list[tuple[int, bytes]]:
    """Alter, reorder, drop the middle fetched record, or withhold the newest five,
    in the log files themselves; returns the records as fetched before."""
    records = fetched_records(data_dir, client_id)
    assert len(records) >= 8
    middle = records[len(records) // 2][1]
    for seg in sorted((data_dir / "clients" / client_id / "log").glob("*.log")):
        frames, _ = segment_records(seg)
        at = next((i for i, fr in enumerate(frames) if fr.sealed == middle), None)
        if how == "withheld":
            if seg != max((data_dir / "clients" / client_id / "log").glob("*.log")):
                continue
            frames = frames[:-5]
        elif at is None:
            continue
        elif how == "altered":
            sealed = bytearray(frames[at].sealed)
            sealed[-20] ^= 0x40
            frames[at] = dataclasses.replace(frames[at], sealed=bytes(sealed))
        elif how == "reordered":
            frames[at], frames[at + 1] = frames[at + 1], frames[at]
        elif how == "dropped":
            del frames[at]
        seg.write_bytes(b"".join(encode_record(fr.data_version, fr.kind, fr.link, fr.time_ms,
                                               fr.sealed) for fr in frames))
        return records
    raise AssertionError("the middle record is in no log segment")


@pytest.mark.parametrize("how", ["altered", "reordered", "dropped"])
def test_tampering_server_is_caught_and_nothing_is_written(world: World, tmp_path: Path,
                                                           how: str) -> None:
    backup = world.backups["plain32"]
    bad = copy_daemon(world, tmp_path, long_chain=backup.client_id)
    records = edit_log(bad.data_dir, backup.client_id, how)
    m = len(records) // 2
    named = records[m][0] if how == "altered" else records[m + 1][0]
    bad.start()
    try:
        lightning_dir = fresh_node(tmp_path, "plain32")
        done = client(*recover_args(lightning_dir, "--server", bad.address,
                                    "--server-id", bad.server_id))
    finally:
        bad.stop()
    assert done.returncode != 0, done.stdout
    assert f"record #{m} (data_version {named})" in done.stderr, done.stderr
    assert "Nothing was written" in done.stderr
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]


def test_withheld_newest_records_newer_server_used(world: World, tmp_path: Path) -> None:
    backup = world.backups["plain32"]
    stale = copy_daemon(world, tmp_path, long_chain=backup.client_id)
    records = edit_log(stale.data_dir, backup.client_id, "withheld")
    stale_dv = records[-6][0]
    stale.start()
    try:
        for order in ("stale-first", "stale-last"):
            lightning_dir = fresh_node(tmp_path / order, "plain32")
            stale_args = ["--server", stale.address, "--server-id", stale.server_id]
            args = (stale_args + world.sshd_args() if order == "stale-first"
                    else world.sshd_args() + stale_args)
            done = client(*recover_args(lightning_dir, *args))
            assert done.returncode == 0, done.stderr
            out = done.stdout + done.stderr
            check_recovered(lightning_dir, backup, out)
            assert f"{stale.address} ({stale.server_id[:14]}…): stale: data_version " \
                   f"{stale_dv}" in out
            assert f"{world.sshd.address()} ({world.sshd.server_id[:14]}…): USED: " \
                   f"data_version {backup.data_version}" in out
    finally:
        stale.stop()


def test_unverifiable_server_needs_yes(world: World, tmp_path: Path) -> None:
    """A server that cannot be checked might hold a newer state: ask, or --yes."""
    down = copy_daemon(world, tmp_path)
    down.start()
    down.stop()  # nothing listens on its port any more
    lightning_dir = fresh_node(tmp_path, "mn_nopass")
    args = recover_args(lightning_dir, *world.sshd_args(), "--server", down.address,
                        "--server-id", down.server_id)
    done = subprocess.run([*CLIENT_CMD, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode != 0 and "--yes" in done.stderr and "Nothing was written" in \
        done.stderr
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]
    done = client(*args, "--yes")
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    check_recovered(lightning_dir, world.backups["mn_nopass"], out)
    assert f"{down.address} ({down.server_id[:14]}…): FAILED" in out


def test_recovered_node_goes_on_backing_up_as_the_same_client(world: World,
                                                              tmp_path: Path) -> None:
    """The recovered wrapper backs up as the same client, continuing its chain: the next
    recovery finds the same snapshot and exactly one record more (a new client would be
    refused by the server; a new chain would be a fresh snapshot with one record on it).

    The server may ask the restarted plugin for a compaction (its log outgrew the last
    snapshot: that depends on where the world's plugin last compacted). Its first call
    then starts a background upload, which only the plugin's exit cuts short. So that
    upload is slowed past any lifetime of this node (the test knob for background
    uploads: a pause after each full chunk); it can never end, the server keeps its
    snapshot, and what the second recovery finds does not depend on timing."""
    from helpers.simlightningd import SimLightningd

    from cldcb.plugin.main import ENV_CHUNK_DELAY, ENV_CHUNK_SIZE

    backup = world.backups["plain32"]
    server = copy_daemon(world, tmp_path).start()
    try:
        args = ["--server", server.address, "--server-id", server.server_id]
        lightning_dir = fresh_node(tmp_path / "a", "plain32")
        done = client(*recover_args(lightning_dir, *args))
        assert done.returncode == 0, done.stderr
        check_recovered(lightning_dir, backup, done.stdout + done.stderr)
        base = re.search(r"\(snapshot at data_version (\d+) of ([^,]+), then (\d+) records\)",
                         done.stdout)
        assert base is not None, done.stdout
        chunk = 32 * 1024
        assert (lightning_dir / NETWORK / "lightningd.sqlite3").stat().st_size > chunk
        # lightningd starts on the recovered database with the recovered wrapper.
        node = SimLightningd(lightning_dir, lightning_dir / NETWORK / WRAPPER_NAME,
                             network=NETWORK,
                             env={ENV_CHUNK_DELAY: "3600", ENV_CHUNK_SIZE: str(chunk)}).start()
        try:
            node.init()
            dv = backup.data_version + 1
            node.db_write(dv, ["INSERT INTO vars (name, intval) VALUES ('after_recovery', 7)",
                               "UPDATE vars SET intval = intval + 1 WHERE name = "
                               f"'data_version' AND intval = {dv - 1}"])
        finally:
            node.close()
        logs = node.log_messages()
        assert f"info: cldcb: backup holds data_version {backup.data_version} " \
               "(1 of 1 server(s) answered)" in logs, logs
        assert not [m for m in logs if "blocking snapshot" in m or "is durable" in m], logs
        again = fresh_node(tmp_path / "b", "plain32")
        done = client(*recover_args(again, *args))
        assert done.returncode == 0, done.stderr
        assert f"client {backup.client_id}\n" in done.stdout
        assert f"data_version {dv}," in done.stdout
        assert dump(again / NETWORK / "lightningd.sqlite3") == \
            dump(lightning_dir / NETWORK / "lightningd.sqlite3")
        # The same client continued its chain: same snapshot, one record more.
        snap, at, records = base.groups()
        assert f"(snapshot at data_version {snap} of {at}, then {int(records) + 1} records)" \
            in done.stdout, done.stdout
        assert read_wrapper(again / NETWORK / WRAPPER_NAME).client_id == backup.client_id
    finally:
        server.stop()


def test_reinstalled_node_uses_the_client_that_reaches_furthest(tmp_path: Path) -> None:
    """A reinstall made a second client: the one whose backup reaches the highest
    data_version is used, the other is named."""
    server = CldcbServer(tmp_path / "server").init().start()
    try:
        secret = vector_secret("mn_nopass")
        lightning_dir = tmp_path / "node"
        network_dir = lightning_dir / NETWORK
        network_dir.mkdir(parents=True)
        file_bytes = bytes.fromhex(secret["file_hex"])
        (network_dir / "hsm_secret").write_bytes(file_bytes)
        node = LocalNodeKey.from_hsm_secret_bytes(file_bytes)
        target = [Target(server.address, server.server_id)]
        old_priv, new_priv = new_privkey(), new_privkey()
        old_id, new_id = (client_id_from_pubkey(pubkey_of(k)) for k in (old_priv, new_priv))
        server.add(old_id)
        install_client(network_dir, node, target, old_priv)
        old_dv = play(lightning_dir, "cln-workload", stop=400)
        server.add(new_id)  # the reinstall: a new client, then the rest of the trace
        install_client(network_dir, node, target, new_priv)
        new_dv = play(lightning_dir, "cln-workload", start=400)
        assert dump(network_dir / "lightningd.sqlite3") == expected_dump_bytes("cln-workload")
        lost = fresh_node(tmp_path / "lost", "mn_nopass")
        done = client(*recover_args(lost, "--server", server.address,
                                    "--server-id", server.server_id))
        assert done.returncode == 0, done.stderr
        assert f"also found client {old_id} (data_version {old_dv} on {server.address}); " \
               f"not used" in done.stderr
        assert f"using client {new_id}" in done.stderr
        assert dump(lost / NETWORK / "lightningd.sqlite3") == expected_dump_bytes("cln-workload")
        assert read_wrapper(lost / NETWORK / WRAPPER_NAME).client_id == new_id
        assert f"data_version {new_dv}," in done.stdout
        server.stop()
        # A server that claims far more for the old client than it can deliver (a forged
        # newest record) cannot make recovery pick the old client.
        seg = max((server.data_dir / "clients" / old_id / "log").glob("*.log"))
        _, end = segment_records(seg)
        with open(seg, "r+b") as f:                  # where its records end
            f.seek(end)
            f.write(encode_record(1_000_000, 0, bytes(32), 0, bytes(200)))
        server.start()
        lost = fresh_node(tmp_path / "lost2", "mn_nopass")
        done = client(*recover_args(lost, "--server", server.address,
                                    "--server-id", server.server_id))
        assert done.returncode == 0, done.stderr
        assert f"client {old_id}: servers claim data_version 1000000" in done.stderr
        assert f"using client {new_id}" in done.stderr
        assert dump(lost / NETWORK / "lightningd.sqlite3") == expected_dump_bytes("cln-workload")
    finally:
        server.stop()
