"""The recognition listing at any count: pages, a size cap per entry, real servers.

A server holds one entry per client, and every recovery starts by listing them
all. The listing goes out in pages (``ListRecognitions(after, max_count)`` →
``Recognitions(entries, next_after)``), so no count of clients makes it exceed a
frame; an entry larger than :data:`cldcb.core.wire.MAX_RECOGNITION` is refused on put.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest
from demo import (
    NETWORK,
    Target,
    client,
    delete_all_but_hsm_secret,
    dump,
    install_client,
    play,
    vector_secret,
)
from helpers.servers import CldcbServer
from test_recover_e2e import fresh_node

from cldcb.core import wire
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.recognition import Recognition, find_own
from cldcb.core.session import Role
from cldcb.errors import ProtocolError, RemoteError, StoreError
from cldcb.node.nodekey import LocalNodeKey
from cldcb.store import Store
from cldcb.store.registry import MAX_RECOGNITION
from cldcb.transport.connection import Connection

pytestmark = pytest.mark.timeout(600)
EVIL = Path(__file__).resolve().parent / "evil_server.py"


def filler_entry(client_priv: bytes, size: int | None = None) -> bytes:
    """A well-formed entry for ``client_priv``'s client, made for no node (its sealed
    parts are random): what another node's entry looks like to us. With ``size``, an
    entry of the older format (version 1, signature in clear) of exactly that size."""
    pub = pubkey_of(client_priv)
    if size is None:
        return Recognition(pub, os.urandom(81), os.urandom(81)).encode()
    zbase = b"y" * (size - 1 - 33 - 2 - 81)
    entry = Recognition(pub, os.urandom(81), zbase, version=1).encode()
    assert len(entry) == size
    return entry


def register_fillers(store: Store, count: int, size: int | None = None) -> list[str]:
    """``count`` registered clients with a filler entry each: put by the client, or with
    ``size``, an older format's entry of that size, as an older server version stored
    it (the store no longer accepts those on put)."""
    ids = []
    for _ in range(count):
        priv = new_privkey()
        cid = client_id_from_pubkey(pubkey_of(priv))
        store.add_client(cid)
        if size is None:
            store.put_recognition(cid, filler_entry(priv))
        else:
            (store.data_dir / "recognitions" / f"{cid}.entry").write_bytes(
                filler_entry(priv, size))
        ids.append(cid)
    return ids


def test_recovery_finds_its_entry_among_300_of_the_maximum_size(tmp_path: Path) -> None:
    server = CldcbServer(tmp_path / "server").init()
    store = Store.open(server.data_dir)
    fillers = register_fillers(store, 300, MAX_RECOGNITION)
    store.close()
    server.start()
    try:
        secret = vector_secret("mn_nopass")
        lightning_dir = tmp_path / "node"
        network_dir = lightning_dir / NETWORK
        network_dir.mkdir(parents=True)
        file_bytes = bytes.fromhex(secret["file_hex"])
        (network_dir / "hsm_secret").write_bytes(file_bytes)
        node = LocalNodeKey.from_hsm_secret_bytes(file_bytes)
        client_priv = new_privkey()
        client_id = client_id_from_pubkey(pubkey_of(client_priv))
        server.add(client_id)
        install_client(network_dir, node, [Target(server.address, server.server_id)],
                       client_priv)
        data_version = play(lightning_dir, "cln-workload", stop=40)
        original = dump(network_dir / "lightningd.sqlite3")

        async def listing() -> tuple[list[bytes], wire.Recognitions]:
            async with await Connection.open(server.spec, None) as conn:
                whole = await conn.list_recognitions()
                # a client asking for everything at once gets one page of at most
                # RECOGNITION_PAGE entries, and where to go on from
                page = await conn._request(wire.ListRecognitions("", 10**6))
            return whole, page

        whole, page = asyncio.run(listing())
        assert len(whole) == len(set(whole)) == 301
        assert [e.client_pub for e, _ in find_own(whole, node)] == [pubkey_of(client_priv)]
        assert len(page.entries) == wire.RECOGNITION_PAGE < 301
        assert page.next_after != ""
        assert sum(len(e) for e in page.entries) < wire.MAX_FRAME // 8

        delete_all_but_hsm_secret(network_dir)
        lost = fresh_node(tmp_path / "lost", "mn_nopass")
        done = client("recover", "--lightning-dir", str(lost), "--network", NETWORK,
                      "--server", server.address, "--server-id", server.server_id)
        assert done.returncode == 0, done.stderr
        assert "301 recognition entries, 1 of this node" in done.stderr
        assert f"data_version {data_version}," in done.stdout
        # one server: recovery says it cannot tell whether newer records were withheld
        one = [line for line in done.stdout.splitlines() if "single server" in line]
        assert one == ["note: with a single server, recovery cannot tell whether it withheld "
                       "its newest records; back up to a second, independent server too "
                       "(installplugin with one --server/--server-id pair per server), so "
                       "that the next recovery can compare them"]
        assert dump(lost / NETWORK / "lightningd.sqlite3") == original
        assert len(fillers) == 300
    finally:
        server.stop()


def test_a_too_large_entry_is_refused_on_put_and_the_old_one_kept(tmp_path: Path) -> None:
    server = CldcbServer(tmp_path / "server").init()
    client_priv = new_privkey()
    client_id = client_id_from_pubkey(pubkey_of(client_priv))
    server.add(client_id)
    server.start()
    try:
        kept = filler_entry(client_priv)

        async def put_both() -> tuple[str, list[bytes]]:
            async with await Connection.open(server.spec, client_priv, Role.READER) as conn:
                await conn.put_recognition(kept)
                with pytest.raises(RemoteError) as err:
                    await conn.put_recognition(filler_entry(client_priv, MAX_RECOGNITION + 1))
                return str(err.value), await conn.list_recognitions()

        text, entries = asyncio.run(put_both())
        assert f"at most {MAX_RECOGNITION} bytes" in text
        assert f"not {MAX_RECOGNITION + 1}" in text
        assert entries == [kept]
    finally:
        server.stop()


def test_the_cap_fits_a_real_entry_with_room_to_spare() -> None:
    node = LocalNodeKey.from_hsm_secret_bytes(
        bytes.fromhex(vector_secret("mn_nopass")["file_hex"]))
    from cldcb.core.recognition import make_recognition, message_for_client
    client_priv = new_privkey()
    signed = node.sign_message(message_for_client(client_priv, node.pubkey))
    real = make_recognition(client_priv, node.pubkey, signed.zbase, new_privkey()).encode()
    assert 4 * len(real) <= MAX_RECOGNITION
    # a full page of the largest entries is far below any frame limit
    page = wire.encode(wire.Recognitions([bytes(MAX_RECOGNITION)] * wire.RECOGNITION_PAGE,
                                         "c" * 66))
    assert len(page) < wire.MAX_FRAME // 8


def test_store_pages_in_client_id_order_and_skips_oversized_files(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store.open(tmp_path)
    ids = sorted(register_fillers(store, 7, size=300))
    with pytest.raises(StoreError, match=f"at most {MAX_RECOGNITION} bytes"):
        store.put_recognition(ids[0], bytes(MAX_RECOGNITION + 1))
    # an entry an older server version stored, larger than any real one: skipped
    (tmp_path / "recognitions" / f"{ids[3]}.entry").write_bytes(bytes(64 * 1024))
    seen: list[bytes] = []
    after, pages = "", 0
    with caplog.at_level(logging.WARNING, logger="cldcb.store"):
        while True:
            entries, after = store.recognition_page(after, 2)
            pages += 1
            assert 1 <= len(entries) <= 2
            seen += entries
            if not after:
                break
    assert pages == 3
    assert seen == [(tmp_path / "recognitions" / f"{cid}.entry").read_bytes()
                    for cid in ids if cid != ids[3]]
    assert ids[3] in caplog.text
    assert store.list_recognitions() == seen
    store.close()


def test_a_listing_that_never_ends_is_refused(tmp_path: Path) -> None:
    """A server answering every page with the same cursor does not keep recovery
    listing forever: a ProtocolError names it, and recovery says so."""
    server = CldcbServer(tmp_path / "evil" / "data", command=[sys.executable, str(EVIL)],
                         extra_env={"CLDCB_EVIL_TEXT": "no", "CLDCB_EVIL_LISTING": "loop"})
    server.init().start()
    try:
        async def listing() -> None:
            async with await Connection.open(server.spec, None) as conn:
                await conn.list_recognitions()

        with pytest.raises(ProtocolError, match="without moving forward"):
            asyncio.run(asyncio.wait_for(listing(), 60))
        lost = fresh_node(tmp_path / "lost", "mn_nopass")
        done = client("recover", "--lightning-dir", str(lost), "--network", NETWORK,
                      "--server", server.address, "--server-id", server.server_id, timeout=120)
        assert done.returncode != 0
        assert "lists its recognition entries without moving forward" in done.stderr
        assert os.listdir(lost / NETWORK) == ["hsm_secret"]
    finally:
        server.stop()
