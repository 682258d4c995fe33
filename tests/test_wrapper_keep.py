"""Never lose a key: a wrapper holding another client's key is kept, never silently replaced.

The README tells users to shred the key file, so a ``cldcb-plugin-wrapper`` can be the only
copy of a client key. ``recover`` into a folder that holds a wrapper of another client
refuses without a terminal and without ``--replace-wrapper`` (writing nothing), and with it
moves the old wrapper aside (mode kept) and says where. A wrapper of the same client is
rewritten silently.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import demo
import pytest
from demo import NETWORK, client
from helpers.servers import CldcbServer
from test_recover_e2e import fresh_node, recover_args

from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.plugin.wrapper import (
    WRAPPER_NAME,
    ServerEntry,
    WrapperConfig,
    default_plugin_path,
    read_wrapper,
    write_wrapper,
)

pytestmark = pytest.mark.timeout(600)
SECRET = "mn_nopass"


@dataclass
class Backed:
    server: CldcbServer
    client_id: str


@pytest.fixture(scope="module")
def backed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backed]:
    root = tmp_path_factory.mktemp("keep")
    server = CldcbServer(root / "server").init().start()
    try:
        lightning_dir = root / "node"
        _, cid = demo.backed_node(lightning_dir, server, SECRET)
        demo.play(lightning_dir, "cln-workload", stop=30)
        yield Backed(server, cid)
    finally:
        server.stop()


def other_wrapper(path: Path, server_id: str) -> WrapperConfig:
    """A wrapper of another client (its key exists nowhere else), written at ``path``."""
    priv = new_privkey()
    cfg = WrapperConfig(client_id=client_id_from_pubkey(pubkey_of(priv)), client_priv=priv,
                        node_id=pubkey_of(new_privkey()).hex(),
                        servers=(ServerEntry("127.0.0.1:9", server_id),),
                        plugin_path=default_plugin_path())
    write_wrapper(path, cfg)
    return cfg


def args(b: Backed, lightning_dir: Path, *more: str) -> list[str]:
    return recover_args(lightning_dir, "--server", b.server.address, "--server-id",
                        b.server.server_id, *more)


def test_recover_refuses_to_replace_another_clients_wrapper(backed: Backed,
                                                            tmp_path: Path) -> None:
    lightning_dir = fresh_node(tmp_path, SECRET)
    folder = lightning_dir / NETWORK
    old = other_wrapper(folder / WRAPPER_NAME, backed.server.server_id)
    before = (folder / WRAPPER_NAME).read_bytes()
    r = client(*args(backed, lightning_dir))
    assert r.returncode != 0, r.stdout
    assert "--replace-wrapper" in r.stderr and old.client_id in r.stderr
    assert (folder / WRAPPER_NAME).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["cldcb-plugin-wrapper", "hsm_secret"]


def test_recover_with_replace_wrapper_keeps_the_old_one(backed: Backed, tmp_path: Path) -> None:
    lightning_dir = fresh_node(tmp_path, SECRET)
    folder = lightning_dir / NETWORK
    old = other_wrapper(folder / WRAPPER_NAME, backed.server.server_id)
    before = (folder / WRAPPER_NAME).read_bytes()
    r = client(*args(backed, lightning_dir, "--replace-wrapper"))
    assert r.returncode == 0, r.stderr
    assert read_wrapper(folder / WRAPPER_NAME).client_id == backed.client_id
    kept = [p for p in folder.iterdir() if p.name.startswith(WRAPPER_NAME + ".replaced-")]
    assert len(kept) == 1
    assert kept[0].read_bytes() == before
    assert stat.S_IMODE(kept[0].stat().st_mode) == 0o700
    assert read_wrapper(kept[0]).client_id == old.client_id
    assert str(kept[0]) in r.stdout + r.stderr


def test_recover_rewrites_the_same_clients_wrapper(backed: Backed, tmp_path: Path) -> None:
    lightning_dir = fresh_node(tmp_path, SECRET)
    folder = lightning_dir / NETWORK
    r = client(*args(backed, lightning_dir))
    assert r.returncode == 0, r.stderr
    (folder / "lightningd.sqlite3").unlink()
    r = client(*args(backed, lightning_dir))
    assert r.returncode == 0, r.stderr
    assert not [p for p in folder.iterdir() if ".replaced-" in p.name]
    assert read_wrapper(folder / WRAPPER_NAME).client_id == backed.client_id
