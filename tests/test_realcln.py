"""The whole path on a real Core Lightning: install, back up, crash, recover.

Each test runs real ``lightningd`` nodes (``tests/realcln.py``; skipped without
one, failed under ``CI=true``), the real ``cldcb-client`` and ``cldcb-server``
programs, and asserts on the real database with the ``sqlite3`` program's
``.dump``: a recovered database must be byte-identical to the one lightningd
left, and a node restarted on it must be the same node with the same state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.installkit import client_env, run_cli
from helpers.realcln import NETWORK, RealCln, RealNode, data_version, dump, wait_for
from helpers.servers import CldcbServer, PrivateSshd, _write_key

from cldcb.node.keyfile import read_client_key
from cldcb.node.rpc import RpcError, RpcTransportError

pytestmark = [pytest.mark.realcln, pytest.mark.slow]


@dataclass
class Server:
    """One backup server as the client's command line names it."""

    address: str
    server_id: str
    host_key: str | None = None

    def args(self) -> list[str]:
        args = ["--server", self.address, "--server-id", self.server_id]
        return args + (["--host-key", self.host_key] if self.host_key else [])


def daemon_server(server: CldcbServer) -> Server:
    return Server(server.address, server.server_id)


class Client:
    """``cldcb-client`` with a test HOME, and one client key."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.key = root / "client.key"
        self.ok("newclient", str(self.key))
        self.priv, self.client_id = read_client_key(self.key)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=client_env(self.home), timeout=timeout)

    def ok(self, *args: str, timeout: float = 300) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"cldcb-client {args[0]} failed:\n{done.stdout}" \
                                     f"\n{done.stderr}"
        return done.stdout + done.stderr

    def installplugin(self, node: RealNode, servers: list[Server], *extra: str) -> str:
        args = ["installplugin", "--lightning-dir", str(node.lightning_dir), "--network",
                NETWORK, "--client-privkey", str(self.key), "--yes"]
        for s in servers:
            args += s.args()
        if not node.running():
            args += ["--hsm-secret", str(node.network_dir / "hsm_secret")]
        return self.ok(*args, *extra)

    def recover(self, lightning_dir: Path, servers: list[Server], *extra: str) -> str:
        args = ["recover", "--lightning-dir", str(lightning_dir), "--network", NETWORK, "--yes"]
        for s in servers:
            args += s.args()
        return self.ok(*args, *extra)

    def status(self, node: RealNode) -> subprocess.CompletedProcess[str]:
        return self.run("status", "--lightning-dir", str(node.lightning_dir), "--network",
                        NETWORK, "--json", timeout=60)


def wipe_but_hsm_secret(node: RealNode) -> None:
    """The machine is lost: everything of the node goes but ``hsm_secret``."""
    assert not node.running()
    secret = (node.network_dir / "hsm_secret").read_bytes()
    shutil.rmtree(node.lightning_dir)
    node.network_dir.mkdir(parents=True)
    (node.network_dir / "hsm_secret").write_bytes(secret)
    (node.network_dir / "hsm_secret").chmod(0o400)


def recover_and_compare(client: Client, node: RealNode, servers: list[Server],
                        *extra: str) -> str:
    """Wipe the stopped node, recover it, and check the database is the one it left."""
    before = dump(node.database)
    wipe_but_hsm_secret(node)
    out = client.recover(node.lightning_dir, servers, *extra)
    after = dump(node.database)
    assert after == before, "the recovered database differs from the one lightningd left"
    return out


def daemon_for_client(tmp_path: Path, *add_options: str) -> tuple[CldcbServer, Client]:
    """A running ``cldcb-server serve`` and a new client registered on it."""
    server = CldcbServer(tmp_path / "server").init()
    client = Client(tmp_path / "client")
    server.add(client.client_id, *add_options)
    return server.start(), client


def backed_up_in_step(client: Client, node: RealNode, servers: int = 1) -> dict:
    """``status --json`` once the plugin says every server holds the newest change."""
    def check() -> dict | None:
        done = client.status(node)
        report = json.loads(done.stdout) if done.stdout.strip() else None
        return report if done.returncode == 0 else None
    return wait_for(f"status to report {servers} server(s) in step", check, timeout=60,
                    every=0.5)


def test_installplugin_on_a_running_node_then_recover(realcln: RealCln, tmp_path: Path) -> None:
    """installplugin on a running node, a real workload, stop, lose everything but
    hsm_secret, recover: byte-identical; lightningd on the recovered folder is the same
    node with the same invoices, and its backups go on."""
    server, client = daemon_for_client(tmp_path)
    try:
        node = realcln.node("a").start()
        node_id = node.node_id()
        out = client.installplugin(node, [daemon_server(server)])
        assert "hold the first snapshot" in out, out
        node.workload("w1")
        address = node.newaddr()
        height = realcln.chain.mine(3, address)
        node.wait_blockheight(height)
        node.workload("w2", rounds=4)
        invoices = {i["label"]: i["payment_hash"] for i in node.call("listinvoices")["invoices"]}
        assert node.stop() == 0
        dv = data_version(node.database)
        out = recover_and_compare(client, node, [daemon_server(server)])
        assert f"data_version {dv}," in out, out
        node.start()
        assert node.node_id() == node_id
        again = {i["label"]: i["payment_hash"] for i in node.call("listinvoices")["invoices"]}
        assert again == invoices
        node.call("invoice", amount_msat=5000, label="after-recovery", description="x")
        report = backed_up_in_step(client, node)
        (entry,) = report["servers"]
        assert entry["newest_data_version"] == data_version(node.database) > dv
        assert node.stop() == 0
    finally:
        server.stop()


def test_plugin_configured_before_the_very_first_start(realcln: RealCln,
                                                      tmp_path: Path) -> None:
    """The wrapper and important-plugin are in place before lightningd ever ran: the
    calls before init (schema, migrations) are the start of the backup's chain."""
    server, client = daemon_for_client(tmp_path, "--append-only")  # keep every generation
    try:
        node = realcln.node("fresh", developer=False)
        (node.network_dir / "hsm_secret").write_bytes(os.urandom(32))
        (node.network_dir / "hsm_secret").chmod(0o400)
        client.installplugin(node, [daemon_server(server)])
        assert not node.database.exists()
        node.start()
        node.workload("first")
        assert node.stop() == 0
        # The chain starts at the first hook call: the first snapshot is of the empty
        # database, and the records after it begin with data_version 1.
        from cldcb.store.fs import OsFileLayer
        from cldcb.store.log import segment_records
        from cldcb.store.snapshots import read_info, snapshot_path
        folder = server.data_dir / "clients" / client.client_id
        first = read_info(OsFileLayer(), snapshot_path(folder / "snapshots", 1), 1)
        records, _ = segment_records(folder / "log" / f"{1:010d}.log")
        assert first.data_version == 0 and records[0].data_version == 1
        recover_and_compare(client, node, [daemon_server(server)])
    finally:
        server.stop()


