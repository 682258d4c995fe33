"""Client and server sessions joined in memory: the mutual hello and its refusals."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from cldcb.core import wire
from cldcb.core.ids import client_id_from_pubkey, pubkey_of, server_id_from_pubkey
from cldcb.core.session import (
    Authenticated,
    ClientSession,
    HelloComplete,
    Received,
    Role,
    ServerSession,
)
from cldcb.errors import AuthError, ProtocolError

SERVER = bytes([5]) * 32
CLIENT = bytes([6]) * 32
SERVER_ID = server_id_from_pubkey(pubkey_of(SERVER))
CLIENT_ID = client_id_from_pubkey(pubkey_of(CLIENT))


def pump(client: ClientSession, server: ServerSession, first: bytes) -> tuple[list, list]:
    """Shuttle bytes both ways until quiet; return (client events, server events)."""
    c_events: list = []
    s_events: list = []
    to_server = first
    for _ in range(10):
        if not to_server:
            break
        s_events += server.receive_data(to_server)
        to_client = server.data_to_send()
        if not to_client:
            break
        c_events += client.receive_data(to_client)
        to_server = client.data_to_send()
    return c_events, s_events


def make(client_priv: bytes | None = CLIENT, pinned: str = SERVER_ID, registered=(CLIENT_ID,),
         role: Role = Role.WRITER, **kw) -> tuple[ClientSession, ServerSession]:
    c = ClientSession(pinned, client_priv, role, os.urandom(32))
    s = ServerSession(SERVER, os.urandom(32), is_registered=lambda cid: cid in registered, **kw)
    return c, s


def test_hello_completes_and_requests_flow() -> None:
    c, s = make()
    c_ev, s_ev = pump(c, s, c.start())
    assert c_ev == [HelloComplete(SERVER_ID, wire.PROTOCOL_VERSION, Role.WRITER)]
    assert s_ev == [Authenticated(CLIENT_ID, Role.WRITER)]
    c.send(wire.Write(3, 0, bytes(32), b"x"))
    (ev,) = s.receive_data(c.data_to_send())
    assert ev == Received(wire.Write(3, 0, bytes(32), b"x"))
    s.send(wire.Ack(3, 0, b"l" * 32, False))
    (got,) = c.receive_data(s.data_to_send())
    assert isinstance(got, Received) and got.message.mac != wire.NO_MAC
    assert replace(got.message, mac=wire.NO_MAC) == wire.Ack(3, 0, b"l" * 32, False)


def test_a_server_whose_key_is_not_the_pinned_id_is_refused() -> None:
    other = server_id_from_pubkey(pubkey_of(bytes([8]) * 32))
    c, s = make(pinned=other)
    with pytest.raises(AuthError, match="not the pinned server id"):
        pump(c, s, c.start())
    assert c.closed and not c.established
    with pytest.raises(ProtocolError):
        c.send(wire.StatusRequest())


def test_a_forged_server_signature_is_refused() -> None:
    c, s = make()
    hello = c.start()
    s.receive_data(hello)
    reply = wire.FrameDecoder().feed(s.data_to_send())[0]
    assert isinstance(reply, wire.HelloReply)
    forged = wire.HelloReply(reply.version, reply.server_pub, os.urandom(32), reply.signature)
    with pytest.raises(AuthError, match="did not prove its key"):
        c.receive_data(wire.encode(forged))


def test_an_unregistered_client_is_refused() -> None:
    c, s = make(registered=())
    with pytest.raises(AuthError, match="not registered"):
        pump(c, s, c.start())
    assert s.closed and s.client_id is None


def test_a_forced_session_refuses_any_other_client_and_anonymous() -> None:
    other = client_id_from_pubkey(pubkey_of(bytes([9]) * 32))
    c, s = make(registered=(CLIENT_ID, other), forced_client_id=other)
    with pytest.raises(AuthError, match="pinned to client"):
        pump(c, s, c.start())
    c, s = make(client_priv=None, forced_client_id=CLIENT_ID)
    with pytest.raises(AuthError, match="anonymous"):
        pump(c, s, c.start())


def test_anonymous_sessions_can_only_list() -> None:
    c, s = make(client_priv=None)
    c_ev, s_ev = pump(c, s, c.start())
    assert s_ev == [Authenticated(None, Role.READER)]
    with pytest.raises(ProtocolError, match="only list"):
        c.send(wire.StatusRequest())
    c.send(wire.ListRecognitions("", 10))
    assert s.receive_data(c.data_to_send()) == [Received(wire.ListRecognitions("", 10))]
    # a hand-made request from an anonymous session is answered NOT_ALLOWED by the session
    for req in (wire.StatusRequest(), wire.Write(1, 0, bytes(32), b""), wire.Fetch(-1),
                wire.PutRecognition(b"x")):
        assert s.receive_data(wire.encode(req)) == []
        (err,) = wire.FrameDecoder().feed(s.data_to_send())
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.NOT_ALLOWED


def test_the_per_change_shortcuts_keep_the_sessions_rules() -> None:
    """The Write and the Ack in one piece (write_frame, ack_in; write_in, ack) give what
    send and receive_data give; where those refuse or hold bytes back, they give nothing
    (None: the caller takes the usual way) or raise the same."""
    c, s = make()
    with pytest.raises(ProtocolError, match="not open"):
        c.write_frame(3, 0, bytes(32), b"x")                  # before the hello, as send
    assert s.write_in(wire.encode(wire.Write(3, 0, bytes(32), b"x"))) is None
    pump(c, s, c.start())
    frame = c.write_frame(3, 0, bytes(32), b"x")
    assert frame == wire.encode(wire.Write(3, 0, bytes(32), b"x")) and not c.data_to_send()
    assert s.write_in(frame) == wire.Write(3, 0, bytes(32), b"x")
    one = s.ack(3, 0, bytes(32), False)
    assert c.ack_in(one) == (None, wire.FrameDecoder().feed(one)[0])  # with its MAC
    frame = c.write_frame(4, 0, bytes(32), b"y")
    assert s.write_in(frame[:7]) is None and s.receive_data(frame[:7]) == []
    assert s.write_in(frame) is None                       # bytes are held: not in one piece
    assert s.receive_data(frame[7:]) == [Received(wire.Write(4, 0, bytes(32), b"y"))]
    c.write_frame(5, 0, bytes(32), b"z")
    assert s.write_in(wire.encode(wire.Write(5, 0, bytes(32), b"z"))) is not None
    s.send(wire.Error(int(wire.ErrorCode.QUOTA), "full"))
    answer = s.ack(5, 0, bytes(32), True)                  # after what was queued before it
    err, ack = wire.FrameDecoder().feed(answer)
    assert err == wire.Error(int(wire.ErrorCode.QUOTA), "full")
    assert replace(ack, mac=wire.NO_MAC) == wire.Ack(5, 0, bytes(32), True)
    assert c.ack_in(answer) is None                        # two frames: the usual way
    c.receive_data(answer[:3])
    assert c.ack_in(answer[len(wire.encode(err)):]) is None           # bytes are held
    assert c.receive_data(answer[3:]) == [Received(err), Received(ack)]
    reader, rs = make(role=Role.READER)
    pump(reader, rs, reader.start())
    assert rs.write_in(frame) is None                      # a reader's Write is refused...
    assert rs.receive_data(frame) == []                    # ... the usual way


def test_a_reader_cannot_write() -> None:
    c, s = make(role=Role.READER)
    pump(c, s, c.start())
    assert s.receive_data(wire.encode(wire.Write(1, 0, bytes(32), b""))) == []
    (err,) = wire.FrameDecoder().feed(s.data_to_send())
    assert err.code == wire.ErrorCode.NOT_ALLOWED


def test_a_replayed_client_auth_is_refused() -> None:
    c, s = make()
    hello = c.start()
    s.receive_data(hello)
    c.receive_data(s.data_to_send())
    auth = c.data_to_send()
    # the same Auth presented to a new server session (new server nonce) fails
    s2 = ServerSession(SERVER, os.urandom(32), is_registered=lambda cid: True)
    s2.receive_data(hello)
    s2.data_to_send()
    assert s2.receive_data(auth) == []
    (err,) = wire.FrameDecoder().feed(s2.data_to_send())
    assert err.code == wire.ErrorCode.AUTH and s2.closed


def test_garbage_closes_the_server_session_with_a_protocol_error() -> None:
    _, s = make()
    assert s.receive_data(b"\xff\xff\xff\xff\x01") == []
    (err,) = wire.FrameDecoder().feed(s.data_to_send())
    assert err.code == wire.ErrorCode.PROTOCOL and s.closed


def test_version_mismatch_is_explained() -> None:
    _, s = make()
    s.receive_data(wire.encode(wire.Hello(7, 9, bytes(32))))
    (err,) = wire.FrameDecoder().feed(s.data_to_send())
    assert err.code == wire.ErrorCode.VERSION and "upgrade" in err.text


def test_the_client_session_says_which_request_an_answer_is_for() -> None:
    """Request correlation is the session's: each answer names the token of the oldest
    request waiting and whether it is that request's last; a fetch takes answers up to
    FetchEnd; an answer of another kind fails that request alone; a Write's Ack comes
    through ack_in with its token."""
    c, s = make()
    pump(c, s, c.start())
    c.send(wire.StatusRequest(), "status")
    c.send(wire.Fetch(-1), "fetch")
    c.send(wire.ListStates(), "states")
    frame = c.write_frame(3, 0, bytes(32), b"x", "write")
    s.receive_data(c.data_to_send())
    s.receive_data(frame)
    s.send(wire.Status(False, 0, 0, bytes(32), bytes(32), 0, -1, 0, 0, 0, False, True, 2))
    (status,) = c.receive_data(s.data_to_send())
    assert (status.request, type(status.message), status.done) == ("status", wire.Status, True)
    for msg in (wire.FetchSnapshot(3, bytes(32), 0, b"m", 0), wire.FetchEnd(0), wire.Ok()):
        s.send(msg)
    got = [(ev.request, type(ev.message), ev.done, ev.unexpected)
           for ev in c.receive_data(s.data_to_send())]
    assert got == [("fetch", wire.FetchSnapshot, False, ""), ("fetch", wire.FetchEnd, True, ""),
                   ("states", wire.Ok, True, "expected States, got Ok")]
    token, answer = c.ack_in(s.ack(3, 0, bytes(32), False)) or (None, None)
    assert token == "write" and isinstance(answer, wire.Ack)
    c.write_frame(4, 0, bytes(32), b"y", "lost")
    assert c.forget_requests() == ["lost"] and c.forget_requests() == []
    s.send(wire.Ok())
    with pytest.raises(ProtocolError, match="unexpected Ok from the server"):
        c.receive_data(s.data_to_send())                # nothing is waiting for it
    assert c.closed
