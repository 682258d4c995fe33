"""A client's settings change only by the operator's explicit word (DESIGN section 11).

``add`` registers; on an existing client it changes nothing unless the operator
gives options at the server's own shell, and through a setup key (``forced
--allow add``) never. ``set`` changes settings and is never reachable through
``forced``; lifting append-only is logged. Real sshd, real processes.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from helpers.servers import PrivateSshd, run_server_cmd
from test_transports import new_client, upload_snapshot

from cldcb.core.session import Role
from cldcb.transport.connection import Connection

SETTINGS_KEYS = ("quota", "append_only", "generations")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    srv = PrivateSshd(tmp_path_factory.mktemp("sshd")).init().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def setup_key(sshd: PrivateSshd) -> asyncssh.SSHKey:
    """An operator's setup key that may only register clients."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    sshd.authorize_line(f'restrict,command="{sshd.server_command()} forced --allow add" '
                        + key.export_public_key().decode())
    return key


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


def through_setup_key(sshd: PrivateSshd, key: asyncssh.SSHKey,
                      command: str) -> asyncssh.SSHCompletedProcess:
    async def body() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect("127.0.0.1", sshd.port, username=sshd.user,
                                    client_keys=[key], agent_path=None,
                                    known_hosts=([asyncssh.import_public_key(sshd.host_key)],
                                                 [], [])) as conn:
            return await conn.run(command, check=False)

    return run(body())


def settings_of(data_dir: Path, client_id: str) -> dict[str, object]:
    listed = json.loads(run_server_cmd(data_dir, "list", "--json").stdout)
    (c,) = [c for c in listed if c["client_id"] == client_id]
    return {k: c[k] for k in SETTINGS_KEYS}


def snapshot_files(data_dir: Path, client_id: str) -> list[str]:
    return sorted(p.name for p in (data_dir / "clients" / client_id / "snapshots").glob("*.snap"))


def upload_fresh(sshd: PrivateSshd, priv: bytes, data_version: int) -> None:
    async def body() -> None:
        async with await Connection.open(sshd.spec(), priv, Role.WRITER) as conn:
            ack = await upload_snapshot(conn, priv, data_version, os.urandom(32),
                                        [os.urandom(2000)])
            assert ack.data_version == data_version

    run(body())


def test_a_setup_key_re_adding_a_client_changes_nothing(sshd: PrivateSshd,
                                                        setup_key: asyncssh.SSHKey) -> None:
    priv, cid = new_client()
    added = json.loads(run_server_cmd(sshd.data_dir, "add", cid, "--append-only", "--quota",
                                      "10MiB", "--generations", "3", "--json").stdout)
    assert added["already_registered"] is False
    sshd.authorize_client(priv, cid, forced=True)
    before = settings_of(sshd.data_dir, cid)
    assert before == {"quota": 10 * 1024**2, "append_only": True, "generations": 3}
    upload_fresh(sshd, priv, 4)
    upload_fresh(sshd, priv, 10)

    res = through_setup_key(sshd, setup_key, f"cldcb-server add {cid} --json")
    assert res.exit_status == 0, res.stderr
    answer = json.loads(str(res.stdout))
    assert answer["already_registered"] is True and answer["client_id"] == cid
    assert answer["server_id"] == sshd.server_id
    assert {k: answer[k] for k in SETTINGS_KEYS} == before
    assert set(answer) == set(added)                  # the same --json shape
    assert settings_of(sshd.data_dir, cid) == before
    # a further snapshot: append-only, so all three generations are still there
    upload_fresh(sshd, priv, 20)
    assert len(snapshot_files(sshd.data_dir, cid)) == 3
    assert settings_of(sshd.data_dir, cid) == before


def test_forced_refuses_set_and_any_option_on_add(sshd: PrivateSshd,
                                                  setup_key: asyncssh.SSHKey) -> None:
    _, cid = new_client()
    run_server_cmd(sshd.data_dir, "add", cid, "--append-only", "--quota", "1MiB")
    before = settings_of(sshd.data_dir, cid)
    for cmd in (f"cldcb-server set {cid} --no-append-only", f"cldcb-server set {cid}",
                f"cldcb-server add {cid} --generations 1", f"cldcb-server add {cid} --quota 0",
                f"cldcb-server add {cid} --append-only", f"cldcb-server add --json {cid} -q"):
        res = through_setup_key(sshd, setup_key, cmd)
        assert res.exit_status != 0, cmd
        assert str(res.stderr).startswith("error: "), (cmd, res.stderr)
    assert settings_of(sshd.data_dir, cid) == before
    refused = run_server_cmd(sshd.data_dir, "forced", "--allow", "add,set", check=False)
    assert refused.returncode != 0 and refused.stderr.startswith("error: ")
    assert settings_of(sshd.data_dir, cid) == before


def test_add_at_the_shell_changes_only_the_options_given(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_server_cmd(data, "init")
    _, cid = new_client()
    run_server_cmd(data, "add", cid, "--append-only", "--quota", "1MiB", "--generations", "4")
    again = run_server_cmd(data, "add", cid)
    assert "already registered" in again.stdout
    assert settings_of(data, cid) == {"quota": 1024**2, "append_only": True, "generations": 4}
    run_server_cmd(data, "add", cid, "--quota", "2MiB")
    assert settings_of(data, cid) == {"quota": 2 * 1024**2, "append_only": True,
                                      "generations": 4}


def test_set_changes_settings_and_lifting_append_only_is_logged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_server_cmd(data, "init")
    _, cid = new_client()
    run_server_cmd(data, "add", cid, "--append-only", "--quota", "1MiB", "--generations", "4")
    res = run_server_cmd(data, "set", cid, "--generations", "5", "--json")
    assert json.loads(res.stdout)["generations"] == 5
    assert settings_of(data, cid) == {"quota": 1024**2, "append_only": True, "generations": 5}
    assert "append-only" not in res.stderr
    res = run_server_cmd(data, "set", cid, "--no-append-only", "--quota", "0")
    assert settings_of(data, cid) == {"quota": None, "append_only": False, "generations": 5}
    assert "append-only lifted" in res.stderr and cid in res.stderr
    history = (data / "clients" / cid / "settings.history").read_text().splitlines()
    entries = [json.loads(line) for line in history]
    assert entries[-1]["old"]["append_only"] is True and entries[-1]["new"]["append_only"] is False
    assert entries[-1]["by"] == "set" and len(entries) == 3  # registered, generations, lifted
    unknown = run_server_cmd(data, "set", new_client()[1], "--quota", "1", check=False)
    assert unknown.returncode != 0 and "not registered" in unknown.stderr
    nothing = run_server_cmd(data, "set", cid, check=False)
    assert nothing.returncode != 0 and nothing.stderr.startswith("error: ")


def test_damaged_settings_are_replaced_only_by_a_full_set(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_server_cmd(data, "init")
    _, cid = new_client()
    run_server_cmd(data, "add", cid, "--append-only")
    (data / "clients" / cid / "settings.json").write_text("{not json")
    partial = run_server_cmd(data, "set", cid, "--quota", "1MiB", check=False)
    assert partial.returncode != 0 and "--generations N" in partial.stderr
    assert (data / "clients" / cid / "settings.json").read_text() == "{not json"
    run_server_cmd(data, "set", cid, "--quota", "1MiB", "--append-only", "--generations", "3")
    assert settings_of(data, cid) == {"quota": 1024**2, "append_only": True, "generations": 3}
    last = json.loads((data / "clients" / cid / "settings.history").read_text()
                      .splitlines()[-1])
    assert last["old"] is None and last["new"]["generations"] == 3