def _keep_writing(node: RealNode, stop: threading.Event, done: list[int]) -> None:
    """datastore calls until ``stop`` or lightningd goes away (for a crash mid-work)."""
    i = 0
    while not stop.is_set():
        try:
            node.call("datastore", key=["crash", str(i)], string="x" * (i % 500))
        except (RpcError, RpcTransportError, OSError):
            return
        done.append(i)
        i += 1


def test_lightningd_killed_mid_workload_over_sshd(realcln: RealCln, tmp_path: Path) -> None:
    """Through a real sshd's cldcb Subsystem: lightningd SIGKILLed in the middle of a
    workload, restarted, more work; recovery is identical to the final database."""
    sshd = PrivateSshd(tmp_path / "sshd").init()
    client = Client(tmp_path / "client")
    sshd.add(client.client_id)
    sshd.authorize_client(client.priv, client.client_id, forced=False)
    # The operator's own SSH key (found by recover as ~/.ssh/id_ed25519) lists the
    # recognition entries anonymously.
    (client.home / ".ssh").mkdir(mode=0o700)
    sshd.authorize_line(_write_key(client.home / ".ssh" / "id_ed25519") + " operator")
    sshd.start()
    servers = [Server(sshd.address(), sshd.server_id, sshd.host_key)]
    try:
        node = realcln.node("a").start()
        client.installplugin(node, servers)
        stop, done = threading.Event(), []
        writer = threading.Thread(target=_keep_writing, args=(node, stop, done))
        writer.start()
        wait_for("40 writes", lambda: len(done) >= 40, timeout=120)
        node.kill()
        stop.set()
        writer.join(60)
        assert not writer.is_alive()
        killed_at = data_version(node.database)
        node.start()
        node.workload("after-crash", rounds=5)
        assert data_version(node.database) > killed_at
        assert node.stop() == 0
        recover_and_compare(client, node, servers)
    finally:
        sshd.stop()


def test_server_hung_longer_than_the_outage_limit_stops_lightningd(
        realcln: RealCln, tmp_path: Path) -> None:
    """With the only server hung for longer than --outage-limit, lightningd stops
    without committing the change the server never acknowledged; the database ends at
    the newest record the server holds. Server back, node restarted: backups go on."""
    server, client = daemon_for_client(tmp_path)
    try:
        node = realcln.node("a").start()
        client.installplugin(node, [daemon_server(server)], "--outage-limit", "3")
        node.workload("before")
        backed_up_in_step(client, node)
        # The server hangs (its connection stays up, it stores and answers nothing),
        # then dies without ever having stored what it was sent.
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises((RpcError, RpcTransportError)):
                node.call("datastore", key=["outage"], string="never committed")
            node.wait_exit(60)
        finally:
            server.stop(signal.SIGKILL)
        server.start()
        report = json.loads(client.status(node).stdout)
        (entry,) = report["servers"]
        assert data_version(node.database) == entry["newest_data_version"]
        node.start()
        node.call("datastore", key=["outage"], string="committed now")
        backed_up_in_step(client, node)
        assert node.stop() == 0
        recover_and_compare(client, node, [daemon_server(server)])
    finally:
        server.stop()


