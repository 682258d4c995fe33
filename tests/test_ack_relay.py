"""Only the holder of the server key can acknowledge: an SSH host key is not enough.

A real sshd with the ``cldcb`` subsystem whose subsystem is a relay
(tests/ack_relay.py) in front of the real ``cldcb-server stdio``: the SSH host key
is the one the wrapper pins, the hello is the real server's (signed by the server
key), but from change K on the relay answers each Write itself with an Ack naming
exactly that write, and passes nothing on. The real plugin, driven by the simulated
lightningd, never answers ``continue`` for K: the Acks lack the session's MAC.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from helpers.plugin_harness import Target, logs_matching, server_status
from helpers.servers import PrivateSshd
from helpers.traces import load_trace
from test_plugin_acks import K_DV, OUTAGE, WORKLOAD, _k, stopped_by, violation

RELAY = Path(__file__).with_name("ack_relay.py")


@dataclass
class RelaySshd(PrivateSshd):
    """A :class:`PrivateSshd` whose subsystem is the forging relay before the server."""

    from_dv: int = 0

    def server_command(self) -> str:
        return f"{sys.executable} {RELAY} {self.from_dv} {super().server_command()}"


def test_a_relay_holding_the_ssh_host_key_cannot_acknowledge(tmp_path: Path) -> None:
    trace = load_trace(WORKLOAD)
    k = _k()
    relay = RelaySshd(tmp_path / "sshd", from_dv=K_DV).init().start()
    try:
        node, keys, target, stopped = stopped_by(Target(sshd=relay), tmp_path, k + 5)
        call = node.calls[-1]
        assert call.index == k and call.outcome == "refused", [
            (c.index, c.data_version, c.outcome) for c in node.calls[k - 2:]]
        assert all(c.outcome == "committed" for c in node.calls[:k])
        assert node.committed_data_version() == trace[k - 1][0]
        assert f"not held by 1 server(s) after {OUTAGE:g} s" in stopped.reason
        shown = violation(node)
        assert "protocol violation" in shown and "MAC" in shown, shown
        assert logs_matching(node, "does not carry this session's MAC"), \
            node.log_messages()[-20:]
        assert server_status(target, keys).tip_data_version == trace[k - 1][0]
    finally:
        relay.stop()
