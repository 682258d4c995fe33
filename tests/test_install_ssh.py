"""``cldcb-client install --ssh``: the single-step setup against a real sshd on 127.0.0.1.

- a password-only account (a user this test creates with useradd and removes
  afterwards; needs root, as in CI): the unknown host key is confirmed and the
  password typed on a pseudo-terminal; the client's key gets into that
  account's authorized_keys and the backup runs over ssh://;
- a key found through a test ``~/.ssh/config`` (HOME points to a test folder;
  the real ~/.ssh is never touched), the host accepted by ``--accept-host-key``;
- a key whose forced command is ``cldcb-server forced --allow add``: the client
  is added and the backup runs on the server's public address (a daemon); with
  no public address, the line to add is printed and nothing is installed;
- an unknown (or changed) host key without confirmation: nothing changes,
  locally or remotely.

The node is :class:`simrpc.SimRpcNode` (running) or a folder with an hsm_secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import IN_CI, require_tool
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519
from installkit import (
    PtyRun,
    client_env,
    file_leaks,
    process_leaks,
    run_cli,
    secret_forms,
    text_leaks,
)
from servers import SERVER_CMD, CldcbServer, PrivateSshd, free_port, run_server_cmd
from simrpc import SimRpcNode, vector

import cldcb
from cldcb import hsm_secret, wire
from cldcb.connection import Connection, ServerSpec
from cldcb.plugin.wrapper import WRAPPER_NAME, WrapperConfig, read_wrapper
from cldcb.session import Role
from cldcb.sshkeys import authorized_keys_line


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _status(spec: ServerSpec, priv: bytes) -> wire.Status:
    async with await Connection.open(spec, priv, Role.READER) as conn:
        return await conn.status()


def spec_of(cfg: WrapperConfig) -> ServerSpec:
    return cfg.servers[0].spec()


def wait_tip(spec: ServerSpec, priv: bytes, data_version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = run(_status(spec, priv))
        if st.has_tip and st.tip_data_version >= data_version:
            return
        assert time.monotonic() < deadline, f"tip {st.tip_data_version} < {data_version}"
        time.sleep(0.2)


def clients(data_dir: Path) -> list[str]:
    return sorted(c["client_id"] for c in json.loads(
        run_server_cmd(data_dir, "list", "--json").stdout))


def fingerprint(host_key: str) -> str:
    blob = base64.b64decode(host_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def new_ssh_key(path: Path) -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                       ser.NoEncryption()))
    path.chmod(0o600)
    return key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                         ser.PublicFormat.OpenSSH).decode()


def node_secret() -> bytes:
    v = vector("plain32")
    return hsm_secret.node_key(bytes.fromhex(v["file_hex"]), v["passphrase"])


def tree(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` with its content (to show nothing changed)."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                out[str(p)] = p.read_bytes() if p.is_file() else b"<special>"
    return out


# --- a throwaway account -----------------------------------------------------------------

@dataclass
class SshUser:
    name: str
    password: str
    home: Path
    base: Path


def _open_for_others(paths: list[Path]) -> list[tuple[Path, int]]:
    """Let other users traverse the folders above ``paths`` (to run this Python);
    returns what to restore."""
    changed = []
    for path in paths:
        for folder in reversed(path.parents):
            mode = folder.stat().st_mode
            if not mode & 0o001:
                folder.chmod((mode & 0o7777) | 0o001)
                changed.append((folder, mode & 0o7777))
    return changed


@pytest.fixture(scope="module")
def test_user() -> Iterator[SshUser]:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("these tests create a user: run them as root")
        pytest.skip("creating a test user needs root")
    useradd, userdel = require_tool("useradd"), require_tool("userdel")
    chpasswd = require_tool("chpasswd")
    base = Path(tempfile.mkdtemp(prefix="cldcb-ssh-"))
    base.chmod(0o755)
    name = "cldcbt" + secrets.token_hex(3)
    password = secrets.token_urlsafe(18)
    home = base / "home"
    subprocess.run([useradd, "--home-dir", str(home), "--create-home", "--shell", "/bin/sh",
                    "--user-group", name], check=True, timeout=30)
    changed: list[tuple[Path, int]] = []
    try:
        subprocess.run([chpasswd], input=f"{name}:{password}\n", text=True, check=True,
                       timeout=30)
        changed = _open_for_others([Path(sys.executable).resolve(),
                                    Path(cldcb.__file__).resolve(),
                                    Path(os.__file__).resolve()])
        probe = subprocess.run([require_tool("runuser"), "-u", name, "--", sys.executable,
                                "-c", "import cldcb.server.admin"], capture_output=True,
                               text=True, timeout=60)
        assert probe.returncode == 0, f"the test user cannot run cldcb: {probe.stderr}"
        yield SshUser(name, password, home, base)
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode)
        subprocess.run([userdel, "--force", name], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)
        assert name not in {p.pw_name for p in pwd.getpwall()}


@pytest.fixture(scope="module")
def user_sshd(test_user: SshUser) -> Iterator[PrivateSshd]:
    """sshd letting the test user in by password or by its own authorized_keys."""
    srv = PrivateSshd(test_user.base / "sshd", user=test_user.name, password_auth=True,
                      user_authorized_keys=True).init()
    entry = pwd.getpwnam(test_user.name)
    for dirpath, _, files in os.walk(srv.data_dir):
        os.chown(dirpath, entry.pw_uid, entry.pw_gid)
        for f in files:
            os.chown(Path(dirpath) / f, entry.pw_uid, entry.pw_gid)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def root_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    """A stock private sshd (keys from its own authorized_keys file only)."""
    srv = PrivateSshd(tmp_path_factory.mktemp("root-sshd")).init().start()
    yield srv
    srv.stop()


def install_args(ln: Path, ssh: str, *extra: str) -> list[str]:
    return ["install", "--lightning-dir", str(ln), "--network", "regtest", "--ssh", ssh,
            "--wait", "60", *extra]


# --- the tests ---------------------------------------------------------------------------

def test_install_through_a_password_only_account(test_user: SshUser, user_sshd: PrivateSshd,
                                                 tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    ln = tmp_path / "ln"
    command = user_sshd.server_command()
    with SimRpcNode(ln, preplay=40) as node:
        term = PtyRun.cli(*install_args(ln, f"{test_user.name}@127.0.0.1:{user_sshd.port}",
                                        "--server-command", command), env=client_env(home))
        term.expect(re.escape(fingerprint(user_sshd.host_key)))
        term.expect("Type yes if it is the same.*: ")
        term.send("yes\n")
        term.expect(f"{test_user.name}@127.0.0.1's password: ")
        term.send(test_user.password + "\n")
        assert term.wait() == 0, term.output
        output = term.output
        assert "the backup is running" in output

        wrapper = node.network_dir / WRAPPER_NAME
        cfg = read_wrapper(wrapper)
        (server,) = cfg.servers
        assert server.address == f"ssh://{test_user.name}@127.0.0.1:{user_sshd.port}"
        assert server.server_id == user_sshd.server_id
        assert server.host_key == " ".join(user_sshd.host_key.split()[:2])
        assert cfg.client_id in clients(user_sshd.data_dir)
        line = authorized_keys_line(cfg.client_priv, cfg.client_id, command)
        assert line in (test_user.home / ".ssh" / "authorized_keys").read_text().splitlines()
        known = (home / ".ssh" / "known_hosts").read_text()
        assert known.startswith(f"[127.0.0.1]:{user_sshd.port} ssh-ed25519 ")

        spec = spec_of(cfg)
        assert run(_status(spec, cfg.client_priv)).snapshot_data_version >= 0
        data_version = node.feed(15)
        wait_tip(spec, cfg.client_priv, data_version)

        forms = secret_forms(cfg.client_priv, test_user.password, node_secret())
        assert process_leaks(forms) == []
        assert file_leaks([tmp_path, test_user.base], forms, allowed=[wrapper]) == []
        assert text_leaks({"terminal": output, "sshd log": user_sshd.log(),
                           "plugin log": "\n".join(node.sim.log_messages())}, forms) == []


def test_install_with_a_key_found_through_the_ssh_config(test_user: SshUser,
                                                         user_sshd: PrivateSshd,
                                                         tmp_path: Path) -> None:
    home = tmp_path / "home"
    public = new_ssh_key(home / ".ssh" / "setup_key")
    user_keys = test_user.home / ".ssh" / "authorized_keys"
    user_keys.parent.mkdir(exist_ok=True)
    with open(user_keys, "a") as f:
        f.write(public + "\n")
    (home / ".ssh" / "config").write_text(
        f"Host backup-box\n  HostName 127.0.0.1\n  Port {user_sshd.port}\n"
        f"  User {test_user.name}\n  IdentityFile ~/.ssh/setup_key\n  IdentitiesOnly yes\n")
    ln = tmp_path / "ln"
    with SimRpcNode(ln, preplay=40) as node:
        done = run_cli(*install_args(ln, "backup-box", "--server-command",
                                     user_sshd.server_command(), "--accept-host-key",
                                     fingerprint(user_sshd.host_key)),
                       env=client_env(home))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "added the host key" in done.stdout
        cfg = read_wrapper(node.network_dir / WRAPPER_NAME)
        assert cfg.servers[0].address == f"ssh://{test_user.name}@127.0.0.1:{user_sshd.port}"
        assert cfg.client_id in clients(user_sshd.data_dir)
        data_version = node.feed(10)
        wait_tip(spec_of(cfg), cfg.client_priv, data_version)
        assert process_leaks(secret_forms(cfg.client_priv)) == []


def _daemon_with_public_address(root: Path) -> CldcbServer:
    port = free_port()
    data = root / "daemon"
    sid = run_server_cmd(data, "init", "--public-address", f"127.0.0.1:{port}").stdout.strip()
    return CldcbServer(data, server_id=sid).start(port)


def test_install_with_a_forced_add_key(root_sshd: PrivateSshd, tmp_path: Path) -> None:
    daemon = _daemon_with_public_address(tmp_path)
    try:
        home = tmp_path / "home"
        public = new_ssh_key(home / ".ssh" / "id_ed25519")  # found as a default key
        (home / ".ssh" / "known_hosts").write_text(
            f"[127.0.0.1]:{root_sshd.port} {root_sshd.host_key}\n")
        forced = " ".join([*SERVER_CMD, "--data-dir", str(daemon.data_dir)])
        root_sshd.authorized_keys.write_text(
            f'restrict,command="{forced} forced --allow add" {public}\n')
        ln = tmp_path / "ln"
        with SimRpcNode(ln, preplay=40) as node:
            done = run_cli(*install_args(ln, f"{root_sshd.user}@127.0.0.1:{root_sshd.port}"),
                           env=client_env(home))
            assert done.returncode == 0, done.stdout + done.stderr
            cfg = read_wrapper(node.network_dir / WRAPPER_NAME)
            assert [(s.address, s.server_id) for s in cfg.servers] == [(daemon.address,
                                                                         daemon.server_id)]
            assert cfg.client_id in clients(daemon.data_dir)
            data_version = node.feed(10)
            wait_tip(spec_of(cfg), cfg.client_priv, data_version)
            leaks = process_leaks(secret_forms(cfg.client_priv, node_secret()))
            assert leaks == []

        # the same kind of key to a server with no public address: the client's key
        # cannot be authorized from here, so the line is shown and nothing installed
        forced = " ".join([*SERVER_CMD, "--data-dir", str(root_sshd.data_dir)])
        root_sshd.authorized_keys.write_text(
            f'restrict,command="{forced} forced --allow add" {public}\n')
        ln2 = tmp_path / "ln2"
        with SimRpcNode(ln2, preplay=5) as node:
            before = clients(root_sshd.data_dir)
            refused = run_cli(*install_args(ln2, f"{root_sshd.user}@127.0.0.1:"
                                            f"{root_sshd.port}"), env=client_env(home))
            assert refused.returncode != 0
            added = sorted(set(clients(root_sshd.data_dir)) - set(before))
            assert len(added) == 1
            assert f'restrict,command="{forced} stdio --client {added[0]}"' in refused.stdout
            assert "as the server host reported it" in refused.stdout
            assert f"cldcb-server remove {added[0]}" in refused.stderr
            assert "--server" in refused.stderr
            assert not (node.network_dir / WRAPPER_NAME).exists()
            assert not (node.network_dir / "config").exists()
    finally:
        daemon.stop()


def test_an_unknown_or_changed_host_key_changes_nothing(root_sshd: PrivateSshd,
                                                       tmp_path: Path) -> None:
    home = tmp_path / "home"
    public = new_ssh_key(home / ".ssh" / "id_ed25519")
    root_sshd.authorized_keys.write_text(
        f'restrict,command="{root_sshd.server_command()} forced --allow add" {public}\n')
    ln = tmp_path / "ln"
    (ln / "regtest").mkdir(parents=True)
    (ln / "regtest" / "hsm_secret").write_bytes(bytes.fromhex(vector("plain32")["file_hex"]))
    target = f"{root_sshd.user}@127.0.0.1:{root_sshd.port}"
    fp = fingerprint(root_sshd.host_key)
    before_files, before_clients = tree(ln, home), clients(root_sshd.data_dir)

    def unchanged() -> None:
        assert tree(ln, home) == before_files
        assert clients(root_sshd.data_dir) == before_clients

    refused = run_cli(*install_args(ln, target), env=client_env(home))
    assert refused.returncode != 0
    assert fp in refused.stderr and "--accept-host-key" in refused.stderr
    unchanged()

    # --yes answers questions about the node, never "is this the right server"
    refused = run_cli(*install_args(ln, target, "--yes"), env=client_env(home))
    assert refused.returncode != 0 and fp in refused.stderr
    unchanged()

    wrong = "SHA256:" + base64.b64encode(b"\0" * 32).decode().rstrip("=")
    refused = run_cli(*install_args(ln, target, "--accept-host-key", wrong),
                      env=client_env(home))
    assert refused.returncode != 0 and wrong in refused.stderr
    unchanged()

    term = PtyRun.cli(*install_args(ln, target), env=client_env(home))
    term.expect(re.escape(fp))
    term.expect("Type yes if it is the same.*: ")
    term.send("no\n")
    assert term.wait() != 0
    assert "not confirmed" in term.output
    unchanged()

    # a known host showing another key is refused whatever the options
    other = "ssh-ed25519 " + base64.b64encode(
        b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + bytes(range(32))).decode()
    known = home / ".ssh" / "known_hosts"
    known.write_text(f"[127.0.0.1]:{root_sshd.port} {other}\n")
    before_files = tree(ln, home)
    refused = run_cli(*install_args(ln, target, "--accept-host-key", fp, "--yes"),
                      env=client_env(home))
    assert refused.returncode != 0 and "NOT the one in known_hosts" in refused.stderr
    unchanged()


def test_install_through_a_socks5_proxy_to_onion_addresses(root_sshd: PrivateSshd,
                                                            tmp_path: Path) -> None:
    """``install --proxy``: the setup login and the plugin's backups both go through the
    proxy by name (the onion names resolve nowhere else), the host keys are checked as
    ever, and the wrapper records the daemon's onion public address with its route."""
    from socks5 import ATYP_DOMAIN, RecordingSocks5

    from cldcb.proxy import PROXIED

    setup_onion = "cldcbsetuphostxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.onion"
    backup_onion = "cldcbbackupxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.onion"
    port = free_port()
    data = tmp_path / "daemon"
    sid = run_server_cmd(data, "init", "--public-address",
                         f"{backup_onion}:29735").stdout.strip()
    daemon = CldcbServer(data, server_id=sid).start(port)
    try:
        home = tmp_path / "home"
        public = new_ssh_key(home / ".ssh" / "id_ed25519")
        (home / ".ssh" / "known_hosts").write_text(f"{setup_onion} {root_sshd.host_key}\n")
        forced = " ".join([*SERVER_CMD, "--data-dir", str(data)])
        root_sshd.authorized_keys.write_text(
            f'restrict,command="{forced} forced --allow add" {public}\n')
        with RecordingSocks5({setup_onion: ("127.0.0.1", root_sshd.port),
                              backup_onion: ("127.0.0.1", port)}) as proxy:
            ln = tmp_path / "ln"
            with SimRpcNode(ln, preplay=40) as node:
                done = run_cli(*install_args(ln, f"{root_sshd.user}@{setup_onion}",
                                             "--proxy", proxy.url), env=client_env(home))
                assert done.returncode == 0, done.stdout + done.stderr
                assert f"via {proxy.url}" in done.stdout
                cfg = read_wrapper(node.network_dir / WRAPPER_NAME)
                assert [(s.address, s.server_id, s.proxy) for s in cfg.servers] == [
                    (f"{backup_onion}:29735", sid, proxy.url)]
                assert cfg.outage_limit == PROXIED.outage_limit
                data_version = node.feed(10)
                wait_tip(cfg.specs()[0], cfg.client_priv, data_version)
            assert {(r.atyp, r.host) for r in proxy.requests} == {
                (ATYP_DOMAIN, setup_onion), (ATYP_DOMAIN, backup_onion)}
    finally:
        daemon.stop()


