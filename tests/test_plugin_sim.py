"""The simulated lightningd itself, with a trivial plugin: protocol order, environment,
commit / rollback semantics, plugin death (important or not), the spill hazard."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
from helpers.simlightningd import LIGHTNINGD_VERSION, NodeStopped, SimLightningd
from helpers.traces import expected_dump, load_trace, sqlite_dump

TRIVIAL = r'''
import json, os, sys
sys.path.insert(0, {root!r})
from cldcb.node.jsonrpc import MessageDecoder, encode
behaviour = json.load(open("trivial.json")) if os.path.exists("trivial.json") else {{}}
log = open("trivial-log.jsonl", "a")
def note(**kw):
    log.write(json.dumps(kw) + "\n"); log.flush()
note(start=True, cwd=os.getcwd(), argv=sys.argv, plugin=os.environ.get("LIGHTNINGD_PLUGIN"),
     version=os.environ.get("LIGHTNINGD_VERSION"))
def send(m):
    os.write(1, encode(m))
dec = MessageDecoder()
while True:
    data = os.read(0, 65536)
    if not data:
        note(eof=True); break
    for m in dec.feed(data):
        method = m.get("method")
        note(method=method, id=m.get("id"), params=m.get("params") if method != "db_write"
             else {{"data_version": m["params"]["data_version"]}})
        if method == "getmanifest":
            send({{"jsonrpc": "2.0", "id": m["id"], "result": {{"hooks": [{{"name": "db_write"}}],
                  "subscriptions": ["shutdown"], "dynamic": True, "nonnumericids": True,
                  "options": [], "rpcmethods": []}}}})
        elif method == "init":
            send({{"jsonrpc": "2.0", "id": m["id"], "result": {{}}}})
        elif method == "db_write":
            dv = m["params"]["data_version"]
            if dv == behaviour.get("die_at"):
                os._exit(9)
            answer = "fail" if dv == behaviour.get("refuse_at") else "continue"
            send({{"jsonrpc": "2.0", "id": m["id"], "result": {{"result": answer}}}})
        elif method == "shutdown":
            note(shutdown=True); sys.exit(0)
'''


def trivial_node(tmp: Path, important: bool = True, **behaviour: int) -> SimLightningd:
    root = Path(__file__).resolve().parent.parent
    script = tmp / "trivial.py"
    script.write_text(TRIVIAL.format(root=str(root)))
    node = SimLightningd(tmp / "ld", None, important=important)
    wrapper = node.network_dir / "cldcb-plugin-wrapper"
    wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{script}' \"$0\"\n")
    wrapper.chmod(0o700)
    node.wrapper = wrapper
    (node.network_dir / "trivial.json").write_text(json.dumps(behaviour))
    return node


def plugin_log(node: SimLightningd) -> list[dict]:
    path = node.network_dir / "trivial-log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_protocol_order_environment_and_crash_replay(tmp_path: Path) -> None:
    name = "cln-crash-restart"
    node = trivial_node(tmp_path)
    node.start()
    try:
        node.run_trace(load_trace(name))
    finally:
        node.close()
    assert sqlite_dump(node.db_path) == expected_dump(name)
    log = plugin_log(node)
    starts = [x for x in log if x.get("start")]
    assert len(starts) == 2                      # the trace's crash restarted the node
    for s in starts:
        assert s["cwd"] == str(node.network_dir)
        assert s["argv"][1] == str(node.wrapper)
        assert s["plugin"] == "1" and s["version"] == LIGHTNINGD_VERSION
    methods = [x.get("method") for x in log if "method" in x]
    first_run = methods[:methods.index(None) if None in methods else len(methods)]
    assert first_run[0] == "getmanifest"
    assert first_run[1:6] == ["db_write"] * 5 and first_run[6] == "init"
    init = next(x for x in log if x.get("method") == "init")
    assert init["params"]["configuration"]["lightning-dir"] == str(node.network_dir)
    assert init["params"]["configuration"]["network"] == "regtest"
    ids = [x["id"] for x in log if x.get("method") == "db_write"]
    assert all(i.startswith("cln:db_write#") for i in ids)
    # the uncommitted batch (data_version 13, first time) reached the hook, then a restart
    dvs = [x["params"]["data_version"] for x in log if x.get("method") == "db_write"]
    assert dvs.count(13) == 2
    assert any(x.get("eof") for x in log) and any(x.get("shutdown") for x in log)


def test_a_refused_call_rolls_back_and_stops(tmp_path: Path) -> None:
    node = trivial_node(tmp_path, refuse_at=10)
    node.start()
    with pytest.raises(NodeStopped) as stopped:
        node.run_trace(load_trace("cln-workload"))
    node.crash()
    assert "failed db_write" in stopped.value.reason
    assert node.committed_data_version() == 9 == stopped.value.data_version
    assert node.calls[-1].outcome == "refused"


@pytest.mark.parametrize("important", [True, False])
def test_a_dying_plugin(tmp_path: Path, important: bool) -> None:
    name = "cln-crash-restart"
    node = trivial_node(tmp_path, important=important, die_at=10)
    node.start()
    try:
        if important:
            with pytest.raises(NodeStopped, match="important plugin died"):
                node.run_trace(load_trace(name))
            assert node.committed_data_version() == 9
            return
        node.run_trace(load_trace(name))
    finally:
        node.close()
    assert [c.outcome for c in node.calls if c.data_version >= 10][:3] == \
        ["plugin-died", "no-hook", "no-hook"]
    assert sqlite_dump(node.db_path) == expected_dump(name)


def test_a_small_cache_makes_a_big_transaction_lock_out_readers(tmp_path: Path) -> None:
    node = SimLightningd(tmp_path / "ld", None, cache_size=10)
    node.start()
    assert node.db is not None
    assert node.db.execute("PRAGMA cache_size").fetchone()[0] == 10
    trace = load_trace("cln-workload")
    node.db.execute("BEGIN")
    for stmt in trace[0][1]:                     # the schema: a big first batch
        node.db.execute(stmt)
    reader = sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        reader.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    reader.close()
    node.close()
