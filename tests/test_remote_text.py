"""Text a server sends reaches no terminal and no log raw: control characters escaped.

A malicious server (tests/evil_server.py: the real daemon and hello, then an Error
whose text it chooses, or an SSH disconnect with its reason) tries to hide the
real error with ``ESC[8m``, paint a fake green success, overwrite the line with
``\\r`` and reverse it with U+202E. ``cldcb-client recover`` and ``status``, the
plugin's log lines to lightningd and its status file, and ``install --ssh``
(the server host's stderr and its ``add --json`` answer) must show all of it
escaped, as ``\\x1b[8m``, ``\\u202e``...
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo import NETWORK, client
from helpers.installkit import client_env, run_cli
from helpers.plugin_harness import Target, make_node, new_keys, plugin_status
from helpers.servers import CldcbServer, PrivateSshd, _write_key
from helpers.simlightningd import NodeStopped
from helpers.traces import load_trace
from hypothesis import given
from hypothesis import strategies as st
from test_recover_e2e import fresh_node

from cldcb.core import wire
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.remote_text import escape_remote
from cldcb.errors import UsageError
from cldcb.plugin.wrapper import (
    WRAPPER_NAME,
    ServerEntry,
    WrapperConfig,
    default_plugin_path,
    write_wrapper,
)
from cldcb.transport.connection import ServerAddress

EVIL = ("\x1b[8mthe real error\x1b[0m\r\x1b[32mRecovered OK: data_version 9999, IDENTICAL"
        "\x1b[0m \u202elive\u202c\x07\x9b2J\x7f tail\nsecond line")
RAW = [b"\x1b", b"\r", b"\x07", b"\x7f", "\u202e".encode(), "\u202c".encode(),
       "\x9b".encode()]
SHOWN = "\\x1b[8mthe real error\\x1b[0m\\x0d\\x1b[32mRecovered OK"
EVIL_DIR = Path(__file__).resolve().parent / "evil_server.py"


def assert_escaped(out: bytes, *, shown: str = SHOWN) -> None:
    """``out`` holds none of the raw controls, and the escaped text is visible."""
    for raw in RAW:
        assert raw not in out, (raw, out.decode("utf-8", "replace"))
    assert shown.encode() in out, out.decode("utf-8", "replace")


# --- the function ----------------------------------------------------------------------

def test_escape_remote_examples() -> None:
    assert escape_remote("plain text, ünïcödé and \\x1b as typed") == \
        "plain text, ünïcödé and \\x1b as typed"
    assert escape_remote("\x1b[8m\r\n\t\x00\x7f\x9b") == \
        "\\x1b[8m\\x0d\\x0a\\x09\\x00\\x7f\\x9b"
    assert escape_remote("a\u202eb\u2066c\u200bd\u2028") == \
        "a\\u202eb\\u2066c\\u200bd\\u2028"
    assert escape_remote("\U000e0001") == "\\U000e0001"


@given(st.text())
def test_escape_remote_leaves_only_printable_text(text: str) -> None:
    shown = escape_remote(text)
    assert shown.isprintable()
    assert escape_remote(shown) == shown
    if text.isprintable():
        assert shown == text


def test_wire_text_fields_arrive_escaped() -> None:
    for msg in (wire.Error(6, EVIL), wire.NeedSnapshot(5, EVIL)):
        got = wire.FrameDecoder().feed(wire.encode(msg))[0]
        text = got.text if isinstance(got, wire.Error) else got.reason  # type: ignore[attr-defined]
        assert text == escape_remote(EVIL) and text.isprintable()


def test_a_server_address_with_control_characters_is_refused() -> None:
    with pytest.raises(UsageError) as err:
        ServerAddress.parse("\x1bMevil\u202e:29735")
    assert "\\x1bMevil\\u202e:29735" in str(err.value)
    assert str(err.value).isprintable()


# --- a malicious server, end to end -----------------------------------------------------

def evil_server(root: Path, **env: str) -> CldcbServer:
    server = CldcbServer(root / "data", command=[sys.executable, str(EVIL_DIR)],
                         extra_env={"CLDCB_EVIL_TEXT": EVIL, **env})
    return server.init()


@pytest.fixture
def evil(tmp_path: Path) -> Iterator[CldcbServer]:
    server = evil_server(tmp_path / "evil")
    yield server
    if server.proc is not None:
        server.stop()


def recover_bytes(lightning_dir: Path, server: CldcbServer) -> tuple[int, bytes]:
    done = client("recover", "--lightning-dir", str(lightning_dir), "--network", NETWORK,
                  "--server", server.address, "--server-id", server.server_id)
    return done.returncode, (done.stdout + done.stderr).encode()


@pytest.mark.parametrize("how", ["error", "disconnect"])
def test_recover_shows_a_malicious_servers_text_escaped(tmp_path: Path, how: str) -> None:
    env = {"CLDCB_EVIL_CODE": str(int(wire.ErrorCode.NOT_ALLOWED))} if how == "error" else \
        {"CLDCB_EVIL_DISCONNECT": "1"}
    server = evil_server(tmp_path / "evil", **env).start()
    try:
        lightning_dir = fresh_node(tmp_path, "mn_nopass")
        code, out = recover_bytes(lightning_dir, server)
    finally:
        server.stop()
    assert code != 0
    assert b"error: could not list the backups of node" in out
    assert_escaped(out)
    assert os.listdir(lightning_dir / NETWORK) == ["hsm_secret"]


def test_status_shows_a_malicious_servers_text_escaped(evil: CldcbServer,
                                                       tmp_path: Path) -> None:
    client_priv = new_privkey()
    client_id = client_id_from_pubkey(pubkey_of(client_priv))
    evil.add(client_id)
    evil.start()
    lightning_dir = tmp_path / "node"
    (lightning_dir / NETWORK).mkdir(parents=True)
    node_id = "0" + client_id[1:]          # any node id: status never asks the node
    write_wrapper(lightning_dir / NETWORK / WRAPPER_NAME, WrapperConfig(
        client_id, client_priv, node_id, (ServerEntry(evil.address, evil.server_id),),
        plugin_path=default_plugin_path()))
    for extra in ([], ["--json"]):
        done = client("status", "--lightning-dir", str(lightning_dir), "--network", NETWORK,
                      *extra)
        out = (done.stdout + done.stderr).encode()
        assert done.returncode == 1, out
        if extra:
            error = json.loads(done.stdout)["servers"][0]["error"]
            assert_escaped(error.encode())
        assert_escaped(out, shown=SHOWN if not extra else SHOWN.replace("\\", "\\\\"))


def test_plugin_logs_and_status_file_show_a_malicious_servers_text_escaped(
        evil: CldcbServer, tmp_path: Path) -> None:
    evil.start()
    keys = new_keys()
    node = make_node(tmp_path, keys, [Target(daemon=evil)], outage_limit=2)
    node.start()
    try:
        with pytest.raises(NodeStopped) as stopped:
            node.run_trace(load_trace("cln-workload")[:20])
    finally:
        node.crash()
    logs = "\n".join(node.log_messages())
    assert "\\x1b[8mthe real error" in logs
    assert_escaped(logs.encode())
    # what lightningd logs of the refusal: the plugin's answer as JSON (backslashes doubled)
    assert_escaped(stopped.value.reason.encode(), shown=SHOWN.replace("\\", "\\\\"))
    status = plugin_status(node)
    errors = [s["last_error"] for s in status["servers"] if s["last_error"]]
    assert errors
    for error in errors:
        assert_escaped(error.encode())


# --- install --ssh: the server host's own output --------------------------------------------

@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[PrivateSshd]:
    srv = PrivateSshd(tmp_path / "sshd").init()
    yield srv
    if srv.proc is not None:
        srv.stop()


def forced_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def install_through(sshd: PrivateSshd, tmp_path: Path, script: Path) -> tuple[int, bytes, Path]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    public = _write_key(home / ".ssh" / "id_ed25519")
    sshd.authorized_keys.write_text(f'restrict,command="{script}" {public}\n')
    if sshd.proc is None:
        sshd.start()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n")
    ln = fresh_node(tmp_path, "mn_nopass")
    done = run_cli("install", "--lightning-dir", str(ln), "--network", NETWORK,
                   "--ssh", f"{sshd.user}@127.0.0.1:{sshd.port}", "--wait", "5",
                   env=client_env(home))
    return done.returncode, (done.stdout + done.stderr).encode(), ln


def test_install_shows_the_server_hosts_stderr_escaped(sshd: PrivateSshd,
                                                       tmp_path: Path) -> None:
    script = forced_script(tmp_path / "add-fails.sh",
                           "printf 'starting\\n\\033[8mthe real error\\033[0m\\r\\033[32m"
                           "Recovered OK\\342\\200\\256\\a\\r\\n' >&2\nexit 1\n")
    code, out, ln = install_through(sshd, tmp_path, script)
    assert code != 0
    assert b"`cldcb-server add` failed on 127.0.0.1 (exit 1)" in out
    assert_escaped(out)
    assert not (ln / NETWORK / WRAPPER_NAME).exists()


def test_install_refuses_a_public_address_with_control_characters(sshd: PrivateSshd,
                                                                  tmp_path: Path) -> None:
    evil_address = "\x1bMevil\u202e:29735"
    answer = json.dumps({"client_id": "CID", "server_id": sshd.server_id,
                         "public_address": evil_address})
    script = forced_script(tmp_path / "add-lies.sh",
                           'set -- $SSH_ORIGINAL_COMMAND\n'
                           f"printf '%s\\n' '{answer}' | sed \"s/CID/$3/\"\n")
    code, out, ln = install_through(sshd, tmp_path, script)
    assert code != 0
    assert_escaped(out, shown="\\x1bMevil\\u202e:29735")
    assert not (ln / NETWORK / WRAPPER_NAME).exists()


def test_install_shows_a_hostile_ssh_banner_escaped(tmp_path: Path) -> None:
    """What paramiko puts in its exceptions (here the peer's version string) is shown
    escaped: a loopback listener answers with a banner full of controls."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"SSH-\x1b[8mthe_real_error\x1b[0m\r\x1b[32mRecovered_OK"
                         b"\xe2\x80\xae\x07-x\r\n")
            conn.recv(4096)

    peer = threading.Thread(target=answer, daemon=True)
    peer.start()
    try:
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        ln = fresh_node(tmp_path, "mn_nopass")
        done = run_cli("install", "--lightning-dir", str(ln), "--network", NETWORK,
                       "--ssh", f"root@127.0.0.1:{port}", env=client_env(home))
    finally:
        listener.close()
        peer.join(30)
    out = (done.stdout + done.stderr).encode()
    assert done.returncode != 0
    assert f"SSH to 127.0.0.1:{port} failed".encode() in out
    assert_escaped(out, shown="\\x1b[8mthe_real_error\\x1b[0m\\x0d\\x1b[32mRecovered_OK"
                   "\\u202e\\x07")
