"""A backup through a real Tor onion service, on a private Tor network on 127.0.0.1.

``tests/tornet.py`` runs three directory authorities, three relays, an onion
service in front of a ``cldcb-server serve`` daemon's loopback port and a
client with a SOCKS port (Debian's ``tor``, ``TestingTorNetwork 1``). The real
plugin, under the simulated lightningd, backs a node up to the onion address
through the client's SOCKS port; ``status`` sees it there; ``recover`` rebuilds
the database through Tor, byte-identical.
"""

from __future__ import annotations

import pytest
from demo import NETWORK, Target, client, delete_all_but_hsm_secret, dump, new_node, play
from helpers.servers import CldcbServer
from helpers.tornet import PrivateTorNetwork

from cldcb.plugin.wrapper import WRAPPER_NAME, read_wrapper

pytestmark = [pytest.mark.tor, pytest.mark.timeout(420)]
TRACE = "cln-crash-restart"
SECRET = "plain32"


def test_backup_and_recover_through_an_onion_service(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = CldcbServer(tmp_path / "server").init().start()
    try:
        with PrivateTorNetwork(tmp_path / "tor", server.port) as tor:
            lightning_dir = tmp_path / "node"
            network_dir = lightning_dir / NETWORK
            new_node(lightning_dir, SECRET, [server],
                     [Target(tor.address, server.server_id, proxy=tor.socks_url)])
            play(lightning_dir, TRACE)
            original = dump(network_dir / "lightningd.sqlite3")

            shown = client("status", "--lightning-dir", str(lightning_dir), "--network",
                           NETWORK, timeout=180)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert f"server {tor.address} (" in shown.stdout
            assert f"via {tor.socks_url}" in shown.stdout

            delete_all_but_hsm_secret(network_dir)
            done = client("recover", "--lightning-dir", str(lightning_dir), "--network",
                          NETWORK, "--server", tor.address, "--server-id", server.server_id,
                          "--proxy", tor.socks_url, "--yes", timeout=240)
            assert done.returncode == 0, done.stdout + done.stderr
            assert dump(network_dir / "lightningd.sqlite3") == original
            entry = read_wrapper(network_dir / WRAPPER_NAME).servers[0]
            assert (entry.address, entry.proxy) == (tor.address, tor.socks_url)
    finally:
        server.stop()
