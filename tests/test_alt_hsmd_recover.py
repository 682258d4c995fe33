"""``--alt-hsmd``: recovery and the restore drill with the node key held by an hsmd-like program.

The program is ``tests/hsmd_double.py``, a self-contained double of Core
Lightning's ``lightning_hsmd``. It is shown faithful first: its replies to the
requests recorded with the real ``lightning_hsmd`` (``hsmd-transcripts.json``,
all four ``hsm_secret`` formats) are byte-identical to the real replies. Then
the very same program recovers real backups (every ECDH and the recognition
check go through it over the hsmd wire protocol), and the databases equal
those recovered with the ``hsm_secret`` file itself, and the real node's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from demo import (
    NETWORK,
    Target,
    client,
    dump,
    install_client,
    play,
    vector_secret,
)
from helpers.environment import DATA
from helpers.servers import CldcbServer
from helpers.traces import expected_dump_bytes

from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.node.nodekey import LocalNodeKey

pytestmark = pytest.mark.timeout(300)
DOUBLE = Path(__file__).resolve().parent / "hsmd_double.py"
TRACES = {"plain32": "cln-crash-restart", "mn_pass": "cln-workload"}
SECRET_NODE = {"plain32": "plain32", "enc73": "plain32", "mn_pass": "mn_pass"}


def _frame(sock: socket.socket) -> bytes:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            assert part, "the program closed its socket"
            buf += part
        return buf
    return exact(struct.unpack(">I", exact(4))[0])


def raw_exchange(workdir: Path, requests: list[bytes]) -> list[bytes]:
    """Run the double as lightningd runs hsmd (fd 0 status, fd 3 requests); its replies."""
    status_ours, status_theirs = socket.socketpair()
    req_ours, req_theirs = socket.socketpair()
    fd = req_theirs.fileno()

    def fd3() -> None:
        if fd == 3:
            os.set_inheritable(3, True)
        else:
            os.dup2(fd, 3)

    proc = subprocess.Popen([str(DOUBLE)], cwd=workdir, stdin=status_theirs.fileno(),
                            close_fds=False, preexec_fn=fd3)
    status_theirs.close()
    req_theirs.close()
    try:
        req_ours.settimeout(30)
        replies = []
        for request in requests:
            req_ours.sendall(struct.pack(">I", len(request)) + request)
            replies.append(_frame(req_ours))
        return replies
    finally:
        req_ours.close()
        status_ours.close()
        assert proc.wait(10) == 0


def test_double_replies_equal_core_lightnings_bytes(tmp_path: Path) -> None:
    transcripts: list[dict[str, Any]] = json.loads(
        (DATA / "hsmd-transcripts.json").read_text())["transcripts"]
    assert {t["hsm_secret"] for t in transcripts} == {"plain32", "enc73", "mn_nopass",
                                                      "mn_pass"}
    for t in transcripts:
        workdir = tmp_path / t["hsm_secret"]
        workdir.mkdir()
        (workdir / "hsm_secret").write_bytes(bytes.fromhex(
            vector_secret(t["hsm_secret"])["file_hex"]))
        replies = raw_exchange(workdir, [bytes.fromhex(e["request_hex"])
                                         for e in t["exchanges"]])
        for exchange, reply in zip(t["exchanges"], replies, strict=True):
            assert reply.hex() == exchange["reply_hex"], (t["hsm_secret"], exchange["what"])


@dataclass
class World:
    server: CldcbServer
    live: dict[str, Path]        # lightning-dirs as the backup left them (for verify)
    client_ids: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("alt-hsmd")
    server = CldcbServer(root / "server").init().start()
    try:
        live, ids = {}, {}
        for name, trace in TRACES.items():
            secret = vector_secret(name)
            lightning_dir = root / f"node-{name}"
            (lightning_dir / NETWORK).mkdir(parents=True)
            file_bytes = bytes.fromhex(secret["file_hex"])
            (lightning_dir / NETWORK / "hsm_secret").write_bytes(file_bytes)
            client_priv = new_privkey()
            ids[name] = client_id_from_pubkey(pubkey_of(client_priv))
            server.add(ids[name])
            install_client(lightning_dir / NETWORK,
                           LocalNodeKey.from_hsm_secret_bytes(file_bytes, secret["passphrase"]),
                           [Target(server.address, server.server_id)], client_priv)
            play(lightning_dir, trace)
            live[name] = lightning_dir
        yield World(server, live, ids)
    finally:
        server.stop()


def lost_node(tmp_path: Path, secret: str) -> Path:
    lightning_dir = tmp_path / "lightning"
    (lightning_dir / NETWORK).mkdir(parents=True)
    (lightning_dir / NETWORK / "hsm_secret").write_bytes(
        bytes.fromhex(vector_secret(secret)["file_hex"]))
    return lightning_dir


def recover(world: World, lightning_dir: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return client("recover", "--lightning-dir", str(lightning_dir), "--network", NETWORK,
                  "--server", world.server.address, "--server-id", world.server.server_id,
                  *more)


@pytest.mark.parametrize("secret", ["plain32", "enc73", "mn_pass"])
def test_recover_with_alt_hsmd_equals_hsm_secret(world: World, tmp_path: Path,
                                                 secret: str) -> None:
    node = SECRET_NODE[secret]
    more: list[str] = []
    passphrase = vector_secret(secret)["passphrase"]
    if passphrase:
        (tmp_path / "pass").write_text(passphrase)
        more = ["--passphrase-file", str(tmp_path / "pass")]
    with_hsmd = lost_node(tmp_path / "hsmd", secret)
    done = recover(world, with_hsmd, "--alt-hsmd", str(DOUBLE), *more)
    assert done.returncode == 0, done.stderr
    with_file = lost_node(tmp_path / "file", secret)
    done2 = recover(world, with_file, *more)
    assert done2.returncode == 0, done2.stderr
    recovered = dump(with_hsmd / NETWORK / "lightningd.sqlite3")
    assert recovered == dump(with_file / NETWORK / "lightningd.sqlite3")
    assert recovered == expected_dump_bytes(TRACES[node])
    assert f"client {world.client_ids[node]}" in done.stdout
    wrappers = [(d / NETWORK / "cldcb-plugin-wrapper").read_text().replace(str(d), "")
                for d in (with_hsmd, with_file)]
    assert wrappers[0] == wrappers[1]


def test_alt_hsmd_that_creates_a_new_secret(world: World, tmp_path: Path) -> None:
    lightning_dir = tmp_path / "lightning"
    (lightning_dir / NETWORK).mkdir(parents=True)
    done = recover(world, lightning_dir, "--alt-hsmd", str(DOUBLE))
    assert done.returncode != 0
    assert "created a new one, for a new node 0" in done.stderr
    assert "it was removed" in done.stderr
    assert os.listdir(lightning_dir / NETWORK) == []


def test_verify_with_alt_hsmd(world: World, tmp_path: Path) -> None:
    lightning_dir = tmp_path / "live"
    shutil.copytree(world.live["mn_pass"], lightning_dir)
    (tmp_path / "pass").write_text(vector_secret("mn_pass")["passphrase"] + "\n")
    done = client("verify", "--lightning-dir", str(lightning_dir), "--network", NETWORK,
                  "--alt-hsmd", str(DOUBLE), "--passphrase-file", str(tmp_path / "pass"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IDENTICAL" in done.stdout
