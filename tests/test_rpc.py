"""cldcb.rpc: lightningd's JSON-RPC over its unix socket, and the simulated node's fidelity."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from simrpc import KEYS, SimRpcNode, vector

from cldcb.errors import UsageError
from cldcb.rpc import (
    LightningdNotRunning,
    LightningRpc,
    RpcError,
    RpcTransportError,
    database_from_wallet,
    rpc_path,
    wallet_option,
)
from cldcb.signmessage import verify_message


class FakeLightningd:
    """A unix socket answering each request with ``reply(request)`` as raw bytes chunks."""

    def __init__(self, path: Path, reply: Callable[[dict[str, Any]], list[bytes]]) -> None:
        self.path = path
        self.reply = reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buf += data
                    try:
                        request = json.loads(buf)
                    except ValueError:
                        continue
                    for chunk in self.reply(request):
                        conn.sendall(chunk)
                    buf = b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeLightningd]]:
    made: list[FakeLightningd] = []

    def make(reply: Callable[[dict[str, Any]], list[bytes]],
             path: Path | None = None) -> FakeLightningd:
        f = FakeLightningd(path or tmp_path / "lightning-rpc", reply)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def answer(request: dict[str, Any], **body: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request["id"], **body}).encode() + b"\n\n"


def test_answers_in_pieces_after_a_notification_are_parsed(fake, tmp_path: Path) -> None:
    def reply(req: dict[str, Any]) -> list[bytes]:
        note = json.dumps({"jsonrpc": "2.0", "method": "message",
                           "params": {"message": "x"}}).encode() + b"\n\n"
        data = answer(req, result={"id": "02" + "ab" * 32, "text": "é" * 50000,
                                   "nested": {"a": [1, 2, {"b": "}"}]}})
        # one byte at a time for the first part, cutting a UTF-8 sequence in two
        return [note] + [data[i:i + 1] for i in range(0, 200)] + [data[200:]]

    fake(reply)
    rpc = LightningRpc(tmp_path / "lightning-rpc", timeout=10)
    result = rpc.call("getinfo")
    assert result["text"] == "é" * 50000 and result["nested"]["a"][2] == {"b": "}"}
    assert rpc.is_running()


@pytest.mark.parametrize("raw", [b"[1, 2]\n\n", b"\xff\xfe{}\n\n", b"  \"text\"\n\n"])
def test_an_answer_that_is_no_json_object_is_a_transport_error(fake, tmp_path: Path,
                                                               raw: bytes) -> None:
    fake(lambda req: [raw])
    rpc = LightningRpc(tmp_path / "lightning-rpc", timeout=10)
    with pytest.raises(RpcTransportError, match="lightning-rpc socket"):
        rpc.call("getinfo")


def test_error_answers_carry_code_and_message(fake, tmp_path: Path) -> None:
    fake(lambda req: [answer(req, error={"code": -32601,
                                          "message": f"Unknown command '{req['method']}'"})])
    rpc = LightningRpc(tmp_path / "lightning-rpc", timeout=10)
    with pytest.raises(RpcError) as info:
        rpc.call("nosuch", {"a": 1})
    assert info.value.code == -32601 and info.value.method == "nosuch"
    assert "Unknown command 'nosuch'" in str(info.value)


def test_not_running_missing_or_stale_socket(tmp_path: Path) -> None:
    rpc = LightningRpc(tmp_path / "lightning-rpc", timeout=5)
    assert not rpc.is_running()
    with pytest.raises(LightningdNotRunning, match="not running"):
        rpc.call("getinfo")
    # a socket file left behind by a lightningd that died
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "lightning-rpc"))
    s.close()
    assert (tmp_path / "lightning-rpc").exists()
    assert not rpc.is_running()


def test_permission_denied_is_never_not_running(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, address: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    rpc = LightningRpc(tmp_path / "lightning-rpc", timeout=5)
    with pytest.raises(RpcTransportError, match="run as the node's user or root") as info:
        rpc.is_running()
    assert not isinstance(info.value, LightningdNotRunning)


def test_silence_times_out(fake, tmp_path: Path) -> None:
    fake(lambda req: [])
    rpc = LightningRpc(tmp_path / "lightning-rpc", timeout=0.5)
    with pytest.raises(RpcTransportError, match="did not answer `slow` within"):
        rpc.call("slow")


def test_a_socket_path_longer_than_sun_path_works(fake, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "lightning-rpc"
    assert len(str(path)) > 108
    cwd = os.getcwd()
    os.chdir(deep)  # bind by a short relative name, as lightningd does
    try:
        fake(lambda req: [answer(req, result={"ok": True})], Path("lightning-rpc"))
    finally:
        os.chdir(cwd)
    rpc = LightningRpc(path, timeout=5)
    assert rpc.is_running() and rpc.call("x") == {"ok": True}


def test_wallet_option_and_database() -> None:
    new = {"configs": {"wallet": {"value_str": "sqlite3:///data/ln/main.sqlite3",
                                  "source": "cmdline"}}}
    assert wallet_option(new) == "sqlite3:///data/ln/main.sqlite3"
    assert wallet_option({"wallet": "sqlite3://x.sqlite3"}) == "sqlite3://x.sqlite3"
    assert wallet_option({"configs": {}}) is None
    assert database_from_wallet(None) == "lightningd.sqlite3"
    assert database_from_wallet("sqlite3:///data/ln/main.sqlite3") == "/data/ln/main.sqlite3"
    assert database_from_wallet("sqlite3://rel.sqlite3") == "rel.sqlite3"
    assert database_from_wallet("sqlite3:///a/main.sqlite3:/b/backup.sqlite3") == \
        "/a/main.sqlite3"
    for dsn in ("postgres://user:hunter2@db.example/lightning",
                "postgresql://user:hunter2@db/ln"):
        with pytest.raises(UsageError, match="PostgreSQL") as info:
            database_from_wallet(dsn)
        assert "hunter2" not in str(info.value)
    with pytest.raises(UsageError, match="sqlite3://"):
        database_from_wallet("mysql://x")
    assert rpc_path("/ln", "regtest") == Path("/ln/regtest/lightning-rpc")


@pytest.fixture
def simnode(tmp_path: Path) -> Iterator[SimRpcNode]:
    with SimRpcNode(tmp_path / "ln", preplay=3) as node:
        yield node


def test_simulated_node_signs_exactly_like_core_lightning(simnode: SimRpcNode) -> None:
    rpc = LightningRpc.for_node(simnode.lightning_dir, "regtest", timeout=10)
    assert rpc.node_id() == vector("plain32")["node_id"]
    for sample in KEYS["signmessage"]:
        result = rpc.call("signmessage", {"message": sample["message"]})
        assert (result["zbase"], result["signature"], result["recid"]) == (
            sample["zbase"], sample["signature"], sample["recid"])
    # lightningd signs the text as it appears in the JSON string, without unescaping
    tricky = 'say "hi"'
    zbase = rpc.signmessage(tricky)
    node_pub = simnode.node_key.pubkey
    assert not verify_message(tricky, zbase, node_pub)
    assert verify_message(json.dumps(tricky)[1:-1], zbase, node_pub)


def test_simulated_node_rpc_surface(simnode: SimRpcNode) -> None:
    rpc = LightningRpc.for_node(simnode.lightning_dir, "regtest", timeout=10)
    assert rpc.database() == "lightningd.sqlite3"
    assert rpc.plugin_list() == []
    with pytest.raises(RpcError) as info:
        rpc.call("nosuchcommand")
    assert info.value.code == -32601
    with pytest.raises(RpcError, match="No such file"):
        rpc.plugin_start(simnode.network_dir / "missing-plugin", timeout=30)
