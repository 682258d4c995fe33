"""A server that ends the backup on an uncommitted batch (issue 18, item 2), end to end.

The real plugin, under the simulated lightningd, backs the crash-restart trace
up to a real ``cldcb-server serve`` up to its replacement: data_version 13 was
sent, lightningd died before COMMIT, and its next start sent 13 again (the
replacement; the trace's first 16 calls). Then two copies of the server's data
directory are edited the way dishonest or unlucky servers would hold them:

- ``batch``: the replacement dropped: its chain verifies and ends on the batch
  lightningd never committed;
- ``replacement`` (with a server key of its own): the batch dropped, the
  replacement kept (a server that was not in step when the batch was sent),
  so only the replacement's ``replaces`` says what it superseded.

Both are at data_version 13. Recovery must use the replacement's tip whatever
the order of the servers, name the other as replaced, and with the ``batch``
server alone say that an uncommitted tip cannot be ruled out.

A second server (``fork``) holds another chain of the same client: the same
calls up to the batch, played again by another plugin process (another
ephemeral key, so other sealed bytes). Its tip is also at data_version 13, but
neither tip replaces the other: recovery must refuse and name both.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from demo import NETWORK, Target, client, delete_all_but_hsm_secret, dump, install_client, play
from helpers.servers import CldcbServer, init_data_dir
from helpers.traces import replay_trace
from test_recover_e2e import fresh_node, recover_args

from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.node.nodekey import LocalNodeKey
from cldcb.server.cli import SERVER_KEY_NAME
from cldcb.store.frames import encode_record
from cldcb.store.log import segment_records

pytestmark = pytest.mark.timeout(600)

TRACE = "cln-crash-restart"
CALLS = 16          # up to the replacement of data_version 13
SECRET = "mn_nopass"


@dataclass
class World:
    root: Path
    data_dir: Path
    server_id: str
    client_id: str
    fork: CldcbServer
    expected: bytes      # the state lightningd committed: data_version 13 replaced
    batch_state: bytes   # the state of the uncommitted batch


def _key_secret() -> bytes:
    from demo import vector_secret
    return bytes.fromhex(vector_secret(SECRET)["file_hex"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("replaced")
    node = LocalNodeKey.from_hsm_secret_bytes(_key_secret())
    client_priv = new_privkey()
    client_id = client_id_from_pubkey(pubkey_of(client_priv))
    daemon = CldcbServer(root / "daemon").init().start()
    fork = CldcbServer(root / "fork").init().start()
    try:
        for server, calls in ((daemon, CALLS), (fork, CALLS - 1)):
            lightning_dir = root / f"node-{calls}"
            network_dir = lightning_dir / NETWORK
            network_dir.mkdir(parents=True)
            (network_dir / "hsm_secret").write_bytes(_key_secret())
            server.add(client_id)
            install_client(network_dir, node, [Target(server.address, server.server_id)],
                           client_priv)
            committed = play(lightning_dir, TRACE, stop=calls)
            assert committed == (13 if calls == CALLS else 12)   # the batch: never committed
            delete_all_but_hsm_secret(network_dir)
        daemon.stop()
        replay_trace(TRACE, root / "committed.sqlite3", calls=slice(0, CALLS))
        replay_trace(TRACE, root / "batch.sqlite3", calls=slice(0, CALLS - 1))
        yield World(root, daemon.data_dir, daemon.server_id, client_id, fork,
                    dump(root / "committed.sqlite3"), dump(root / "batch.sqlite3"))
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        fork.stop()


def edited_copy(world: World, where: Path, drop: str, own_key: bool) -> CldcbServer:
    """A copy of the server's data without the batch (``drop="batch"``) or without its
    replacement (``drop="replacement"``), the two newest records of its log."""
    data = where / "data"
    shutil.copytree(world.data_dir, data)
    segments = sorted((data / "clients" / world.client_id / "log").glob("*.log"))
    frames, _ = segment_records(segments[-1])
    assert [f.data_version for f in frames[-2:]] == [13, 13], \
        [f.data_version for f in frames]
    del frames[-2 if drop == "batch" else -1]
    segments[-1].write_bytes(b"".join(encode_record(f.data_version, f.kind, f.link,
                                                    f.time_ms, f.sealed) for f in frames))
    server = CldcbServer(data)
    if own_key:
        (data / SERVER_KEY_NAME).unlink()
        server.server_id = init_data_dir(data)
    else:
        server.server_id = world.server_id
    return server


def _server_args(*servers: CldcbServer) -> list[str]:
    return [a for s in servers for a in ("--server", s.address, "--server-id", s.server_id)]


def test_the_replacements_tip_wins_whatever_the_order(world: World, tmp_path: Path) -> None:
    assert world.expected != world.batch_state
    batch = edited_copy(world, tmp_path / "b", drop="replacement", own_key=False)
    replacement = edited_copy(world, tmp_path / "r", drop="batch", own_key=True)
    batch.start()
    replacement.start()
    try:
        for order in ("batch-first", "batch-last"):
            servers = (batch, replacement) if order == "batch-first" else (replacement, batch)
            lightning_dir = fresh_node(tmp_path / order, SECRET)
            done = client(*recover_args(lightning_dir, *_server_args(*servers)))
            assert done.returncode == 0, done.stderr
            out = done.stdout + done.stderr
            assert dump(lightning_dir / NETWORK / "lightningd.sqlite3") == world.expected
            assert f"{replacement.address} ({replacement.server_id[:14]}…): USED: " \
                   "data_version 13" in out, out
            assert f"{batch.address} ({batch.server_id[:14]}…): REPLACED: it ends on " \
                   "data_version 13, a batch lightningd never committed" in out, out
    finally:
        batch.stop()
        replacement.stop()


def test_one_server_ending_on_a_batch_says_it_cannot_be_ruled_out(world: World,
                                                                   tmp_path: Path) -> None:
    batch = edited_copy(world, tmp_path, drop="replacement", own_key=False)
    batch.start()
    try:
        lightning_dir = fresh_node(tmp_path, SECRET)
        done = client(*recover_args(lightning_dir, *_server_args(batch)))
    finally:
        batch.stop()
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert dump(lightning_dir / NETWORK / "lightningd.sqlite3") == world.batch_state
    assert f"note: its newest record (data_version 13) is held by {batch.address} alone: " \
           "that lightningd never committed it" in out, out
    assert "cannot be ruled out" in out


def test_two_tips_at_one_data_version_without_a_replacement_are_refused(
        world: World, tmp_path: Path) -> None:
    batch = edited_copy(world, tmp_path, drop="replacement", own_key=False)
    batch.start()
    try:
        lightning_dir = fresh_node(tmp_path, SECRET)
        done = client(*recover_args(lightning_dir, *_server_args(batch, world.fork)))
    finally:
        batch.stop()
    assert done.returncode != 0, done.stdout
    assert "error: the servers disagree: each verifies up to data_version 13, but with a " \
           "different newest record" in done.stderr, done.stderr
    assert f"  {batch.address}: newest record of" in done.stderr
    assert f"  {world.fork.address}: newest record of" in done.stderr
    assert "Nothing was written" in done.stderr and "recover --list" in done.stderr
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]
    assert not list((lightning_dir / NETWORK).glob(".*"))       # no scratch file left
