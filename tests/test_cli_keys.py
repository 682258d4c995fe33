"""The key commands of cldcb-client and cldcb-server, run as real programs."""

from __future__ import annotations

import json
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cldcb.node.keyfile import read_client_key, read_server_key


def console_script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `pip install -e .`")
    return found


CLIENT = console_script("cldcb-client")
SERVER = console_script("cldcb-server")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=60, env=env)


def run_on_pty(args: list[str], answer: str | None = None,
               timeout: float = 60) -> tuple[int, str, str]:
    """Run with stdin and stderr on a pseudo-terminal; type ``answer`` at a prompt.

    Returns (exit code, what appeared on the terminal, stdout).
    """
    master, slave = os.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=subprocess.PIPE, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    seen = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the program has closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if answer is not None and not answered and b"assphrase" in seen:
                os.write(master, answer.encode() + b"\n")
                answered = True
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, seen.decode(errors="replace"), out


@pytest.fixture(scope="module")
def secrets(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The vectors' hsm_secret files and passphrase files, by name."""
    folder = tmp_path_factory.mktemp("secrets")
    keys = json.loads((data_dir / "cln-keys.json").read_text())
    out: dict[str, Any] = {}
    for entry in keys["hsm_secrets"]:
        path = folder / entry["name"]
        path.write_bytes(bytes.fromhex(entry["file_hex"]))
        pw_file = None
        if entry["passphrase"] is not None:
            pw_file = folder / f"{entry['name']}.passphrase"
            pw_file.write_text(entry["passphrase"] + "\n")
        out[entry["name"]] = {"path": path, "pw_file": pw_file, **entry}
    return out


# --- cldcb-client nodeid ------------------------------------------------------------

def test_nodeid_of_every_vector(secrets: dict[str, Any]) -> None:
    for name, entry in secrets.items():
        args = [CLIENT, "nodeid", "--hsm-secret", str(entry["path"])]
        if entry["pw_file"] is not None:
            args += ["--passphrase-file", str(entry["pw_file"])]
        result = run(*args)
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout == entry["node_id"] + "\n"
        assert result.stderr == ""


def test_nodeid_prompts_on_a_terminal_when_needed(secrets: dict[str, Any]) -> None:
    entry = secrets["mn_pass"]
    code, terminal, out = run_on_pty([CLIENT, "nodeid", "--hsm-secret", str(entry["path"])],
                                     answer=entry["passphrase"])
    assert code == 0, terminal
    assert out == entry["node_id"] + "\n"
    assert "Passphrase for hsm_secret" in terminal
    assert entry["passphrase"] not in terminal  # not echoed


def test_nodeid_prompt_then_wrong_passphrase(secrets: dict[str, Any]) -> None:
    entry = secrets["mn_pass"]
    code, terminal, out = run_on_pty([CLIENT, "nodeid", "--hsm-secret", str(entry["path"])],
                                     answer="trezor")
    assert code == 1
    assert out == ""
    assert "error: the passphrase does not match" in terminal


def test_nodeid_no_prompt_when_not_needed(secrets: dict[str, Any]) -> None:
    for name in ("plain32", "mn_nopass"):
        entry = secrets[name]
        code, terminal, out = run_on_pty([CLIENT, "nodeid", "--hsm-secret",
                                          str(entry["path"])])
        assert code == 0, terminal
        assert out == entry["node_id"] + "\n"
        assert "assphrase" not in terminal


def test_nodeid_three_distinct_errors(secrets: dict[str, Any], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(bytes(32) + b"abandon abandon abandon\xff")

    missing = run(CLIENT, "nodeid", "--hsm-secret", str(secrets["mn_pass"]["path"]))
    wrong_pw = run(CLIENT, "nodeid", "--hsm-secret", str(secrets["mn_pass"]["path"]),
                   "--passphrase-file", str(wrong))
    damaged = run(CLIENT, "nodeid", "--hsm-secret", str(corrupt))

    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ")
    assert "stdin is not a terminal" in missing.stderr
    assert "--passphrase-file" in missing.stderr

    assert wrong_pw.returncode == 1
    assert wrong_pw.stderr.startswith("error: the passphrase does not match")
    assert "not it" not in wrong_pw.stderr

    assert damaged.returncode == 1
    assert damaged.stderr.startswith("error: ") and "damaged" in damaged.stderr
    assert str(corrupt) in damaged.stderr

    for result in (missing, wrong_pw, damaged):
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
    assert len({missing.stderr, wrong_pw.stderr, damaged.stderr}) == 3


def test_nodeid_wrong_passphrase_encrypted(secrets: dict[str, Any], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("correct horse battery staple")
    result = run(CLIENT, "nodeid", "--hsm-secret", str(secrets["enc73"]["path"]),
                 "--passphrase-file", str(wrong))
    assert result.returncode == 1
    assert result.stderr.startswith("error: the passphrase does not decrypt")


def test_nodeid_passphrase_for_unprotected_secret(secrets: dict[str, Any]) -> None:
    result = run(CLIENT, "nodeid", "--hsm-secret", str(secrets["mn_nopass"]["path"]),
                 "--passphrase-file", str(secrets["mn_pass"]["pw_file"]))
    assert result.returncode == 1
    assert "has no passphrase" in result.stderr and "without --passphrase-file" in result.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    plain = run(CLIENT, "nodeid", "--hsm-secret", str(tmp_path / "absent"))
    debug = run(CLIENT, "--debug", "nodeid", "--hsm-secret", str(tmp_path / "absent"))
    assert plain.returncode == debug.returncode == 1
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and "HsmSecretError" in debug.stderr
    assert plain.stderr.strip().splitlines()[-1] == debug.stderr.strip().splitlines()[-1]
    assert "does not exist" in plain.stderr


# --- cldcb-client newclient ------------------------------------------------------------

def test_newclient_creates_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    first = run(CLIENT, "newclient", str(path))
    assert first.returncode == 0, first.stderr
    client_id = first.stdout.strip()
    assert client_id.startswith(("c2", "c3")) and len(client_id) == 66
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_client_key(path)[1] == client_id
    content = path.read_bytes()

    second = run(CLIENT, "newclient", str(path))
    assert second.returncode == 1
    assert second.stderr.startswith("error: ") and "already exists" in second.stderr
    assert second.stdout == ""
    assert path.read_bytes() == content

    other = run(CLIENT, "newclient", str(tmp_path / "other.key"))
    assert other.returncode == 0 and other.stdout.strip() != client_id


# --- cldcb-server init / id --------------------------------------------------------------

def test_server_init_and_id(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv" / "data"
    init = run(SERVER, "--data-dir", str(data_dir), "init", "--public-address",
               "backup.example.org:9735")
    assert init.returncode == 0, init.stderr
    server_id = init.stdout.strip()
    assert server_id.startswith(("52", "53")) and len(server_id) == 66
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    key_path = data_dir / "server_key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert read_server_key(key_path)[1] == server_id
    settings = json.loads((data_dir / "server.json").read_text())
    assert settings["public_address"] == "backup.example.org:9735"

    ident = run(SERVER, "--data-dir", str(data_dir), "id")
    assert ident.returncode == 0 and ident.stdout == server_id + "\n"

    key = key_path.read_bytes()
    again = run(SERVER, "--data-dir", str(data_dir), "init")
    assert again.returncode == 1
    assert "already exists" in again.stderr and again.stderr.startswith("error: ")
    assert key_path.read_bytes() == key


def test_server_data_dir_from_environment(tmp_path: Path) -> None:
    env = {**os.environ, "CLDCB_SERVER_DIR": str(tmp_path / "env-dir")}
    init = run(SERVER, "init", env=env)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "env-dir" / "server_key").exists()
    assert json.loads((tmp_path / "env-dir" / "server.json").read_text()) == {
        "public_address": None}
    assert run(SERVER, "id", env=env).stdout == init.stdout


@pytest.mark.parametrize("address", ["example.org", "example.org:0", "example.org:x",
                                     ":9735", "::1:9735", "example.org:70000"])
def test_server_init_rejects_bad_address(tmp_path: Path, address: str) -> None:
    result = run(SERVER, "--data-dir", str(tmp_path / "d"), "init", "--public-address", address)
    assert result.returncode == 2
    assert "--public-address must be HOST:PORT" in result.stderr
    assert not (tmp_path / "d").exists()


def test_server_init_accepts_ipv6(tmp_path: Path) -> None:
    result = run(SERVER, "--data-dir", str(tmp_path / "d"), "init", "--public-address",
                 "[2001:db8::1]:9735")
    assert result.returncode == 0, result.stderr


def test_server_id_before_init(tmp_path: Path) -> None:
    result = run(SERVER, "--data-dir", str(tmp_path / "empty"), "id")
    assert result.returncode == 1
    assert "run `cldcb-server init` first" in result.stderr


def test_server_refuses_a_key_file_readable_by_others(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    assert run(SERVER, "--data-dir", str(data), "init").returncode == 0
    keys = [data / "server_key"]
    assert keys[0].stat().st_mode & 0o777 == 0o600
    keys[0].chmod(0o644)
    result = run(SERVER, "--data-dir", str(data), "id")
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "readable by other users" in result.stderr and f"chmod 600 {keys[0]}" in result.stderr
    keys[0].chmod(0o600)
    assert run(SERVER, "--data-dir", str(data), "id").returncode == 0
