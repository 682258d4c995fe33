"""Faults between the plugin and the server: delays, cuts and resets at random points.

The real plugin (under the simulated lightningd playing a real trace, then
under a real lightningd) talks to a real ``cldcb-server serve`` through
:class:`faultproxy.FaultProxy`, which stalls, cuts (FIN both ways) and resets
(RST) its connections at byte offsets drawn from ``random.Random(seed)``. No
duplication: through SSH a duplicated byte is a MAC failure, i.e. a cut.

After each run: every change lightningd committed is held by the server (its
newest data_version is the database's), and the real ``cldcb-client recover``
(straight to the server) writes a database whose ``sqlite3 .dump`` is
byte-identical to the node's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo import NETWORK, Target, client, dump, install_client, play
from helpers.faultproxy import FaultProxy
from helpers.realcln import RealCln, data_version
from helpers.servers import CldcbServer
from test_realcln import Client, Server, daemon_server, recover_and_compare

from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.session import Role
from cldcb.node.nodekey import LocalNodeKey
from cldcb.transport.connection import Connection

pytestmark = pytest.mark.timeout(300)

#: (seed, trace, calls played, fault window in bytes): a few seeds, short enough for the
#: whole file to take about a minute; each window is within the run's traffic
RUNS = [(1, "cln-workload", 400, 200_000), (2, "cln-crash-restart", None, 30_000),
        (3, "cln-channels", 500, 200_000), (4, "cln-workload", 200, 60_000)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CldcbServer]:
    srv = CldcbServer(tmp_path_factory.mktemp("faults") / "data").init().start()
    yield srv
    srv.stop()


def held_data_version(server: CldcbServer, client_priv: bytes) -> int | None:
    async def body() -> int | None:
        async with await Connection.open(server.spec, client_priv, Role.READER) as conn:
            st = await conn.status()
            return st.tip_data_version if st.has_tip else None

    return asyncio.run(asyncio.wait_for(body(), 60))


def recover_and_dump(server: CldcbServer, hsm_secret: bytes, where: Path) -> bytes:
    network_dir = where / NETWORK
    network_dir.mkdir(parents=True)
    (network_dir / "hsm_secret").write_bytes(hsm_secret)
    done = client("recover", "--lightning-dir", str(where), "--network", NETWORK,
                  "--server", server.address, "--server-id", server.server_id, "--yes")
    assert done.returncode == 0, done.stderr
    return dump(network_dir / "lightningd.sqlite3")


@pytest.mark.parametrize(("seed", "trace", "calls", "window"), RUNS,
                         ids=[f"seed{r[0]}" for r in RUNS])
def test_a_trace_through_faults(seed: int, trace: str, calls: int | None, window: int,
                                server: CldcbServer, tmp_path: Path) -> None:
    rng = random.Random(seed)
    hsm_secret = rng.randbytes(32)
    node = LocalNodeKey.from_hsm_secret_bytes(hsm_secret)
    client_priv = new_privkey()
    server.add(client_id_from_pubkey(pubkey_of(client_priv)))
    proxy = FaultProxy(server.port, seed, faults=4, window=window).start()
    try:
        lightning_dir = tmp_path / "node"
        (lightning_dir / NETWORK).mkdir(parents=True)
        (lightning_dir / NETWORK / "hsm_secret").write_bytes(hsm_secret)
        install_client(lightning_dir / NETWORK, node,
                       [Target(proxy.address, server.server_id)], client_priv)
        proxy.arm()
        committed = play(lightning_dir, trace, stop=calls)
    finally:
        proxy.stop()
    assert len(proxy.events) >= 2, proxy.events            # the faults did happen
    assert held_data_version(server, client_priv) == committed, proxy.events
    node_dump = dump(lightning_dir / NETWORK / "lightningd.sqlite3")
    assert recover_and_dump(server, hsm_secret, tmp_path / "recovered") == node_dump, \
        proxy.events


@pytest.mark.realcln
def test_a_real_lightningd_through_cuts(realcln: RealCln, tmp_path: Path) -> None:
    """A real lightningd's workload through the proxy, its connections cut and reset a
    few times; after stop, the server holds its data_version and recovery is identical."""
    server = CldcbServer(tmp_path / "server").init()
    client_ = Client(tmp_path / "client")
    server.add(client_.client_id)
    server.start()
    proxy = FaultProxy(server.port, 7, faults=2, window=20_000, kinds=("cut", "reset"))
    proxy.start()
    try:
        node = realcln.node("a").start()
        client_.installplugin(node, [Server(proxy.address, server.server_id)])
        proxy.arm()
        proxy.cut_all()                          # the connection installplugin saw made
        node.workload("w1")
        node.workload("w2", rounds=6)
        assert node.stop() == 0
        assert len(proxy.events) >= 3, proxy.events
        assert held_data_version(server, client_.priv) == data_version(node.database)
        recover_and_compare(client_, node, [daemon_server(server)])
    finally:
        proxy.stop()
        server.stop()
