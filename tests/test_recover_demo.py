"""The README's first command: ``python3 tests/demo.py`` must work and clean up after itself."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent / "demo.py"


@pytest.mark.timeout(300)
def test_demo_recovers_an_identical_database(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True,
                          timeout=280, env=env, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "IDENTICAL: the node was rebuilt from its hsm_secret alone" in done.stdout
    assert "left: hsm_secret" in done.stdout
    assert "through the plugin" in done.stdout and "data_version 2525" in done.stdout
    assert "verified and replayed" in done.stderr  # recover's progress output
    assert "WARNING: Never start lightningd on an older copy" in done.stdout
    # Cleaned up: its temporary folder is gone and its server no longer listens.
    assert os.listdir(tmp_path) == []
    port = int(re.search(r"server 127\.0\.0\.1:(\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
