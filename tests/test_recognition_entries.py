"""What a server accepts as a client's recognition entry, and what it keeps (issue 18.1).

The entry is how recovery from ``hsm_secret`` alone finds the backup, so the server
checks it on put: well-formed, of the length the format says, and made for the
session's own client. Under append-only an entry, once held, is never replaced:
someone who stole the client key (what append-only is for) cannot make recovery
blind by overwriting it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo import NETWORK, Target, client, delete_all_but_hsm_secret, dump, install_client, play
from helpers.entries import recognition_entry
from helpers.servers import CldcbServer
from store_crash_child import CLIENT_PRIV, NODE, OTHER_PRIV, client_id
from test_recover_e2e import fresh_node

from cldcb.client.install import NodeSide, store_recognition
from cldcb.core import wire
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.recognition import Recognition, find_own, message_for_client
from cldcb.core.session import Role
from cldcb.errors import BadRequest, RemoteError
from cldcb.node.nodekey import LocalNodeKey
from cldcb.store import Store
from cldcb.transport.connection import Connection

CID = client_id()
OTHER = client_id(OTHER_PRIV)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path)
    yield s
    s.close()


def test_a_garbage_entry_is_refused_and_the_entry_held_kept(store: Store) -> None:
    store.add_client(CID)
    held = recognition_entry(NODE, CLIENT_PRIV)
    store.put_recognition(CID, held)
    for bad in (b"\x01garbage", b"\x02" + held[1:-1], held + b"\x00", b"\x07" + held[1:]):
        with pytest.raises(BadRequest, match="recognition entry") as err:
            store.put_recognition(CID, bad)
        assert "nothing was stored" in str(err.value)
    assert store.list_recognitions() == [held]
    # an older client's entry (its signature in clear) is no longer taken
    new = Recognition.decode(held)
    zbase = NODE.sign_message(message_for_client(CLIENT_PRIV, NODE.pubkey)).zbase.encode()
    old = Recognition(new.client_pub, new.sealed_key, zbase, version=1).encode()
    with pytest.raises(BadRequest, match="version 1 .* no longer accepted"):
        store.put_recognition(CID, old)
    assert store.list_recognitions() == [held]


def test_another_clients_entry_is_refused(store: Store) -> None:
    store.add_client(CID)
    store.add_client(OTHER)
    foreign = recognition_entry(NODE, OTHER_PRIV)
    with pytest.raises(BadRequest, match=f"not of client {CID}"):
        store.put_recognition(CID, foreign)
    assert store.list_recognitions() == []
    store.put_recognition(OTHER, foreign)
    assert store.list_recognitions() == [foreign]


def test_an_append_only_entry_is_never_replaced(store: Store, tmp_path: Path) -> None:
    store.add_client(CID, append_only=True)
    first = recognition_entry(NODE, CLIENT_PRIV)
    store.put_recognition(CID, first)
    store.put_recognition(CID, first)                 # the same bytes again: nothing changes
    second = recognition_entry(NODE, CLIENT_PRIV)     # well-formed, same client, other bytes
    assert second != first
    with pytest.raises(BadRequest, match="append-only"):
        store.put_recognition(CID, second)
    assert store.list_recognitions() == [first]
    assert Store.open(tmp_path).list_recognitions() == [first]
    # without append-only the client's newest entry replaces its previous one
    store.add_client(OTHER)
    store.put_recognition(OTHER, recognition_entry(NODE, OTHER_PRIV))
    newest = recognition_entry(NODE, OTHER_PRIV)
    store.put_recognition(OTHER, newest)
    assert sorted(store.list_recognitions()) == sorted([first, newest])


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_stolen_client_key_cannot_blind_recovery(tmp_path: Path) -> None:
    """The issue's case on a real server: an append-only client's key is stolen and
    garbage (then a well-formed entry with another signature) is put; the node still
    finds its backup from hsm_secret alone."""
    server = CldcbServer(tmp_path / "server").init()
    server.add(CID, "--append-only")
    server.start()
    try:
        echoed: list[str] = []
        node_side = NodeSide(NODE.node_id, NODE.sign_message(
            message_for_client(CLIENT_PRIV, NODE.pubkey)).zbase, "db", False)
        store_recognition([server.spec], CLIENT_PRIV, node_side, echoed.append)
        assert echoed == [f"  {server.address}: recognition entry stored"]

        async def thief() -> list[tuple[int, str]]:
            refused = []
            async with await Connection.open(server.spec, CLIENT_PRIV, Role.READER) as conn:
                for entry in (b"\x01garbage", recognition_entry(NODE, OTHER_PRIV),
                              recognition_entry(NODE, CLIENT_PRIV)):
                    with pytest.raises(RemoteError) as err:
                        await conn.put_recognition(entry)
                    refused.append((err.value.code, str(err.value)))
            return refused

        refused = run(thief())
        assert refused[0][0] == refused[1][0] == wire.ErrorCode.BAD_REQUEST
        assert "malformed" in refused[0][1] and f"not of client {CID}" in refused[1][1]
        assert refused[2][0] == wire.ErrorCode.KEPT and "append-only" in refused[2][1]

        # a second install of the same client (a fresh entry) leaves the first in place
        store_recognition([server.spec], CLIENT_PRIV, node_side, echoed.append)
        assert echoed[1] == (f"  {server.address}: recognition entry kept (the client is "
                             "append-only there: the entry it holds is never replaced)")

        async def listing() -> list[bytes]:
            async with await Connection.open(server.spec, None) as conn:
                return await conn.list_recognitions()

        found = find_own(run(listing()), NODE)
        assert [priv for _, priv in found] == [CLIENT_PRIV]
    finally:
        server.stop()


def test_a_backup_whose_entry_is_of_the_old_format_still_recovers(tmp_path: Path) -> None:
    """A server that holds an entry written by an older client (version 1, the signature
    in clear) still leads ``recover`` from hsm_secret alone to the backup."""
    server = CldcbServer(tmp_path / "server").init()
    lightning_dir = fresh_node(tmp_path / "node", "mn_nopass")
    network_dir = lightning_dir / NETWORK
    node = LocalNodeKey.from_hsm_secret_bytes((network_dir / "hsm_secret").read_bytes())
    client_priv = new_privkey()
    server.add(client_id_from_pubkey(pubkey_of(client_priv)))
    server.start()
    try:
        install_client(network_dir, node, [Target(server.address, server.server_id)],
                       client_priv)
        data_version = play(lightning_dir, "cln-workload", stop=12)
        original = dump(network_dir / "lightningd.sqlite3")
        path = server.data_dir / "recognitions" / \
            f"{client_id_from_pubkey(pubkey_of(client_priv))}.entry"
        new = Recognition.decode(path.read_bytes())
        zbase = node.sign_message(message_for_client(client_priv, node.pubkey)).zbase
        path.write_bytes(Recognition(new.client_pub, new.sealed_key, zbase.encode(),
                                     version=1).encode())
        delete_all_but_hsm_secret(network_dir)
        done = client("recover", "--lightning-dir", str(lightning_dir), "--network", NETWORK,
                      "--server", server.address, "--server-id", server.server_id)
        assert done.returncode == 0, done.stderr
        assert "1 recognition entries, 1 of this node" in done.stderr
        assert f"data_version {data_version}," in done.stdout
        assert dump(network_dir / "lightningd.sqlite3") == original
    finally:
        server.stop()