def test_install_writes_where_sshds_authorized_keys_file_says(test_user: SshUser,
                                                              tmp_path: Path) -> None:
    """sshd reads keys from ``<folder>/%u``, not ~/.ssh/authorized_keys: install asks sshd
    (its config, as the account cannot run ``sshd -T``) and adds the client's line there."""
    keys = test_user.base / "keys"
    keys.mkdir(exist_ok=True)
    user_file = keys / test_user.name
    home = tmp_path / "home"
    user_file.write_text(new_ssh_key(home / ".ssh" / "id_ed25519") + "\n")
    entry = pwd.getpwnam(test_user.name)
    os.chown(user_file, entry.pw_uid, entry.pw_gid)
    srv = PrivateSshd(test_user.base / "sshd-akf", user=test_user.name,
                      authorized_keys_file=f"{keys}/%u").init()
    for dirpath, _, files in os.walk(srv.data_dir):
        os.chown(dirpath, entry.pw_uid, entry.pw_gid)
        for f in files:
            os.chown(Path(dirpath) / f, entry.pw_uid, entry.pw_gid)
    srv.start()
    try:
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{srv.port} {srv.host_key}\n")
        ln = tmp_path / "ln"
        with SimRpcNode(ln, preplay=20) as node:
            done = run_cli(*install_args(ln, f"{test_user.name}@127.0.0.1:{srv.port}",
                                         "--server-command", srv.server_command()),
                           env=client_env(home))
            assert done.returncode == 0, done.stdout + done.stderr
            cfg = read_wrapper(node.network_dir / WRAPPER_NAME)
            line = authorized_keys_line(cfg.client_priv, cfg.client_id, srv.server_command())
            assert line in user_file.read_text().splitlines()
            assert str(user_file) in done.stdout
            assert not (test_user.home / ".ssh" / "authorized_keys").exists() or line not in \
                (test_user.home / ".ssh" / "authorized_keys").read_text()
            wait_tip(spec_of(cfg), cfg.client_priv, node.feed(5))
    finally:
        srv.stop()
