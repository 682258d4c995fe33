"""Reaching a server through a SOCKS5 proxy (Tor), end to end on 127.0.0.1.

One module-wide world: a ``cldcb-server serve`` daemon, a recording SOCKS5
proxy (``tests/socks5.py``) that maps a fake onion name to the daemon's
loopback port the way Tor maps an onion service, and a node backed up to
``ONION:29735`` through it by the real plugin under the simulated lightningd.
The fake name resolves nowhere but in that proxy, so every connection that
works went through it by name; the proxy's record shows each request was a
SOCKS5 domain-name request (address type 3) for the onion name.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from demo import NETWORK, Target, client, dump, new_node, play
from demo import vector_secret as secret_of
from helpers.servers import CldcbServer, free_port
from helpers.socks5 import ATYP_DOMAIN, Microsocks, RecordingSocks5
from helpers.traces import expected_dump_bytes

from cldcb.core.ids import client_id_from_pubkey, pubkey_of
from cldcb.core.session import Role
from cldcb.errors import AuthError, ExitCode, PluginError, TransportError, UsageError
from cldcb.plugin.wrapper import WRAPPER_NAME, ServerEntry, parse, read_wrapper
from cldcb.transport import proxy as proxy_mod
from cldcb.transport.connection import Connection, ServerAddress, ServerSpec
from cldcb.transport.proxy import DIRECT, PROXIED, TOR_SOCKS, Proxy, route

pytestmark = pytest.mark.timeout(300)
TRACE = "cln-workload"
SECRET = "plain32"
ONION = "cldcbtestonionaddressxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.onion"
ONION_ADDRESS = f"{ONION}:29735"


@dataclass
class World:
    root: Path
    server: CldcbServer
    proxy: RecordingSocks5
    node: Path              # the backed-up node's lightning-dir (kept)
    client_priv: bytes
    original: bytes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("proxy")
    server = CldcbServer(root / "server").init().start()
    proxy = RecordingSocks5({ONION: ("127.0.0.1", server.port)}).start()
    try:
        lightning_dir = root / "node"
        client_priv = new_node(lightning_dir, SECRET, [server],
                               [Target(ONION_ADDRESS, server.server_id, proxy=proxy.url)])
        play(lightning_dir, TRACE)
        original = dump(lightning_dir / NETWORK / "lightningd.sqlite3")
        yield World(root, server, proxy, lightning_dir, client_priv, original)
    finally:
        proxy.stop()
        server.stop()


def fresh_node(tmp_path: Path) -> Path:
    lightning_dir = tmp_path / "lightning"
    (lightning_dir / NETWORK).mkdir(parents=True)
    (lightning_dir / NETWORK / "hsm_secret").write_bytes(
        bytes.fromhex(secret_of(SECRET)["file_hex"]))
    return lightning_dir


def test_plugin_backs_up_through_the_proxy_by_name(world: World) -> None:
    assert world.original == expected_dump_bytes(TRACE)
    assert world.proxy.requests, "the plugin never asked the proxy for a connection"
    assert {(r.atyp, r.host, r.port) for r in world.proxy.requests} == {
        (ATYP_DOMAIN, ONION, 29735)}


def test_status_through_the_proxy_shows_the_route(world: World, tmp_path: Path) -> None:
    node = tmp_path / "ln"
    shutil.copytree(world.node, node)
    before = len(world.proxy.requests)
    done = client("status", "--lightning-dir", str(node), "--network", NETWORK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"server {ONION_ADDRESS} (" in done.stdout
    assert f"via {world.proxy.url}" in done.stdout
    assert "OK: every server holds" in done.stdout
    new = world.proxy.requests[before:]
    assert new and all((r.atyp, r.host) == (ATYP_DOMAIN, ONION) for r in new)


def test_status_says_when_the_proxy_is_not_there(world: World, tmp_path: Path) -> None:
    node = tmp_path / "ln"
    shutil.copytree(world.node, node)
    nobody = f"socks5://127.0.0.1:{free_port()}"
    done = client("status", "--lightning-dir", str(node), "--network", NETWORK,
                  "--proxy", nobody)
    assert done.returncode == ExitCode.OUTAGE
    assert f"cannot reach the SOCKS5 proxy {nobody} to get to {ONION_ADDRESS}" in done.stdout
    assert "UNREACHABLE" in done.stdout


def test_recover_through_the_proxy(world: World, tmp_path: Path) -> None:
    lightning_dir = fresh_node(tmp_path)
    before = len(world.proxy.requests)
    done = client("recover", "--lightning-dir", str(lightning_dir), "--network", NETWORK,
                  "--server", ONION_ADDRESS, "--server-id", world.server.server_id,
                  "--proxy", world.proxy.url, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    network_dir = lightning_dir / NETWORK
    assert dump(network_dir / "lightningd.sqlite3") == world.original
    cfg = read_wrapper(network_dir / WRAPPER_NAME)
    assert cfg.servers == (ServerEntry(ONION_ADDRESS, world.server.server_id, None,
                                       world.proxy.url),)
    assert cfg.outage_limit == PROXIED.outage_limit
    new = world.proxy.requests[before:]
    assert new and all((r.atyp, r.host) == (ATYP_DOMAIN, ONION) for r in new)


def test_the_server_id_pin_holds_through_the_proxy(world: World, tmp_path: Path) -> None:
    """The onion name is a route only: a proxy that hands it to another server (with
    its own key) gets an AuthError, not a session."""
    other = CldcbServer(tmp_path / "other").init().start()
    try:
        with RecordingSocks5({ONION: ("127.0.0.1", other.port)}) as liar:
            spec = ServerSpec(ServerAddress.parse(ONION_ADDRESS), world.server.server_id,
                              proxy=Proxy.parse(liar.url))

            async def attempt() -> None:
                async with await Connection.open(spec, world.client_priv, Role.READER):
                    pass

            with pytest.raises(AuthError, match="its key differs"):
                asyncio.run(attempt())
            assert [r.host for r in liar.requests] == [ONION]
    finally:
        other.stop()


def test_recover_through_microsocks_by_name(world: World, tmp_path: Path) -> None:
    """A real SOCKS5 proxy (Debian's microsocks), which resolves the name it is sent."""
    with Microsocks(tmp_path) as socks:
        lightning_dir = fresh_node(tmp_path)
        done = client("recover", "--lightning-dir", str(lightning_dir), "--network", NETWORK,
                      "--server", f"localhost:{world.server.port}",
                      "--server-id", world.server.server_id, "--proxy", socks.url, "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert dump(lightning_dir / NETWORK / "lightningd.sqlite3") == world.original


def test_unknown_onion_is_a_clear_error(world: World) -> None:
    spec = ServerSpec(ServerAddress.parse("nosuchonionxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                                          ".onion:29735"), world.server.server_id,
                      proxy=Proxy.parse(world.proxy.url))

    async def attempt() -> None:
        async with await Connection.open(spec, world.client_priv, Role.READER):
            pass

    with pytest.raises(TransportError, match=f"the proxy {world.proxy.url} could not connect"):
        asyncio.run(attempt())


# --- the grammar -------------------------------------------------------------------------

def test_onion_goes_through_tor_by_default() -> None:
    assert route("abc.onion", None) == Proxy.parse(TOR_SOCKS) == Proxy("127.0.0.1", 9050)
    assert route("ABC.ONION", None) is not None
    assert route("backup.example", None) is None
    assert route("203.0.113.5", Proxy.parse("socks5://127.0.0.1:9150")) == Proxy(
        "127.0.0.1", 9150)
    spec = ServerSpec(ServerAddress.parse(ONION_ADDRESS), "52" + "00" * 32)
    assert spec.describe_route() == f"via {TOR_SOCKS}"
    assert spec.timeout(15.0) == PROXIED.connect_timeout


@pytest.mark.parametrize("bad", ["socks4://127.0.0.1:9050", "127.0.0.1:9050",
                                 "socks5://127.0.0.1", "socks5://127.0.0.1:99999",
                                 "socks5://user:hunter2@127.0.0.1:9050"])
def test_bad_proxy_is_refused_without_echoing_credentials(bad: str) -> None:
    with pytest.raises(UsageError) as err:
        Proxy.parse(bad)
    assert "socks5://HOST:PORT" in str(err.value)
    assert "hunter2" not in str(err.value)


def _wrapper(server_line: str, extra: str = "") -> str:
    priv = bytes(range(1, 33))
    cid = client_id_from_pubkey(pubkey_of(priv))
    node = secret_of(SECRET)["node_id"]
    return (f"#!/bin/sh\n# cid = {cid}\n# cpk = {priv.hex()}\n# node = {node}\n"
            f"# server = {server_line}\n{extra}exec '/usr/bin/cldcb-plugin' \"$0\"\n")


def test_wrapper_records_the_proxy_per_server() -> None:
    sid = "52" + "02" * 32
    cfg = parse(_wrapper(f"{ONION_ADDRESS} {sid} proxy=socks5://127.0.0.1:9150"))
    assert cfg.servers[0].proxy == "socks5://127.0.0.1:9150"
    assert cfg.specs()[0].route == Proxy("127.0.0.1", 9150)
    assert cfg.outage_limit == PROXIED.outage_limit        # the proxied default
    ssh = parse(_wrapper(f"ssh://cldcb@{ONION}:22 {sid} ssh-ed25519 AAAAC3Nza "
                         "proxy=socks5://127.0.0.1:9050", "# outage-limit = 60\n"))
    assert ssh.servers[0].host_key == "ssh-ed25519 AAAAC3Nza"
    assert ssh.servers[0].line_value().endswith(" proxy=socks5://127.0.0.1:9050")
    assert ssh.outage_limit == 60
    assert parse(_wrapper(f"203.0.113.5:29735 {sid}")).outage_limit == 300
    with pytest.raises(PluginError, match="socks5://HOST:PORT"):
        parse(_wrapper(f"{ONION_ADDRESS} {sid} proxy=http://127.0.0.1:8080"))


def test_onion_without_a_proxy_names_tor_when_nothing_listens(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An onion address with no proxy named goes to Tor's usual SOCKS port (here made a
    free port of this test, where nothing listens): the error says to start Tor."""
    nobody = f"socks5://127.0.0.1:{free_port()}"
    monkeypatch.setattr(proxy_mod, "TOR_SOCKS", nobody)
    spec = ServerSpec(ServerAddress.parse(ONION_ADDRESS), world.server.server_id)
    assert spec.describe_route() == f"via {nobody}"

    async def attempt() -> None:
        async with await Connection.open(spec, world.client_priv, Role.READER):
            pass

    with pytest.raises(TransportError) as err:
        asyncio.run(attempt())
    assert f"cannot reach the SOCKS5 proxy {nobody}" in str(err.value)
    assert "is Tor running" in str(err.value) and "--proxy" in str(err.value)


def test_reconnection_through_a_proxy_backs_off_with_jitter() -> None:
    rng = random.Random(7)
    delays = [PROXIED.reconnect_min]
    for _ in range(12):
        delays.append(PROXIED.next_delay(delays[-1], rng))
    assert all(PROXIED.reconnect_min <= d <= PROXIED.reconnect_max for d in delays)
    assert max(delays) > 0.7 * PROXIED.reconnect_max       # it grows to tens of seconds
    assert len({round(d, 6) for d in delays[6:]}) > 1      # and retries do not go in step
    assert [DIRECT.next_delay(d) for d in (0.1, 0.2, 1.6, 2.0)] == [0.2, 0.4, 2.0, 2.0]
