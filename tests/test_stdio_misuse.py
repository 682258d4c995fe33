"""Programs that speak a protocol on stdin/stdout, run the wrong way: one line, no hang.

``cldcb-server stdio`` is started by sshd and ``cldcb-plugin`` (through its wrapper) by
lightningd, both on pipes or sockets. Run by hand (stdin a terminal or /dev/null, stdout a
file), each says in one ``error:`` line what it is for and exits at once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers.servers import SERVER_CMD, init_data_dir
from test_cli_keys import run_on_pty

from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.plugin.wrapper import ServerEntry, WrapperConfig, default_plugin_path, write_wrapper

TIMEOUT = 30


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert "error:" in lines[0]
    return lines[0]


def _stdio_cmd(tmp_path: Path) -> list[str]:
    data = tmp_path / "srv"
    init_data_dir(data)
    return [*SERVER_CMD, "--data-dir", str(data), "stdio"]


def test_stdio_with_dev_null_stdin_and_a_pipe_out(tmp_path: Path) -> None:
    cmd = _stdio_cmd(tmp_path)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "started by sshd" in line and "stdin" in line
    assert proc.stdout == ""


def test_stdio_with_stdout_a_file(tmp_path: Path) -> None:
    cmd = _stdio_cmd(tmp_path)
    out = tmp_path / "out"
    r, w = os.pipe()
    try:
        with out.open("wb") as f:
            proc = subprocess.run(cmd, stdin=r, stdout=f, stderr=subprocess.PIPE, text=True,
                                  timeout=TIMEOUT)
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "started by sshd" in line and "stdout" in line
    assert out.read_bytes() == b""


def test_stdio_on_a_terminal(tmp_path: Path) -> None:
    code, terminal, out = run_on_pty(_stdio_cmd(tmp_path), timeout=TIMEOUT)
    assert code == 2, terminal
    line = _one_error_line(terminal)
    assert "terminal" in line and "started by sshd" in line
    assert out == ""


def test_plugin_wrapper_run_by_hand_on_a_terminal(tmp_path: Path) -> None:
    priv = new_privkey()
    cfg = WrapperConfig(client_id=client_id_from_pubkey(pubkey_of(priv)), client_priv=priv,
                        node_id=pubkey_of(new_privkey()).hex(),
                        servers=(ServerEntry("127.0.0.1:9", "52" + "22" * 32),),
                        plugin_path=default_plugin_path())
    wrapper = tmp_path / "cldcb-plugin-wrapper"
    write_wrapper(wrapper, cfg)
    code, terminal, out = run_on_pty([str(wrapper)], timeout=TIMEOUT)
    assert code == 2, terminal
    line = _one_error_line(terminal)
    assert "started by lightningd" in line and "terminal" in line
    assert priv.hex() not in terminal
