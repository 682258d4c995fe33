"""Recovery falls back instead of failing (DESIGN §11), end to end.

A real ``cldcb-server serve`` holds two chains of one node, made by the real
plugin under the simulated lightningd: the workload trace up to call 300
(generation 1), then calls the plugin never saw (lightningd ran without it),
then more calls through the plugin, which sends a fresh snapshot (a new chain,
generation 2). Then the newest snapshot file is damaged and the server
restarted: ``recover --list`` names both states and the damage, ``recover``
refuses to restore the older state without ``--accept-older`` and writes
nothing, and with it restores exactly the database as it was at the end of
the first chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import demo
import pytest
from demo import NETWORK, client, dump
from helpers.servers import CldcbServer
from helpers.simlightningd import SimLightningd
from helpers.traces import load_trace
from test_recover_e2e import fresh_node, recover_args

from cldcb.plugin.wrapper import WRAPPER_NAME
from cldcb.store import Store

pytestmark = pytest.mark.timeout(600)

FIRST, GAP = 300, 320


@dataclass
class TwoChains:
    server: CldcbServer
    client_id: str
    old_dv: int
    old_dump: bytes
    new_dv: int


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoChains]:
    root = tmp_path_factory.mktemp("fallback")
    server = CldcbServer(root / "server").init().start()
    try:
        lightning_dir = root / "node"
        network_dir, cid = demo.backed_node(lightning_dir, server, "mn_nopass",
                                            "--generations", "5")
        old_dv = demo.play(lightning_dir, "cln-workload", stop=FIRST)
        old_dump = dump(network_dir / "lightningd.sqlite3")
        node = SimLightningd(lightning_dir, network_dir / WRAPPER_NAME, network=NETWORK)
        node.start(plugin=False)                        # changes the backup never sees
        try:
            node.run_trace(load_trace("cln-workload"), start=FIRST, stop=GAP)
        finally:
            node.close()
        new_dv = demo.play(lightning_dir, "cln-workload", start=GAP, stop=GAP + 20)
        assert new_dv > old_dv + 20
        demo.delete_all_but_hsm_secret(network_dir)
        yield TwoChains(server, cid, old_dv, old_dump, new_dv)
    finally:
        server.stop()


def snapshots(c: TwoChains) -> list[Path]:
    return sorted((c.server.data_dir / "clients" / c.client_id / "snapshots").glob("*.snap"))


def _flip(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    data[8 + 16 + 50 if where == "chunk" else len(data) - 40] ^= 0x40
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def damaged_newest(c: TwoChains, where: str) -> Iterator[Path]:
    """The newest snapshot with a byte flipped (inside its first chunk, or its trailer),
    the server restarted on it; undone afterwards."""
    newest = snapshots(c)[-1]
    c.server.stop()
    _flip(newest, where)
    c.server.start()
    try:
        yield newest
    finally:
        c.server.stop()
        aside = newest.with_name(newest.name + ".damaged")
        if aside.exists():
            aside.rename(newest)
        _flip(newest, where)
        c.server.start()


def server_args(c: TwoChains) -> list[str]:
    return ["--server", c.server.address, "--server-id", c.server.server_id]


@pytest.mark.parametrize("where", ["chunk", "trailer"])
def test_list_shows_each_state_and_the_damage_and_writes_nothing(
        chains: TwoChains, tmp_path: Path, where: str) -> None:
    c = chains
    assert len(snapshots(c)) >= 2
    with damaged_newest(c, where) as newest:
        lightning_dir = fresh_node(tmp_path, "mn_nopass")
        listed = client(*recover_args(lightning_dir, *server_args(c), "--list", "--json"))
        text = client(*recover_args(lightning_dir, *server_args(c), "--list"))
    assert listed.returncode == 0, listed.stderr
    states = json.loads(listed.stdout)[c.client_id][c.server.address]
    top = {s["generation"]: s for s in states}[int(newest.name[:10])]
    assert top["damaged"] and top["restores_data_version"] is None
    assert top["last_record_data_version"] == c.new_dv
    older = [s for s in states if not s["damaged"]]
    assert older and older[0]["restores_data_version"] == c.old_dv
    assert text.returncode == 0, text.stderr
    assert "DAMAGED, not restorable" in text.stdout
    assert f"restores data_version {c.old_dv}" in text.stdout
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]


@pytest.mark.parametrize("where", ["chunk", "trailer"])
def test_recovery_falls_back_to_the_older_generation_only_when_accepted(
        chains: TwoChains, tmp_path: Path, where: str) -> None:
    c = chains
    with damaged_newest(c, where) as newest:
        lightning_dir = fresh_node(tmp_path, "mn_nopass")
        refused = client(*recover_args(lightning_dir, *server_args(c)))
        assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]
        done = client(*recover_args(lightning_dir, *server_args(c), "--accept-older"))
    # Without --accept-older: refused, nothing written, what is missing and why.
    assert refused.returncode != 0, refused.stdout
    assert refused.stderr.count("error: ") == 1
    assert f"the newest state that verifies is data_version {c.old_dv}" in refused.stderr
    assert f"data_version {c.old_dv + 1} to {c.new_dv} is missing" in refused.stderr
    assert newest.name in refused.stderr
    assert "loses its channels" in refused.stderr and "--accept-older" in refused.stderr
    assert "Nothing was written" in refused.stderr
    # With it: exactly the database at the end of the older chain.
    assert done.returncode == 0, done.stderr
    assert dump(lightning_dir / NETWORK / "lightningd.sqlite3") == c.old_dump
    assert f"data_version {c.old_dv}," in done.stdout and "OLDER" in done.stdout


def test_the_older_generation_serves_only_its_own_chain(chains: TwoChains) -> None:
    c = chains
    gen = int(snapshots(c)[0].name[:10])
    c.server.stop()
    try:
        cs = Store.open(c.server.data_dir).client(c.client_id)
        try:
            plan = cs.fetch(generation=gen)
            assert plan is not None
            with plan:
                dvs = [r.data_version for r in plan.records()]
        finally:
            cs.close()
    finally:
        c.server.start()
    assert dvs and max(dvs) == dvs[-1] == c.old_dv


def test_an_older_state_from_another_server_needs_acceptance_too(chains: TwoChains,
                                                                tmp_path: Path) -> None:
    """A second server that holds only the first chain verifies it fully: its state is
    still older than what the damaged server holds, so it needs --accept-older as well."""
    c = chains
    old = CldcbServer(tmp_path / "old").init()
    old.add(c.client_id, "--generations", "5")
    src, dst = (s.data_dir / "clients" / c.client_id for s in (c.server, old))
    for sub in ("log", "snapshots"):
        shutil.rmtree(dst / sub, ignore_errors=True)
        shutil.copytree(src / sub, dst / sub)
    shutil.copy(c.server.data_dir / "recognitions" / f"{c.client_id}.entry",
                old.data_dir / "recognitions")
    newest = max((dst / "snapshots").glob("*.snap"))
    cs = Store.open(old.data_dir).client(c.client_id)
    first_new_segment = cs.snapshots[-1].start[0]
    cs.close()
    newest.unlink()                                     # it holds the first chain only
    for seg in (dst / "log").glob("*.log"):
        if int(seg.name[:10]) >= first_new_segment:
            seg.unlink()
    old.start()
    try:
        with damaged_newest(c, "trailer"):
            args = ["--server", old.address, "--server-id", old.server_id, *server_args(c)]
            lightning_dir = fresh_node(tmp_path, "mn_nopass")
            refused = client(*recover_args(lightning_dir, *args))
            assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]
            done = client(*recover_args(lightning_dir, *args, "--accept-older"))
    finally:
        old.stop()
    assert refused.returncode != 0, refused.stdout
    assert f"{old.address}: verified: data_version {c.old_dv} " in refused.stderr
    assert f"data_version {c.old_dv + 1} to {c.new_dv} is missing" in refused.stderr
    assert f"{c.server.address}: it claims data_version {c.new_dv}" in refused.stderr
    assert "Nothing was written" in refused.stderr
    assert done.returncode == 0, done.stderr
    assert dump(lightning_dir / NETWORK / "lightningd.sqlite3") == c.old_dump
