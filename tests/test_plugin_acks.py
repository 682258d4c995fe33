"""The plugin counts an acknowledgement only when it matches the change it sent.

A lying server (tests/lying_server.py: the real ``cldcb-server`` subprocess on
127.0.0.1 whose acknowledgements name another data_version, kind or link, or
another snapshot id, snapshot data_version or chunk index, and which stores
nothing) and the real plugin driven by the simulated lightningd: the change
the lie answers is never answered ``continue``; lightningd's call fails at
the outage limit, or, once an honest server is back, the plugin reconnects
and the change is committed only when that server holds it. The violation is
named in the plugin's log and in its status file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.plugin_harness import (
    Keys,
    Target,
    logs_matching,
    make_node,
    new_keys,
    plugin_status,
    restored_dump,
    server_status,
    wait_until,
)
from helpers.servers import SERVER_CMD, CldcbServer
from helpers.simlightningd import Call, NodeStopped, SimLightningd
from helpers.traces import load_trace, sqlite_dump
from lying_server import SNAPSHOT_LIES, WRITE_LIES
from test_plugin_faults import normal_call_at_or_after

LIAR = [sys.executable, str(Path(__file__).with_name("lying_server.py"))]
WORKLOAD = "cln-workload"
OUTAGE = 3.0


@pytest.fixture
def liar(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CldcbServer]:
    lie, from_dv = request.param
    server = CldcbServer(tmp_path / "liar" / "data", command=LIAR,
                         extra_env={"CLDCB_TEST_LIE": lie,
                                    "CLDCB_TEST_LIE_FROM": str(from_dv)}).init().start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def violation(node: SimLightningd) -> str:
    """The last error the plugin's status file gives for its one server."""
    (server,) = plugin_status(node)["servers"]
    return str(server["last_error"] or "")


def stopped_by(liar: CldcbServer | Target, tmp: Path, stop: int
               ) -> tuple[SimLightningd, Keys, Target, NodeStopped]:
    """Play the workload's first ``stop`` calls to a node backed up to ``liar`` only; the
    node, its keys, the target and how the node stopped (it must)."""
    keys = new_keys()
    target = liar if isinstance(liar, Target) else Target(daemon=liar)
    node = make_node(tmp, keys, [target], outage_limit=OUTAGE, hook_timeout=40)
    node.start()
    try:
        with pytest.raises(NodeStopped) as stopped:
            node.run_trace(load_trace(WORKLOAD), stop=stop)
    finally:
        node.crash()
    return node, keys, target, stopped.value


def _k() -> int:
    return normal_call_at_or_after(load_trace(WORKLOAD), 60)


K_DV = load_trace(WORKLOAD)[_k()][0]


@pytest.mark.parametrize("liar", [(lie, K_DV) for lie in WRITE_LIES], indirect=True,
                         ids=WRITE_LIES)
def test_a_lying_ack_of_a_write_is_never_counted(liar: CldcbServer, tmp_path: Path) -> None:
    """From change K on, the server answers each write with an Ack naming another
    data_version, kind or link, and stores nothing: the first such call (sent on the hot
    path, then again by the general path after each reconnect) fails at the outage
    limit; nothing from K on is committed."""
    trace = load_trace(WORKLOAD)
    k = _k()
    node, keys, target, stopped = stopped_by(liar, tmp_path, k + 5)
    call = node.calls[-1]
    assert call.index == k and call.outcome == "refused", [
        (c.index, c.data_version, c.outcome) for c in node.calls[k - 2:]]
    assert f"not held by 1 server(s) after {OUTAGE:g} s" in stopped.reason
    assert "protocol violation" in stopped.reason
    assert node.committed_data_version() == trace[k - 1][0]
    assert all(c.outcome == "committed" for c in node.calls[:k])
    shown = violation(node)
    assert "protocol violation" in shown and f"data_version {K_DV}" in shown, shown
    logged = logs_matching(node, f"server {target.entry.address}: protocol violation")
    assert len(logged) >= 2, node.log_messages()[-20:]   # the hot path's lie, the general's
    assert server_status(target, keys).tip_data_version == trace[k - 1][0]


@pytest.mark.parametrize("liar", [(lie, 0) for lie in SNAPSHOT_LIES], indirect=True,
                         ids=SNAPSHOT_LIES)
def test_a_lying_ack_of_a_snapshot_is_never_counted(liar: CldcbServer,
                                                    tmp_path: Path) -> None:
    """The first contact's blocking snapshot: the server answers a chunk with another
    index, or the snapshot with another id or data_version, and stores nothing (it
    acknowledges the record on top honestly in form): the first call fails at the
    outage limit, although each new upload makes "progress" again."""
    node, keys, target, stopped = stopped_by(liar, tmp_path, 5)
    assert [c.outcome for c in node.calls] == ["refused"]
    assert f"not held by 1 server(s) after {OUTAGE:g} s" in stopped.reason
    assert node.committed_data_version() == 0
    shown = violation(node)
    assert "protocol violation" in shown and ("Snapshot" in shown or "Chunk" in shown), shown
    assert logs_matching(node, f"server {target.entry.address}: protocol violation"), \
        node.log_messages()[-20:]
    assert not server_status(target, keys).has_tip


@pytest.mark.parametrize("liar", [("data_version", K_DV)], indirect=True)
def test_after_a_lie_an_honest_answer_commits_the_change(liar: CldcbServer,
                                                         tmp_path: Path) -> None:
    """The lying server is replaced (same data, same port) by the honest one while call
    K waits: the plugin reconnects, sends K again and answers ``continue`` only then;
    the status file names the violation until the honest Ack comes."""
    trace = load_trace(WORKLOAD)
    k = _k()
    keys = new_keys()
    target = Target(daemon=liar)
    node = make_node(tmp_path, keys, [target], outage_limit=60)
    back: dict[str, float] = {}

    def on_sent(call: Call) -> None:
        if call.index == k:
            wait_until(lambda: "protocol violation" in violation(node), 20,
                       "the status file to name the violation")
            liar.stop()
            liar.command = list(SERVER_CMD)
            liar.start(liar.port)
            back["at"] = time.monotonic()

    node.start()
    try:
        node.run_trace(trace, stop=k + 20, on_sent=on_sent)
    finally:
        node.close()
    call = node.calls[k]
    assert call.outcome == "committed" and call.answered_at is not None
    assert call.answered_at >= back["at"], "continue was answered on the lie"
    assert all(c.outcome == "committed" for c in node.calls)
    assert violation(node) == ""               # the honest Acks cleared it
    assert server_status(target, keys).tip_data_version == trace[k + 19][0]
    assert restored_dump(target, keys, tmp_path / "restored.sqlite3") == \
        sqlite_dump(node.db_path)
