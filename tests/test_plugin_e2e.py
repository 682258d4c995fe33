"""The plugin end to end: simulated lightningd → cldcb-plugin → real server, real traces.

Every test runs real processes (the plugin through its wrapper, the server
daemon or a private sshd on 127.0.0.1), real SQLite files, and checks the
outcome by fetching what the server holds as the client, unsealing it with
the node key, verifying the chain and rebuilding: the ``sqlite3 .dump`` must
be byte-identical to the real node's.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.plugin_harness import (
    Keys,
    Target,
    assert_no_stray_copies,
    logs_matching,
    make_big_database,
    make_node,
    new_keys,
    plugin_status,
    restore,
    restored_dump,
    server_status,
    vm_hwm_mb,
)
from helpers.simlightningd import NodeStopped, SimLightningd
from helpers.traces import TRACES, expected_dump, load_trace, sqlite_dump


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Target]:
    t = Target.new_daemon(tmp_path / "server")
    yield t
    t.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    t = Target.new_sshd(tmp_path_factory.mktemp("sshd"))
    yield t
    t.stop()


def play(node: SimLightningd, name: str, **kw: object) -> None:
    node.start()
    try:
        node.run_trace(load_trace(name), **kw)  # type: ignore[arg-type]
    finally:
        node.close()


def check_final(node: SimLightningd, targets: list[Target], keys: Keys, name: str,
                tmp: Path) -> None:
    want = expected_dump(name)
    assert sqlite_dump(node.db_path) == want, "the simulated node itself diverged"
    for i, t in enumerate(targets):
        assert restored_dump(t, keys, tmp / f"restored-{i}.sqlite3") == want, f"server {i}"


@pytest.mark.parametrize("name", TRACES)
def test_trace_through_the_daemon(name: str, daemon: Target, tmp_path: Path) -> None:
    keys = new_keys()
    node = make_node(tmp_path, keys, [daemon])
    play(node, name)
    check_final(node, [daemon], keys, name, tmp_path)
    answered = [c for c in node.calls if c.outcome != "uncommitted"]
    assert all(c.outcome == "committed" for c in answered)
    # the first call was a first contact: a blocking snapshot, then the chain
    assert logs_matching(node, "blocking snapshot (first contact")
    assert len(logs_matching(node, "blocking snapshot")) == 1, node.log_messages()
    status = plugin_status(node)
    assert status["running"] is False
    assert status["data_version"] == load_trace(name)[-1][0]
    assert status["servers"][0]["last_acked_data_version"] == status["data_version"]
    assert_no_stray_copies(node)


@pytest.mark.parametrize("name", TRACES)
def test_trace_through_sshd(name: str, sshd: Target, tmp_path: Path) -> None:
    keys = new_keys()
    node = make_node(tmp_path, keys, [sshd])
    play(node, name)
    check_final(node, [sshd], keys, name, tmp_path)
    assert len(logs_matching(node, "blocking snapshot")) == 1, node.log_messages()


def test_malformed_calls_are_refused_and_the_chain_goes_on(daemon: Target,
                                                          tmp_path: Path) -> None:
    """A call no lightningd would send (a data_version that is not an integer, a statement
    that is not a string, or not text UTF-8 can carry) is answered ``fail`` with the
    reason, at once; the plugin goes on, and the next well-formed call continues the
    chain without a snapshot."""
    name = "cln-workload"
    trace = load_trace(name)
    keys = new_keys()
    node = make_node(tmp_path, keys, [daemon])
    node.start()
    try:
        node.run_trace(trace, stop=20)
        plugin = node.plugin
        assert plugin is not None
        dv = trace[20][0]
        bad = [(f'"{dv}"', '["UPDATE vars SET intval=1"]', "data_version must be an integer"),
               (str(dv), '["UPDATE vars SET intval=1", 7]', "writes a list of strings"),
               (str(dv), '["UPDATE vars SET val=\'\\ud800\'"]', "not valid text")]
        for i, (dv_json, writes_json, reason) in enumerate(bad):
            req_id = f"cln:db_write#bad{i}"
            assert plugin.send_raw(
                f'{{"jsonrpc":"2.0","id":"{req_id}","method":"db_write",'
                f'"params":{{"data_version":{dv_json},"writes":{writes_json}}}}}\n\n'.encode())
            answer = plugin.wait_response(req_id, timeout=30)
            assert answer is not None, "the plugin died"
            assert answer["result"]["result"] == "fail"
            assert reason in answer["result"]["error"], answer
        node.run_trace(trace, start=20)
    finally:
        node.close()
    assert len(logs_matching(node, "blocking snapshot")) == 1, node.log_messages()
    check_final(node, [daemon], keys, name, tmp_path)


def test_an_existing_database_gets_the_plugin(daemon: Target, tmp_path: Path) -> None:
    name = "cln-workload"
    trace = load_trace(name)
    half = len(trace) // 2
    keys = new_keys()
    node = make_node(tmp_path, keys, [daemon])
    node.start(plugin=False)                      # no plugin yet: nothing is hooked
    node.run_trace(trace, stop=half)
    node.close()
    assert not node.calls[-1].answered_at
    node.start()                                  # now with the plugin
    try:
        node.run_trace(trace, start=half, init_after=half + 1)
    finally:
        node.close()
    snaps = logs_matching(node, "blocking snapshot")
    assert len(snaps) == 1 and f"db_write {trace[half][0]}: blocking snapshot" in snaps[0]
    check_final(node, [daemon], keys, name, tmp_path)


def test_exclusive_lock_hazard_fails_a_blocking_snapshot_fast(daemon: Target,
                                                              tmp_path: Path) -> None:
    """A spilled transaction holds the EXCLUSIVE lock: the first-contact copy cannot be
    read. No hang: the hook fails at once, lightningd stops without committing; at the
    next start (a small transaction) the snapshot succeeds."""
    name = "cln-workload"
    trace = load_trace(name)
    at = 615                 # an 11 kB datastore batch: spills a 10-page cache
    keys = new_keys()
    node = make_node(tmp_path, keys, [daemon])
    node.start(plugin=False)
    node.run_trace(trace, stop=at)
    node.close()
    before = node.committed_data_version()
    node.cache_size = 10
    node.start()
    with pytest.raises(NodeStopped) as stopped:
        node.run_trace(trace, start=at, init_after=at + 1)
    node.crash()
    assert "exclusively locked" in stopped.value.reason
    assert node.calls[-1].outcome == "refused"
    assert node.committed_data_version() == before
    assert not server_status(daemon, keys).has_tip
    node.cache_size = None
    node.start()
    try:
        node.run_trace(trace, start=at, init_after=at + 1)
    finally:
        node.close()
    check_final(node, [daemon], keys, name, tmp_path)


def content_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    con = sqlite3.connect(path)
    for (row,) in con.execute("SELECT data FROM filler ORDER BY id"):
        h.update(row)
    h.update(str(con.execute("SELECT intval FROM vars WHERE name='data_version'")
                 .fetchone()[0]).encode())
    con.close()
    return h.hexdigest()


@pytest.mark.slow
def test_a_256_mib_snapshot_streams_in_bounded_memory(daemon: Target, tmp_path: Path) -> None:
    keys = new_keys()
    node = make_node(tmp_path, keys, [daemon])
    make_big_database(node.db_path, 256, 41)
    assert node.db_path.stat().st_size > 256 * 1024 * 1024
    node.start()
    node.init()
    try:
        call = node.db_write(42, ["UPDATE vars SET intval = intval + 1 WHERE "
                                  "name = 'data_version' AND intval = 41"])
        assert call.outcome == "committed"
        assert node.plugin is not None
        plugin_mb = vm_hwm_mb(node.plugin.pid)
        server_mb = vm_hwm_mb(daemon.pid)
    finally:
        node.close()
    print(f"snapshot of {node.db_path.stat().st_size >> 20} MiB in {call.latency:.1f} s; "
          f"peak RSS plugin {plugin_mb:.0f} MB, server {server_mb:.0f} MB")
    assert plugin_mb < 150, f"plugin peak RSS {plugin_mb:.0f} MB"
    assert server_mb < 150, f"server peak RSS {server_mb:.0f} MB"
    out = tmp_path / "restored.sqlite3"
    rebuilt = restore(daemon, keys, out)
    assert rebuilt.data_version == 42 and rebuilt.snapshot_data_version == 41
    assert content_digest(out) == content_digest(node.db_path)


def test_after_shutdown_the_plugin_keeps_answering_then_exits(daemon: Target,
                                                               tmp_path: Path) -> None:
    """lightningd keeps a shutdown subscriber's hook while it waits for plugins to exit
    and may still commit then: the plugin answers those calls (they reach the server)
    and exits by itself once the calls stopped."""
    name = "cln-workload"
    trace = load_trace(name)
    keys = new_keys()
    node = make_node(tmp_path, keys, [daemon])
    node.start()
    node.run_trace(trace, stop=300)
    plugin = node.plugin
    assert plugin is not None
    plugin.send({"jsonrpc": "2.0", "method": "shutdown", "params": {}})
    node.run_trace(trace, start=300, stop=310)        # commits during the shutdown window
    assert all(c.outcome == "committed" for c in node.calls[300:310])
    deadline = time.monotonic() + 15
    while plugin.alive() and time.monotonic() < deadline:
        plugin.pump(0.1)
    assert not plugin.alive(), "the plugin did not exit after shutdown"
    node.plugin = None
    node.close()
    assert server_status(daemon, keys).tip_data_version == trace[309][0]
