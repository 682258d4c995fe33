"""``cldcb-server systemd-unit`` / ``sshd-config``: files that run the installed program.

The shipped ``systemd/cldcb-server.service`` and ``ssh/sshd_config.d-cldcb.conf`` are
what these commands write for README's "Production install" (``/opt/cldcb``,
``/var/lib/cldcb``, account ``cldcb``): a unit or drop-in naming a program that no
documented install creates fails ``systemd-analyze verify`` and sshd's subsystem.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.environment import require_tool
from helpers.servers import free_port
from test_cli_keys import SERVER, run

from cldcb.server.hostfiles import sshd_config, systemd_unit

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED = "/opt/cldcb/bin/cldcb-server --data-dir /var/lib/cldcb"


def _body(text: str) -> list[str]:
    """The file without its first line (which says where this copy comes from)."""
    return text.splitlines()[1:]


def test_the_shipped_unit_is_the_one_generated_for_the_documented_install() -> None:
    shipped = (ROOT / "systemd" / "cldcb-server.service").read_text()
    assert _body(shipped) == _body(systemd_unit(DOCUMENTED, "/var/lib/cldcb", "cldcb",
                                                "0.0.0.0:29735"))
    assert f"ExecStart={DOCUMENTED} serve --listen 0.0.0.0:29735" in shipped.splitlines()


def test_the_shipped_sshd_drop_in_is_the_one_generated_for_the_documented_install() -> None:
    shipped = (ROOT / "ssh" / "sshd_config.d-cldcb.conf").read_text()
    assert _body(shipped) == _body(sshd_config(DOCUMENTED, "/var/lib/cldcb", "cldcb"))
    assert f"Subsystem cldcb {DOCUMENTED} stdio" in shipped.splitlines()


def _generated(data: Path, *args: str) -> str:
    done = run(SERVER, "--data-dir", str(data), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_generated_unit_runs_this_program_and_verifies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    unit = _generated(data, "systemd-unit", "--listen", "127.0.0.1:29735")
    assert f"ExecStart={SERVER} --data-dir {data} serve --listen 127.0.0.1:29735" in \
        unit.splitlines()
    assert f"ReadWritePaths={data}" in unit.splitlines()
    assert "StateDirectory=" not in unit    # only for /var/lib/NAME
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed")
    path = tmp_path / "cldcb-server.service"
    path.write_text(unit)
    done = subprocess.run([verify, "verify", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    # and the unit shipped before this command existed did not
    path.write_text(unit.replace(f"ExecStart={SERVER}", "ExecStart=/usr/bin/cldcb-server-gone"))
    assert subprocess.run([verify, "verify", str(path)], capture_output=True,
                          timeout=120).returncode != 0


def test_a_program_or_data_under_a_home_keeps_home_readable() -> None:
    unit = systemd_unit("/home/op/.local/bin/cldcb-server --data-dir /var/lib/cldcb",
                        "/var/lib/cldcb", "cldcb", "0.0.0.0:29735")
    assert "ProtectHome=read-only" in unit.splitlines()
    assert "StateDirectory=cldcb" in unit.splitlines()


def test_the_generated_sshd_drop_in_is_accepted_by_sshd(tmp_path: Path) -> None:
    sshd = require_tool("sshd")
    data = tmp_path / "data"
    drop_in = _generated(data, "sshd-config", "--user", "root")
    assert f"Subsystem cldcb {SERVER} --data-dir {data} stdio" in drop_in.splitlines()
    assert f"    SetEnv CLDCB_SERVER_DIR={data}" in drop_in.splitlines()
    assert f'restrict,command="{SERVER} --data-dir {data} forced --allow add"' in drop_in
    host_key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True, timeout=60)
    config = tmp_path / "sshd_config"
    config.write_text(f"Port {free_port()}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
                      f"PidFile {tmp_path / 'sshd.pid'}\nUsePAM no\n" + drop_in)
    done = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args", [["--user", "bad user"], ["--user", "x;rm"]])
def test_bad_accounts_are_refused(tmp_path: Path, args: list[str]) -> None:
    for command in ("systemd-unit", "sshd-config"):
        done = run(SERVER, "--data-dir", str(tmp_path), command, *args)
        assert done.returncode != 0 and done.stderr.startswith("error: --user must be")
        assert done.stdout == ""


def test_a_data_dir_with_a_space_is_refused(tmp_path: Path) -> None:
    done = run(SERVER, "--data-dir", str(tmp_path / "my data"), "systemd-unit")
    assert done.returncode != 0 and "has spaces" in done.stderr and done.stdout == ""
