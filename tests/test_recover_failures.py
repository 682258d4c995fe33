"""Each per-server failure of ``recover`` says what it is and what to do (real servers).

An sshd without the ``Subsystem cldcb`` line, a login refused, a refused connection, a
server whose id does not match, and a server that answers but holds nothing of this node:
each gets its own message and advice, the final error does not call a failure "no backup",
and nothing like "Future exception was never retrieved" appears.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from demo import NETWORK, client
from helpers.servers import CldcbServer, PrivateSshd, _write_key, free_port
from test_recover_e2e import fresh_node, recover_args

pytestmark = pytest.mark.timeout(300)


@dataclass
class Servers:
    sshd: PrivateSshd
    daemon: CldcbServer
    operator_key: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("failures")
    operator_key = root / "operator_key"
    pub = _write_key(operator_key)
    sshd = PrivateSshd(root / "sshd", subsystem=False).init()
    sshd.authorize_line(pub)
    sshd.start()
    try:
        daemon = CldcbServer(root / "daemon").init().start()
        try:
            yield Servers(sshd, daemon, operator_key)
        finally:
            daemon.stop()
    finally:
        sshd.stop()


def recover(tmp_path: Path, *server_args: str) -> tuple[str, str]:
    """Run recover on a fresh node; (everything printed, the final error line)."""
    r = client(*recover_args(fresh_node(tmp_path, "mn_nopass"), *server_args))
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "never retrieved" not in out, out
    assert not any(p.name == "lightningd.sqlite3" for p in (tmp_path / "lightning" /
                                                            NETWORK).iterdir())
    return out, r.stderr.strip().splitlines()[-1]


def sshd_args(s: Servers, key: Path) -> list[str]:
    return ["--server", s.sshd.address(), "--server-id", s.sshd.server_id,
            "--host-key", s.sshd.host_key, "--ssh-key", str(key)]


def test_sshd_without_the_subsystem(servers: Servers, tmp_path: Path) -> None:
    out, error = recover(tmp_path, *sshd_args(servers, servers.operator_key))
    assert "Subsystem cldcb" in error
    assert "no server holds" not in error and "hsm_secret" not in error


def test_operator_login_refused(servers: Servers, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    _write_key(other)
    out, error = recover(tmp_path, *sshd_args(servers, other))
    assert "refused our SSH login" in error and "--ssh-key" in error
    assert "cldcb-server add" not in out and "hsm_secret" not in error


def test_connection_refused(servers: Servers, tmp_path: Path) -> None:
    out, error = recover(tmp_path, "--server", f"127.0.0.1:{free_port()}",
                         "--server-id", servers.daemon.server_id)
    assert "cannot connect" in error and "that the server is running" in error
    assert "hsm_secret" not in error


def test_server_id_of_another_server(servers: Servers, tmp_path: Path) -> None:
    out, error = recover(tmp_path, "--server", servers.daemon.address,
                         "--server-id", servers.sshd.server_id)
    assert "--server-id" in error and "hsm_secret" not in error


def test_reachable_but_no_backup_of_this_node(servers: Servers, tmp_path: Path) -> None:
    out, error = recover(tmp_path, "--server", servers.daemon.address,
                         "--server-id", servers.daemon.server_id,
                         "--server", f"127.0.0.1:{free_port()}",
                         "--server-id", servers.sshd.server_id)
    assert f"{servers.daemon.address} answered but holds no backup of node" in error
    assert "hsm_secret" in error and "cannot connect" in error
