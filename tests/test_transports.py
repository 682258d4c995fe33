"""One contract suite for the three transports, and the authentication rules.

Transports: the asyncssh daemon (``cldcb-server serve``), OpenSSH sshd with
the ``cldcb`` Subsystem, and sshd with an ``authorized_keys`` forced command
(``stdio --client``). All real processes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from helpers.entries import recognition_entry
from helpers.servers import SERVER_CMD, CldcbServer, PrivateSshd, run_server_cmd

from cldcb.core import wire
from cldcb.core.dataversion import Kind
from cldcb.core.ids import client_id_from_pubkey, pubkey_of
from cldcb.core.seal import ChainVerifier, RecordSealer, SnapshotOpener, SnapshotSealer, item_hash
from cldcb.core.session import Role
from cldcb.errors import AuthError, RemoteError, TransportError, UsageError
from cldcb.node.nodekey import LocalNodeKey
from cldcb.transport.connection import Connection, ServerAddress, ServerSpec
from cldcb.transport.sshkeys import derived_public_line, secp256k1_ssh_key

NODE = LocalNodeKey(bytes([0x11]) * 32)


def new_client() -> tuple[bytes, str]:
    priv = os.urandom(32)
    return priv, client_id_from_pubkey(pubkey_of(priv))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CldcbServer]:
    srv = CldcbServer(tmp_path_factory.mktemp("daemon") / "data").init().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    srv = PrivateSshd(tmp_path_factory.mktemp("sshd")).init().start()
    yield srv
    srv.stop()


class Transport:
    """How a test reaches a registered client on one transport."""

    def __init__(self, kind: str, daemon: CldcbServer | None, sshd: PrivateSshd | None) -> None:
        self.kind = kind
        self.daemon = daemon
        self.sshd = sshd

    def register(self) -> tuple[bytes, str, ServerSpec]:
        priv, cid = new_client()
        if self.kind == "daemon":
            assert self.daemon
            self.daemon.add(cid)
            return priv, cid, self.daemon.spec
        assert self.sshd
        self.sshd.add(cid)
        self.sshd.authorize_client(priv, cid, forced=self.kind == "sshd-forced")
        return priv, cid, self.sshd.spec()


@pytest.fixture(params=["daemon", "sshd-subsystem", "sshd-forced"])
def transport(request: pytest.FixtureRequest) -> Transport:
    if request.param == "daemon":
        return Transport("daemon", request.getfixturevalue("daemon"), None)
    return Transport(request.param, None, request.getfixturevalue("sshd"))


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


async def upload_snapshot(conn: Connection, client: bytes, dv: int, anchor: bytes,
                          data: list[bytes]) -> wire.SnapshotAck:
    s = SnapshotSealer(NODE.pubkey, client, os.urandom(32), dv, anchor)
    await conn.begin_snapshot(1, dv, anchor)
    for i, chunk in enumerate(data):
        ack = await conn.send_chunk(1, i, s.seal_chunk(chunk))
        assert ack.index == i
    return await conn.end_snapshot(1, s.chunk_count, s.seal_manifest(123))


def test_contract(transport: Transport) -> None:
    priv, cid, spec = transport.register()

    async def body() -> None:
        async with await Connection.open(spec, priv, Role.WRITER) as conn:
            entry = recognition_entry(NODE, priv)
            await conn.put_recognition(entry)
            assert entry in await conn.list_recognitions()
            st = await conn.status()
            assert not st.has_tip and st.snapshot_data_version == -1
            sealer = RecordSealer(NODE.pubkey, priv, os.urandom(32))
            anchor = os.urandom(32)
            rec = sealer.seal_change(5, Kind.NORMAL, anchor, ["INSERT INTO t VALUES (1)"], 1)
            # first contact: nothing held, so the server asks for a snapshot
            assert isinstance(await conn.write(5, Kind.NORMAL, anchor, rec), wire.NeedSnapshot)
            data = [os.urandom(300_000), os.urandom(1000)]
            ack = await upload_snapshot(conn, priv, 4, anchor, data)
            assert ack.data_version == 4
            reply = await conn.write(5, Kind.NORMAL, anchor, rec)
            assert isinstance(reply, wire.Ack) and reply.data_version == 5
            rec6 = sealer.seal_change(6, Kind.NORMAL, item_hash(rec), ["x"], 2)
            # concurrent requests from two tasks are answered in order
            r6, st = await asyncio.gather(conn.write(6, Kind.NORMAL, item_hash(rec), rec6),
                                          conn.status())
            assert isinstance(r6, wire.Ack)
            assert st.has_tip and st.tip_data_version == 6 and st.tip_hash == item_hash(rec6)
            assert st.tip_link == item_hash(rec) and st.snapshot_data_version == 4
            # a gap is refused, nothing stored
            gap = sealer.seal_change(9, Kind.NORMAL, item_hash(rec6), ["y"], 3)
            assert isinstance(await conn.write(9, Kind.NORMAL, item_hash(rec6), gap),
                              wire.NeedSnapshot)
        # a reader fetches and verifies everything
        async with await Connection.open(spec, priv, Role.READER) as conn:
            msgs = [m async for m in conn.fetch()]
            snap = msgs[0]
            assert isinstance(snap, wire.FetchSnapshot) and snap.data_version == 4
            opener = SnapshotOpener(NODE, pubkey_of(priv), 4, snap.manifest)
            chunks = [opener.open_chunk(m.index, m.sealed) for m in msgs
                      if isinstance(m, wire.FetchChunk)]
            opener.finish()
            assert chunks == data
            verifier = ChainVerifier(NODE, pubkey_of(priv), 4, opener.manifest.anchor)
            dvs = [verifier.open(m.data_version, Kind(m.kind), m.link, m.sealed)[0].data_version
                   for m in msgs if isinstance(m, wire.FetchRecord)]
            assert dvs == [5, 6]
            assert isinstance(msgs[-1], wire.FetchEnd) and msgs[-1].record_count == 2
            with pytest.raises(RemoteError, match="cannot write"):
                await conn.write(7, Kind.NORMAL, item_hash(rec6), rec6)

    run(body())


def test_a_newer_writer_takes_over_and_readers_never_do(transport: Transport) -> None:
    priv, _, spec = transport.register()

    async def body() -> None:
        first = await Connection.open(spec, priv, Role.WRITER)
        reader = await Connection.open(spec, priv, Role.READER)
        await first.status()  # the reader did not take over
        second = await Connection.open(spec, priv, Role.WRITER)
        await second.status()
        with pytest.raises((RemoteError, TransportError)):
            for _ in range(50):  # the older writer is closed (immediately or at its next call)
                await first.status()
                await asyncio.sleep(0.05)
        await reader.status()
        for c in (first, second, reader):
            await c.close()

    run(body())


def test_an_unregistered_client_is_refused(transport: Transport) -> None:
    priv, cid = new_client()
    spec = transport.daemon.spec if transport.daemon else transport.sshd.spec()  # type: ignore[union-attr]
    if transport.sshd:  # sshd lets the key in; the hello must refuse it
        transport.sshd.authorize_client(priv, cid, forced=transport.kind == "sshd-forced")
    with pytest.raises(AuthError):
        run(Connection.open(spec, priv, Role.WRITER))


def test_a_client_pinning_another_server_id_refuses_to_talk(transport: Transport) -> None:
    priv, _, spec = transport.register()
    other = "5" + client_id_from_pubkey(pubkey_of(os.urandom(32)))[1:]
    with pytest.raises(AuthError):
        run(Connection.open(ServerSpec(spec.address, other, spec.host_key), priv, Role.WRITER))


def test_anonymous_sessions_only_list(daemon: CldcbServer, sshd: PrivateSshd,
                                      tmp_path: Path) -> None:
    async def body(spec: ServerSpec) -> None:
        async with await Connection.open(spec, None) as conn:
            assert isinstance(await conn.list_recognitions(), list)
            with pytest.raises(Exception, match="only list"):
                await conn.status()

    run(body(daemon.spec))
    # under sshd the anonymous session runs in the operator's own SSH account
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "operator_key"
    key.write_private_key(str(key_path))
    sshd.authorize_line(key.export_public_key().decode())

    async def via_sshd() -> None:
        spec = sshd.spec()
        conn = await Connection.open(spec, None, operator_keys=[str(key_path)])
        assert isinstance(await conn.list_recognitions(), list)
        await conn.close()

    run(via_sshd())


def test_daemon_refuses_password_shell_exec_and_forwarding(daemon: CldcbServer) -> None:
    priv, cid = new_client()
    daemon.add(cid)

    async def body() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", daemon.port, username="cldcb",
                                   password="secret", known_hosts=None, client_keys=[],
                                   agent_path=None, preferred_auth="password,keyboard-interactive")
        async with asyncssh.connect("127.0.0.1", daemon.port, username="cldcb",
                                    known_hosts=None, client_keys=[secp256k1_ssh_key(priv)],
                                    agent_path=None) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process("id")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession, subsystem="sftp")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", daemon.port)
        # cldcb-recover may not run anything either
        async with asyncssh.connect("127.0.0.1", daemon.port, username="cldcb-recover",
                                    known_hosts=None, client_keys=[], agent_path=None) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process("cat /etc/passwd")

    run(body())


def test_forced_stdio_refuses_any_other_client(sshd: PrivateSshd) -> None:
    pinned_priv, pinned_id = new_client()
    other_priv, other_id = new_client()
    sshd.add(pinned_id)
    sshd.add(other_id)
    # the other client's key carries a forced command pinned to pinned_id
    sshd.authorize_line(
        f'restrict,command="{sshd.server_command()} stdio --client {pinned_id}" '
        + derived_public_line(other_priv))
    with pytest.raises(AuthError, match="pinned to client"):
        run(Connection.open(sshd.spec(), other_priv, Role.WRITER))


def _forced(data_dir: Path, original: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SSH_ORIGINAL_COMMAND", None)
    if original is not None:
        env["SSH_ORIGINAL_COMMAND"] = original
    return subprocess.run([*SERVER_CMD, "--data-dir", str(data_dir), "forced", "--allow", "add"],
                          capture_output=True, text=True, env=env, timeout=60)


def test_forced_allow_add_accepts_only_add(tmp_path: Path) -> None:
    srv = CldcbServer(tmp_path / "data").init()
    _, cid = new_client()
    ok = _forced(srv.data_dir, f"cldcb-server add {cid} --json")
    assert ok.returncode == 0, ok.stderr
    assert srv.server_id in ok.stdout and cid in ok.stdout
    listed = run_server_cmd(srv.data_dir, "list", "--json").stdout
    assert cid in listed
    _, cid2 = new_client()
    refused = [
        None, "", f"cldcb-server remove {cid}", f"cldcb-server add {cid} --quota 1",
        f"cldcb-server add {cid2}; touch {tmp_path}/pwned", "cldcb-server add $(id) ",
        f"cldcb-server add {cid2} && id", "cldcb-server add `id`", "sh -c id",
        f"cldcb-server add {cid2} {cid}", "cldcb-server add c2nothex", "cldcb-server serve",
        f"cldcb-server --data-dir /tmp add {cid2}", f"cldcb-server add '{cid2}' \"",
    ]
    for cmd in refused:
        r = _forced(srv.data_dir, cmd)
        assert r.returncode != 0, cmd
        assert r.stderr.startswith("error: "), (cmd, r.stderr)
    assert not (tmp_path / "pwned").exists()
    assert cid2 not in run_server_cmd(srv.data_dir, "list", "--json").stdout


def test_sshd_setup_key_with_forced_add(sshd: PrivateSshd, tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    sshd.authorize_line(f'restrict,command="{sshd.server_command()} forced --allow add" '
                        + key.export_public_key().decode())
    _, cid = new_client()

    async def body(cmd: str) -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect("127.0.0.1", sshd.port, username=sshd.user,
                                    client_keys=[key], agent_path=None,
                                    known_hosts=([asyncssh.import_public_key(sshd.host_key)],
                                                 [], [])) as conn:
            return await conn.run(cmd, check=False)

    res = run(body(f"cldcb-server add {cid} --json"))
    assert res.exit_status == 0, res.stderr
    assert cid in run_server_cmd(sshd.data_dir, "list", "--json").stdout
    res = run(body("cat /etc/shadow"))
    assert res.exit_status != 0 and "error:" in str(res.stderr)


def test_address_parsing() -> None:
    assert str(ServerAddress.parse("203.0.113.5:29735")) == "203.0.113.5:29735"
    a = ServerAddress.parse("ssh://cldcb@backup.example")
    assert (a.scheme, a.user, a.host, a.port) == ("ssh", "cldcb", "backup.example", 22)
    assert str(ServerAddress.parse("[::1]:7")) == "[::1]:7"
    for bad in ("backup.example", "host:99999", "ssh://@h", "a b:1"):
        with pytest.raises(Exception, match="address"):
            ServerAddress.parse(bad)


def test_only_the_pinned_sshd_host_key_is_trusted(sshd: PrivateSshd, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection to sshd uses the host key it is given (the wrapper's, recorded at
    install) and never falls back to ``~/.ssh/known_hosts``, even when that file holds
    the right key: no key given is an error naming --host-key; a wrong one is refused."""
    priv, _, spec = Transport("sshd-subsystem", None, sshd).register()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UsageError, match="no sshd host key is pinned.*--host-key"):
        run(Connection.open(ServerSpec(spec.address, spec.server_id, None), priv, Role.WRITER))
    other = derived_public_line(os.urandom(32), "x").split()[:2]
    with pytest.raises(AuthError, match="SSH host key"):
        run(Connection.open(ServerSpec(spec.address, spec.server_id, " ".join(other)), priv,
                            Role.WRITER))
    run(_status_of(spec, priv))                    # the pinned key itself: in


async def _status_of(spec: ServerSpec, priv: bytes) -> wire.Status:
    async with await Connection.open(spec, priv, Role.WRITER) as conn:
        return await conn.status()
