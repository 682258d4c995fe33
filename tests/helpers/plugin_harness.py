"""Shared pieces of the plugin tests.

Real processes only: servers from :mod:`helpers.servers` (``cldcb-server serve``
or a private OpenSSH sshd, on 127.0.0.1, started and stopped by pid), the
real ``cldcb-plugin`` started by the simulated lightningd through its
generated wrapper, real SQLite files. What the servers hold is fetched as the
client, unsealed with the node key, verified and rebuilt by
:func:`cldcb.node.restore.rebuild`, then dumped with the ``sqlite3`` program.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cldcb.core import wire
from cldcb.core.ids import client_id_from_pubkey, new_privkey, node_id_from_pubkey, pubkey_of
from cldcb.core.session import Role
from cldcb.node.nodekey import LocalNodeKey
from cldcb.node.restore import Rebuilt, rebuild
from cldcb.plugin.wrapper import ServerEntry, WrapperConfig, default_plugin_path, write_wrapper
from cldcb.transport.connection import Connection, ServerSpec
from helpers.servers import CldcbServer, PrivateSshd
from helpers.simlightningd import SimLightningd
from helpers.traces import sqlite_dump

NETWORK = "regtest"


@dataclass(frozen=True)
class Keys:
    client_priv: bytes
    node_priv: bytes

    @property
    def client_pub(self) -> bytes:
        return pubkey_of(self.client_priv)

    @property
    def client_id(self) -> str:
        return client_id_from_pubkey(self.client_pub)

    @property
    def node_id(self) -> str:
        return node_id_from_pubkey(pubkey_of(self.node_priv))

    @property
    def node(self) -> LocalNodeKey:
        return LocalNodeKey(self.node_priv)


def new_keys() -> Keys:
    return Keys(new_privkey(), new_privkey())


@dataclass
class Target:
    """One server as the plugin sees it: the cldcb daemon, or sshd with the subsystem."""

    daemon: CldcbServer | None = None
    sshd: PrivateSshd | None = None

    @classmethod
    def new_daemon(cls, root: Path) -> Target:
        return cls(daemon=CldcbServer(root / "data").init().start())

    @classmethod
    def new_sshd(cls, root: Path) -> Target:
        return cls(sshd=PrivateSshd(root).init().start())

    def register(self, keys: Keys) -> None:
        if self.daemon is not None:
            self.daemon.add(keys.client_id)
        else:
            assert self.sshd is not None
            self.sshd.add(keys.client_id)
            self.sshd.authorize_client(keys.client_priv, keys.client_id, forced=False)

    @property
    def spec(self) -> ServerSpec:
        return self.daemon.spec if self.daemon is not None else self.sshd.spec()  # type: ignore[union-attr]

    @property
    def entry(self) -> ServerEntry:
        if self.daemon is not None:
            return ServerEntry(self.daemon.address, self.daemon.server_id)
        assert self.sshd is not None
        return ServerEntry(self.sshd.address(), self.sshd.server_id, self.sshd.host_key)

    @property
    def pid(self) -> int:
        proc = self.daemon.proc if self.daemon is not None else self.sshd.proc  # type: ignore[union-attr]
        assert proc is not None
        return proc.pid

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()

    def restart(self) -> None:
        assert self.daemon is not None
        self.daemon.start(self.daemon.port)

    def stop(self) -> None:
        if self.daemon is not None:
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                self.daemon.stop()
        elif self.sshd is not None and self.sshd.proc is not None \
                and self.sshd.proc.poll() is None:
            self.sshd.stop()


def make_node(root: Path, keys: Keys, targets: list[Target], *, quorum: int | None = None,
              outage_limit: float = 120, important: bool = True,
              cache_size: int | None = None, env: dict[str, str] | None = None,
              hook_timeout: float = 180.0, mirror: bool = True) -> SimLightningd:
    """A simulated node whose wrapper backs it up to ``targets`` (registered here);
    ``mirror`` False writes ``# mirror = off``."""
    for t in targets:
        t.register(keys)
    ld = root / "lightning"
    (ld / NETWORK).mkdir(parents=True, exist_ok=True)
    wrapper = ld / NETWORK / "cldcb-plugin-wrapper"
    cfg = WrapperConfig(client_id=keys.client_id, client_priv=keys.client_priv,
                        node_id=keys.node_id, servers=tuple(t.entry for t in targets),
                        quorum=quorum, outage_limit=outage_limit,
                        plugin_path=default_plugin_path(), mirror=mirror)
    write_wrapper(wrapper, cfg)
    return SimLightningd(ld, wrapper, network=NETWORK, important=important,
                         cache_size=cache_size, env=dict(env or {}), hook_timeout=hook_timeout)


def run(coro: Any, timeout: float = 300) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _restore(spec: ServerSpec, keys: Keys, out: Path) -> Rebuilt:
    conn = await Connection.open(spec, keys.client_priv, Role.READER)
    try:
        return await rebuild(conn, keys.node, keys.client_pub, out)
    finally:
        await conn.close()


def restore(target: Target, keys: Keys, out: Path) -> Rebuilt:
    """Fetch, unseal with the node key, verify and rebuild what ``target`` holds."""
    if out.exists():
        out.unlink()
    return run(_restore(target.spec, keys, out))


def restored_dump(target: Target, keys: Keys, out: Path) -> str:
    restore(target, keys, out)
    return sqlite_dump(out)


async def _status(spec: ServerSpec, keys: Keys) -> wire.Status:
    conn = await Connection.open(spec, keys.client_priv, Role.READER)
    try:
        return await conn.status()
    finally:
        await conn.close()


def server_status(target: Target, keys: Keys) -> wire.Status:
    return run(_status(target.spec, keys), 60)


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def plugin_status(node: SimLightningd) -> dict[str, Any]:
    return json.loads((node.network_dir / "cldcb-status.json").read_text())


def wait_until(cond: Callable[[], bool], timeout: float, what: str,
               step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def logs_matching(node: SimLightningd, text: str) -> list[str]:
    return [m for m in node.log_messages() if text in m]


def assert_no_stray_copies(node: SimLightningd) -> None:
    left = [p.name for p in node.network_dir.glob(".cldcb-snapshot-*")]
    assert not left, left


def env_without_test_knobs() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CLDCB_PLUGIN_TEST_")}


def make_big_database(path: Path, size_mb: int, data_version: int) -> None:
    """A database shaped like lightningd's (``vars.data_version``) of about ``size_mb`` MiB
    of incompressible rows."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = DELETE")
    con.execute("CREATE TABLE vars (name VARCHAR(32), val VARCHAR(255), intval INTEGER, "
                "blobval BLOB, PRIMARY KEY (name))")
    con.execute("INSERT INTO vars (name, intval) VALUES ('data_version', ?)", (data_version,))
    con.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB)")
    con.execute("BEGIN")
    for i in range(size_mb * 16):
        con.execute("INSERT INTO filler VALUES (?, ?)", (i, os.urandom(65536 - 200)))
    con.execute("COMMIT")
    con.close()
