"""The daemon under an anonymous flood: what a stranger can make it hold is bounded.

Each test runs a real ``cldcb-server serve`` on 127.0.0.1 (limits set small through its
environment) and attacks it with real asyncssh clients and sockets.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from helpers.servers import CldcbServer

from cldcb.core import wire
from cldcb.core.dataversion import Kind
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.session import Role
from cldcb.errors import RemoteError
from cldcb.transport.connection import RECOVER_USER, SSH_USER, SUBSYSTEM, Connection
from cldcb.transport.sshkeys import SECP256K1_SSH_ALG, secp256k1_ssh_key


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 120))


def serving(tmp_path: Path, *serve_args: str, **env: str) -> tuple[CldcbServer, bytes]:
    """A running daemon (``serve`` options, ``CLDCB_SERVER_*`` environment) and the private
    key of a client registered on it."""
    srv = CldcbServer(tmp_path / "data", extra_env=env, serve_args=list(serve_args)).init()
    priv = new_privkey()
    srv.add(client_id_from_pubkey(pubkey_of(priv)))
    return srv.start(), priv


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert m, status
    return int(m.group(1))


async def ssh(srv: CldcbServer, priv: bytes | None = None,
              local_addr: tuple[str, int] | None = None) -> asyncssh.SSHClientConnection:
    """A raw SSH connection: as a registered client (``priv``) or anonymous."""
    opts: dict[str, Any] = dict(
        known_hosts=None, server_host_key_algs=[SECP256K1_SSH_ALG], agent_path=None,
        password=None, kbdint_auth=False, gss_host=None, keepalive_interval=0)
    if priv is None:
        opts.update(username=RECOVER_USER, client_keys=[], preferred_auth="none")
    else:
        opts.update(username=SSH_USER, client_keys=[secp256k1_ssh_key(priv)],
                    preferred_auth="publickey")
    if local_addr is not None:
        opts["local_addr"] = local_addr
    return await asyncssh.connect("127.0.0.1", srv.port, **opts)


async def announce_big_frame(conn: asyncssh.SSHClientConnection, send: int) -> bytes:
    """Open a channel, announce a 16 MiB frame, send ``send`` bytes of it; what the server
    answered before it closed the channel (no close within 20 s: an assertion)."""
    writer, reader, _ = await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
    writer.write(struct.pack(">IB", wire.MAX_FRAME, 1))
    block = bytes(256 << 10)
    try:
        for _ in range(send // len(block)):
            if writer.channel.is_closing():
                break
            writer.write(block)
            await writer.drain()
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass
    try:
        async with asyncio.timeout(20):
            return await reader.read()
    except TimeoutError:
        raise AssertionError("the server kept reading the announced 16 MiB frame") from None


def test_anonymous_big_frames_refused_early_and_memory_stays_bounded(tmp_path: Path) -> None:
    srv, _ = serving(tmp_path)
    try:
        assert srv.proc is not None
        before = rss_kib(srv.proc.pid)

        async def flood() -> list[bytes | str]:
            outcomes: list[bytes | str] = []
            for _ in range(3):
                async with await ssh(srv) as conn:
                    for _ in range(8):
                        try:
                            outcomes.append(await announce_big_frame(conn, 2 << 20))
                        except asyncssh.ChannelOpenError as exc:
                            outcomes.append(f"refused: {exc.reason}")
            return outcomes

        outcomes = run(flood())
        peak = rss_kib(srv.proc.pid)
    finally:
        srv.stop()
    answered = [o for o in outcomes if isinstance(o, bytes)]
    assert answered and all(o.startswith("refused") for o in outcomes if isinstance(o, str))
    for data in answered:
        (msg,) = wire.FrameDecoder().feed(data)
        assert isinstance(msg, wire.Error) and msg.code == wire.ErrorCode.PROTOCOL
        assert "exceeds the limit" in msg.text
    assert peak - before < 24 << 10, (before, peak)


def test_more_channels_than_allowed_are_refused(tmp_path: Path) -> None:
    srv, priv = serving(tmp_path)

    async def channels(key: bytes | None) -> None:
        async with await ssh(srv, key) as conn:
            await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_session(subsystem=SUBSYSTEM, encoding=None)

    try:
        run(channels(priv))
        run(channels(None))
    finally:
        srv.stop()


def open_sockets(srv: CldcbServer, sources: list[str]) -> list[socket.socket]:
    """TCP connections to the server from these loopback addresses, saying nothing."""
    socks: list[socket.socket] = []
    try:
        for source in sources:
            s = socket.socket()
            socks.append(s)
            s.bind((source, 0))
            s.connect(("127.0.0.1", srv.port))
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def registered_status(srv: CldcbServer, priv: bytes) -> wire.Message:
    """A registered client logs in and asks for its status."""
    async def status() -> wire.Message:
        async with await Connection.open(srv.spec, priv, Role.READER) as conn:
            return await conn.status()
    return run(status())


def _banner_or_closed(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    try:
        return sock.recv(64)
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("how", ["environment", "options"])
def test_per_source_limit_while_a_registered_client_gets_in(tmp_path: Path, how: str) -> None:
    if how == "environment":
        srv, priv = serving(tmp_path, CLDCB_SERVER_MAX_PER_SOURCE="3",
                            CLDCB_SERVER_MAX_UNAUTHENTICATED="6")
    else:   # serve's options win over the environment
        srv, priv = serving(tmp_path, "--max-per-source", "3", "--max-unauthenticated", "6",
                            CLDCB_SERVER_MAX_PER_SOURCE="50")
    socks = open_sockets(srv, ["127.0.0.2"] * 8)
    try:
        got = [_banner_or_closed(s) for s in socks]
        assert sum(g.startswith(b"SSH-2.0") for g in got) == 3, got
        assert sum(g == b"" for g in got) == 5, got
        assert isinstance(registered_status(srv, priv), wire.Status)
        assert "127.0.0.2" in srv.log()
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_strangers_from_many_addresses_cannot_keep_a_registered_client_out(
        tmp_path: Path) -> None:
    srv, priv = serving(tmp_path, CLDCB_SERVER_MAX_PER_SOURCE="2",
                        CLDCB_SERVER_MAX_UNAUTHENTICATED="4")
    socks = open_sockets(srv, ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"])
    try:
        for s in socks:
            assert _banner_or_closed(s).startswith(b"SSH-2.0")   # the cap is now full
        assert isinstance(registered_status(srv, priv), wire.Status)
        assert _banner_or_closed(socks[0]) == b""      # the oldest stranger made room
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_out_of_file_descriptors_backs_off_logs_once_and_recovers(tmp_path: Path) -> None:
    srv = CldcbServer(tmp_path / "data", max_files=64,
                      extra_env={"CLDCB_SERVER_MAX_UNAUTHENTICATED": "500",
                                 "CLDCB_SERVER_MAX_PER_SOURCE": "500"}).init()
    priv = new_privkey()
    srv.add(client_id_from_pubkey(pubkey_of(priv)))
    srv.start()
    socks = open_sockets(srv, ["127.0.0.2"] * 100)
    try:
        deadline = time.monotonic() + 20
        while "cannot accept connections" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cannot accept connections" in srv.log(), srv.log()[-3000:]
        for s in socks:
            s.close()
        socks.clear()
        assert isinstance(registered_status(srv, priv), wire.Status)
    finally:
        for s in socks:
            s.close()
        srv.stop()
    log = srv.log()
    assert log.count("cannot accept connections") == 1, log[-3000:]
    assert "accepting connections again" in log
    assert "out of system resource" not in log


@pytest.mark.parametrize("who", ["registered", "anonymous"])
def test_idle_sessions_are_closed(tmp_path: Path, who: str) -> None:
    srv, priv = serving(tmp_path, CLDCB_SERVER_IDLE_TIMEOUT="1",
                        CLDCB_SERVER_ANONYMOUS_IDLE_TIMEOUT="1")

    async def idle() -> None:
        conn = await ssh(srv, priv if who == "registered" else None)
        await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
        try:
            async with asyncio.timeout(20):
                await conn.wait_closed()
        except TimeoutError:
            conn.abort()
            raise AssertionError("an idle session was never closed") from None

    try:
        run(idle())
        assert "idle" in srv.log()
    finally:
        srv.stop()


def test_damaged_settings_at_login_reach_the_client_and_the_log(tmp_path: Path) -> None:
    srv = CldcbServer(tmp_path / "data").init()
    priv = new_privkey()
    cid = client_id_from_pubkey(pubkey_of(priv))
    srv.add(cid)
    settings = next((tmp_path / "data").rglob(f"{cid}/settings.json"))
    settings.write_text("{not json")
    srv.start()

    async def login() -> None:
        await Connection.open(srv.spec, priv, Role.WRITER)

    try:
        with pytest.raises(RemoteError) as err:
            run(login())
    finally:
        srv.stop()
    assert "settings.json" in str(err.value)
    errors = [ln for ln in srv.log().splitlines() if " ERROR " in ln]
    assert any("settings.json" in ln and cid in ln for ln in errors), srv.log()


def test_malformed_requests_are_logged_once_per_period(tmp_path: Path) -> None:
    srv, priv = serving(tmp_path)
    cid = client_id_from_pubkey(pubkey_of(priv))

    async def bad_writes() -> list[str]:
        out = []
        async with await Connection.open(srv.spec, priv, Role.WRITER) as conn:
            for i in range(5):
                with pytest.raises(RemoteError) as err:
                    await conn.write(11 + i, 7, bytes(32), b"x" * 100)
                out.append(str(err.value))
            assert isinstance(await conn.status(), wire.Status)
        return out

    try:
        answers = run(bad_writes())
    finally:
        srv.stop()
    assert all("kind 7" in a for a in answers)
    lines = [ln for ln in srv.log().splitlines() if "kind 7" in ln]
    assert len(lines) == 1, lines
    assert " WARNING " in lines[0] and cid in lines[0]
    assert " ERROR " not in srv.log()
    assert Kind.NORMAL == 0