def test_two_servers_quorum_one_with_one_down(realcln: RealCln, tmp_path: Path) -> None:
    """Quorum 1 of 2: with one server down the node keeps working; back, it is caught
    up; recovery from both uses the newest and names the one that was behind."""
    up = CldcbServer(tmp_path / "up").init()
    flaky = CldcbServer(tmp_path / "flaky").init()
    client = Client(tmp_path / "client")
    for s in (up, flaky):
        s.add(client.client_id)
        s.start()
    servers = [daemon_server(up), daemon_server(flaky)]
    try:
        node = realcln.node("a").start()
        client.installplugin(node, servers, "--quorum", "1")
        flaky.stop(signal.SIGKILL)
        node.workload("one-down")           # commits while one server is down
        flaky.start()
        def caught_up() -> bool:
            node.call("datastore", key=["nudge"], string="x", mode="create-or-replace")
            done = client.status(node)
            return done.returncode == 0
        wait_for("the returning server to catch up", caught_up, timeout=120, every=1.0)
        report = json.loads(client.status(node).stdout)
        newest = {e["newest_data_version"] for e in report["servers"]}
        assert newest == {data_version(node.database)}
        # Down again for the last changes: recovery must use the other one.
        flaky.stop(signal.SIGKILL)
        node.workload("last", rounds=3)
        assert node.stop() == 0
        flaky.start()
        out = recover_and_compare(client, node, servers)
        assert f"{up.address} ({up.server_id[:14]}…): USED" in out, out
        assert f"{flaky.address} ({flaky.server_id[:14]}…): stale: " in out, out
    finally:
        up.stop()
        flaky.stop()


def _pay(payer: RealNode, payee: RealNode, msat: int, label: str) -> None:
    bolt11 = payee.call("invoice", amount_msat=msat, label=label, description=label)["bolt11"]
    result = payer.call("pay", bolt11=bolt11)
    assert result["status"] == "complete", result


def _channel(node: RealNode) -> dict:
    (channel,) = node.call("listpeerchannels")["channels"]
    return channel


def _settled(*nodes: RealNode) -> dict:
    """A's channel once no HTLC is in flight on either side (``pay`` returns when the
    preimage is known, before the commitments are updated)."""
    for n in nodes:
        wait_for(f"{n.name}'s channel to have no HTLC in flight",
                 lambda n=n: not _channel(n)["htlcs"], timeout=60)
    return _channel(nodes[0])


def test_channel_survives_a_lost_node(realcln: RealCln, tmp_path: Path) -> None:
    """Two nodes with a real channel; payments both ways; A killed right after its last
    payment (its commitments still being updated), A's folder lost but hsm_secret,
    recovered: the channel is back in CHANNELD_NORMAL with every payment in its balance,
    and payments go both ways again (a state one update behind would lose the channel)."""
    server, client = daemon_for_client(tmp_path)
    try:
        a = realcln.node("a").start()
        b = realcln.node("b").start()
        client.installplugin(a, [daemon_server(server)])
        height = realcln.chain.mine(101, a.newaddr())
        a.wait_blockheight(height)
        b.wait_blockheight(height)
        a.call("connect", id=b.node_id(), host="127.0.0.1", port=b.port)
        funding = 1_000_000_000       # msat: A funds the channel and owns all of it
        a.call("fundchannel", id=b.node_id(), amount=funding // 1000)
        height = realcln.chain.mine(6)
        for n in (a, b):
            wait_for(f"{n.name}'s channel to be normal",
                     lambda n=n: _channel(n)["state"] == "CHANNELD_NORMAL", timeout=120)
        paid = 0                      # what A paid B, net
        for i in range(5):
            _pay(a, b, 10_000_000 + i, f"ab{i}")
            paid += 10_000_000 + i
        for i in range(3):
            _pay(b, a, 1_000_000 + i, f"ba{i}")
            paid -= 1_000_000 + i
        _pay(a, b, 3_000_000, "ab-last")
        paid += 3_000_000
        a.kill()      # at once: A's last commitment updates may be under way
        wipe_but_hsm_secret(a)
        client.recover(a.lightning_dir, [daemon_server(server)])
        a.start()
        a.call("connect", id=b.node_id(), host="127.0.0.1", port=b.port)
        for n in (a, b):
            wait_for(f"{n.name}'s channel to be normal and connected again",
                     lambda n=n: (_channel(n)["state"] == "CHANNELD_NORMAL"
                                  and _channel(n)["peer_connected"]), timeout=120)
        assert _settled(a, b)["to_us_msat"] == funding - paid
        _pay(a, b, 2_000_000, "ab-after")
        _pay(b, a, 1_500_000, "ba-after")
        assert _settled(a, b)["to_us_msat"] == funding - paid - 2_000_000 + 1_500_000
        a.stop()
        b.stop()
    finally:
        server.stop()
