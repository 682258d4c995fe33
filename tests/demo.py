#!/usr/bin/env python3
"""The cldcb demo: back a node up, lose everything but ``hsm_secret``, recover it.

Run from the repository (after ``python3 -m pip install -e '.[test]'``)::

    python3 tests/demo.py [--trace cln-channels] [--keep]

On 127.0.0.1 only, in a temporary folder:

1. ``cldcb-server init`` and ``cldcb-server serve`` (a real daemon, a subprocess);
2. a node folder with the ``hsm_secret`` of a real Core Lightning node
   (``tests/data/cln-keys.json``), a client key registered on the server
   (``cldcb-server add``), its recognition entry stored there and the
   ``cldcb-plugin-wrapper`` written, as ``cldcb-client installplugin`` does;
3. the simulated lightningd (``tests/simlightningd.py``) plays a real Core
   Lightning ``db_write`` trace (the channel trace by default) through the real
   plugin, which backs every change up before lightningd commits it;
4. everything in the node's folder but ``hsm_secret`` is deleted;
5. ``cldcb-client recover`` rebuilds the database from the server;
6. the recovered database is compared with the original: ``sqlite3 .dump``
   byte for byte (Python's ``iterdump`` when the ``sqlite3`` program is
   missing).

Exit status 0 only if the two are identical. The server is stopped by its pid
and the temporary folder removed (unless ``--keep``), whatever happens.
The helpers here are also what the end-to-end tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from helpers.servers import CldcbServer
from helpers.simlightningd import SimLightningd
from helpers.traces import load_trace

from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.recognition import make_recognition, message_for_client
from cldcb.core.session import Role
from cldcb.node.nodekey import LocalNodeKey, NodeKey
from cldcb.plugin.wrapper import (
    WRAPPER_NAME,
    ServerEntry,
    WrapperConfig,
    default_plugin_path,
    write_wrapper,
)
from cldcb.transport.connection import Connection, ServerSpec

TESTS = Path(__file__).resolve().parent
CLIENT_CMD = [sys.executable, "-m", "cldcb.client.app"]
NETWORK = "regtest"
KEYS = TESTS / "data" / "cln-keys.json"


def vector_secret(name: str) -> dict[str, str]:
    """One ``hsm_secret`` of ``cln-keys.json`` (name, file_hex, passphrase, node_id)."""
    return next(k for k in json.loads(KEYS.read_text())["hsm_secrets"] if k["name"] == name)


@dataclass(frozen=True)
class Target:
    """A server a client is installed on (``host_key`` for ssh:// servers)."""

    address: str
    server_id: str
    host_key: str | None = None
    proxy: str | None = None            # socks5://HOST:PORT

    @property
    def spec(self) -> ServerSpec:
        return self.entry.spec()

    @property
    def entry(self) -> ServerEntry:
        return ServerEntry(self.address, self.server_id, self.host_key, self.proxy)


async def _put_recognition(targets: Sequence[Target], client_priv: bytes, entry: bytes) -> None:
    for t in targets:
        async with await Connection.open(t.spec, client_priv, Role.READER) as conn:
            await conn.put_recognition(entry)


def install_client(network_dir: Path, node: NodeKey, targets: Sequence[Target],
                   client_priv: bytes | None = None, quorum: int | None = None) -> WrapperConfig:
    """What ``installplugin`` does once the client is registered on every server:
    the recognition entry on each, then the wrapper (lightningd not running)."""
    client_priv = client_priv or new_privkey()
    signed = node.sign_message(message_for_client(client_priv, node.pubkey))
    entry = make_recognition(client_priv, node.pubkey, signed.zbase, new_privkey()).encode()
    asyncio.run(_put_recognition(targets, client_priv, entry))
    cfg = WrapperConfig(client_id_from_pubkey(pubkey_of(client_priv)), client_priv,
                        node.node_id, tuple(t.entry for t in targets),
                        quorum=quorum, plugin_path=default_plugin_path())
    write_wrapper(network_dir / WRAPPER_NAME, cfg)
    return cfg


def new_node(lightning_dir: Path, secret_name: str, servers: Sequence[CldcbServer],
             targets: Sequence[Target], add_args: Sequence[str] = ()) -> bytes:
    """A node folder holding the ``hsm_secret`` of ``secret_name`` (``cln-keys.json``) and
    a new client, registered on ``servers`` (``add_args``: its settings) and installed for
    ``targets``; its key."""
    network_dir = lightning_dir / NETWORK
    network_dir.mkdir(parents=True)
    vector = vector_secret(secret_name)
    secret = bytes.fromhex(vector["file_hex"])
    (network_dir / "hsm_secret").write_bytes(secret)
    client_priv = new_privkey()
    for server in servers:
        server.add(client_id_from_pubkey(pubkey_of(client_priv)), *add_args)
    install_client(network_dir, LocalNodeKey.from_hsm_secret_bytes(secret, vector["passphrase"]),
                   targets, client_priv)
    return client_priv


def backed_node(lightning_dir: Path, server: CldcbServer, secret: str,
                *add_args: str) -> tuple[Path, str]:
    """A node folder holding the ``secret`` vector's hsm_secret and the wrapper of a new
    client registered on ``server`` (``add_args``: its settings); (network dir, client id)."""
    priv = new_node(lightning_dir, secret, [server], [Target(server.address, server.server_id)],
                    add_args)
    return lightning_dir / NETWORK, client_id_from_pubkey(pubkey_of(priv))


def play(lightning_dir: Path, trace: str, *, start: int = 0, stop: int | None = None,
         network: str = NETWORK, progress: bool = False) -> int:
    """Play calls ``start..stop`` of ``trace`` through the plugin; the committed data_version."""
    network_dir = lightning_dir / network
    node = SimLightningd(lightning_dir, network_dir / WRAPPER_NAME, network=network)
    calls = load_trace(trace)
    end = len(calls) if stop is None else stop

    def show(i: int, _node: SimLightningd) -> None:
        if progress and (i - start) % 500 == 0 and i > start:
            print(f"  {i - start} of {end - start} calls, data_version {calls[i][0]}",
                  flush=True)

    node.start()
    try:
        node.run_trace(calls, start=start, stop=stop, init_after=start + 5 if start else 5,
                       before_call=show)
    finally:
        node.close()
    return node.committed_data_version()


def delete_all_but_hsm_secret(network_dir: Path) -> None:
    for p in network_dir.iterdir():
        if p.name == "hsm_secret":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def dump(db: Path) -> bytes:
    """``sqlite3 DB .dump`` (Python's iterdump when the sqlite3 program is missing)."""
    program = shutil.which("sqlite3")
    if program:
        return subprocess.run([program, str(db), ".dump"], capture_output=True, check=True,
                              timeout=300).stdout
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "".join(line + "\n" for line in con.iterdump()).encode("utf-8",
                                                                       "surrogateescape")
    finally:
        con.close()


def client(*args: str, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``cldcb-client ARGS`` (this checkout's, with this Python)."""
    return subprocess.run([*CLIENT_CMD, *args], capture_output=True, text=True,
                           timeout=timeout, env=env)


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(root: Path, trace: str) -> bool:
    secret = vector_secret("plain32")
    lightning_dir = root / "node"
    network_dir = lightning_dir / NETWORK
    network_dir.mkdir(parents=True)
    (network_dir / "hsm_secret").write_bytes(bytes.fromhex(secret["file_hex"]))
    server = CldcbServer(root / "server")
    try:
        _step("a backup server on 127.0.0.1 (cldcb-server init, serve)")
        server.init().start()
        print(f"server {server.address}, id {server.server_id}")

        _step("installing the plugin on the stopped node (cldcb-client newclient, "
              "cldcb-server add, cldcb-client installplugin)")
        key_file = root / "client.key"
        made = client("newclient", str(key_file))
        if made.returncode != 0:
            print(f"demo FAILED: newclient: {made.stderr.strip()}")
            return False
        client_id = made.stdout.strip()
        server.add(client_id)
        installed = client("installplugin", "--lightning-dir", str(lightning_dir),
                           "--network", NETWORK, "--client-privkey", str(key_file),
                           "--server", server.address, "--server-id", server.server_id,
                           "--yes")
        print(installed.stdout.rstrip())
        if installed.returncode != 0:
            print(f"demo FAILED: installplugin: {installed.stderr.strip()}")
            return False
        key_file.unlink()  # the wrapper holds the key now
        print(f"client {client_id}; key file deleted, the wrapper "
              f"{network_dir / WRAPPER_NAME} (mode 0700) holds it")

        calls = len(load_trace(trace))
        _step(f"simulated lightningd plays the real trace {trace} ({calls} db_write calls) "
              "through the plugin")
        started = time.monotonic()
        data_version = play(lightning_dir, trace, progress=True)
        print(f"committed data_version {data_version} in {time.monotonic() - started:.1f} s; "
              "every change was on the server before lightningd committed it")
        original = dump(network_dir / "lightningd.sqlite3")
        print(f"original database: {len(original)} bytes of dump, sha256 "
              f"{hashlib.sha256(original).hexdigest()[:16]}…")

        _step("disaster: everything in the node's folder but hsm_secret is deleted")
        delete_all_but_hsm_secret(network_dir)
        print("left:", ", ".join(sorted(os.listdir(network_dir))))

        _step(f"cldcb-client recover --lightning-dir {lightning_dir} --network {NETWORK} "
              f"--server {server.address} --server-id {server.server_id[:12]}…")
        done = subprocess.run([*CLIENT_CMD, "recover", "--lightning-dir", str(lightning_dir),
                               "--network", NETWORK, "--server", server.address,
                               "--server-id", server.server_id], timeout=600)
        if done.returncode != 0:
            print(f"demo FAILED: recover exited with {done.returncode}")
            return False

        _step("comparing the recovered database with the original "
              f"({'sqlite3 .dump' if shutil.which('sqlite3') else 'Python iterdump'})")
        recovered = dump(network_dir / "lightningd.sqlite3")
        print(f"recovered database: {len(recovered)} bytes of dump, sha256 "
              f"{hashlib.sha256(recovered).hexdigest()[:16]}…")
        if recovered != original:
            print("demo FAILED: the recovered database differs from the original")
            return False
        print("IDENTICAL: the node was rebuilt from its hsm_secret alone")
        return True
    finally:
        if server.proc is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default="cln-channels",
                    choices=["cln-channels", "cln-workload", "cln-crash-restart"])
    ap.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="cldcb-demo-"))
    ok = False
    try:
        ok = run_demo(root, args.trace)
    except Exception as exc:
        traceback.print_exc()
        print(f"demo FAILED: {type(exc).__name__}: {exc}")
    finally:
        if args.keep:
            print(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
