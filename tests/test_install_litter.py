"""A failed ``install --ssh`` through a setup key leaves one client, says where, and a rerun
reuses it (real sshd on 127.0.0.1, a key whose forced command is ``forced --allow add``).

With no public address the client's own SSH key must be let in by hand, which a setup key
cannot do: without a terminal the install stops. It must not register a new client on each
retry: the client key is kept (as a pending wrapper, mode 0700, beside the wrapper) and the
error names it and the client; a rerun registers nothing new, and once the line is in
authorized_keys it finishes with that same client and removes the pending file.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from helpers.installkit import PtyRun, client_env, run_cli
from helpers.servers import SERVER_CMD, PrivateSshd
from helpers.simrpc import SimRpcNode
from test_install_ssh import clients, install_args, new_ssh_key

from cldcb.plugin.wrapper import WRAPPER_NAME, read_wrapper

pytestmark = pytest.mark.timeout(600)
PENDING = WRAPPER_NAME + ".pending"


def setup_key_sshd(tmp_path: Path) -> tuple[PrivateSshd, Path, str]:
    """A started sshd whose only key (the test HOME's default key) is a setup key; (sshd,
    HOME, the --ssh target)."""
    sshd = PrivateSshd(tmp_path / "sshd").init().start()
    home = tmp_path / "home"
    public = new_ssh_key(home / ".ssh" / "id_ed25519")
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n")
    forced = " ".join([*SERVER_CMD, "--data-dir", str(sshd.data_dir)])
    sshd.authorized_keys.write_text(f'restrict,command="{forced} forced --allow add" '
                                    f"{public}\n")
    return sshd, home, f"{sshd.user}@127.0.0.1:{sshd.port}"


def test_failed_setup_key_install_is_reused_not_repeated(tmp_path: Path) -> None:
    sshd, home, target = setup_key_sshd(tmp_path)
    try:
        ln = tmp_path / "ln"
        with SimRpcNode(ln, preplay=5) as node:
            first = run_cli(*install_args(ln, target), env=client_env(home))
            assert first.returncode != 0
            added = clients(sshd.data_dir)
            assert len(added) == 1
            pending = node.network_dir / PENDING
            assert stat.S_IMODE(pending.stat().st_mode) == 0o700
            kept = read_wrapper(pending)
            assert kept.client_id == added[0]
            assert str(pending) in first.stderr and added[0] in first.stderr
            assert kept.client_priv.hex() not in first.stdout + first.stderr

            again = run_cli(*install_args(ln, target), env=client_env(home))
            assert again.returncode != 0
            assert clients(sshd.data_dir) == added          # nothing new registered
            assert read_wrapper(pending).client_id == added[0]

            sshd.authorize_client(kept.client_priv, kept.client_id, forced=True)
            done = run_cli(*install_args(ln, target), env=client_env(home))
            assert done.returncode == 0, done.stdout + done.stderr
            assert clients(sshd.data_dir) == added
            assert read_wrapper(node.network_dir / WRAPPER_NAME).client_id == added[0]
            assert not pending.exists()
    finally:
        sshd.stop()


def test_end_of_input_at_the_prompt_says_what_was_left(tmp_path: Path) -> None:
    sshd, home, target = setup_key_sshd(tmp_path)
    try:
        ln = tmp_path / "ln"
        with SimRpcNode(ln, preplay=5) as node:
            term = PtyRun.cli(*install_args(ln, target), env=client_env(home))
            term.expect("Press Enter once it is there")
            term.send("\x04")                               # end of input (Ctrl-D)
            assert term.wait() != 0
            (added,) = clients(sshd.data_dir)
            assert "end of input" in term.output and "Aborted" not in term.output
            assert f"client {added} is registered" in term.output
            assert str(node.network_dir / PENDING) in term.output.replace("\r\n", "")
    finally:
        sshd.stop()
