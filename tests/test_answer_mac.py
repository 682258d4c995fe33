"""Every acknowledgement carries a MAC only the server key's holder can make (protocol 3).

Client and server sessions joined in memory, with a relay between them that
passes the hello through (so the server key signs it) and then answers, replays
or alters in the server's place: the client counts none of that.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from test_session import CLIENT, SERVER_ID, make, pump

from cldcb.core import wire
from cldcb.core.session import ClientSession, Received, Role, ServerSession
from cldcb.errors import AckMismatch, ForgedAnswer, ProtocolError, RemoteError

LINK = b"l" * 32


def opened() -> tuple[ClientSession, ServerSession]:
    c, s = make()
    pump(c, s, c.start())
    assert c.established
    return c, s


def write(c: ClientSession, s: ServerSession, dv: int, sealed: bytes = b"x") -> bytes:
    """Send Write(dv) from ``c`` to ``s``; the server's Ack frame."""
    (ev,) = s.receive_data(c.write_frame(dv, 0, LINK, sealed))
    assert ev == Received(wire.Write(dv, 0, LINK, sealed))
    return s.ack(dv, 0, LINK, False)


@pytest.mark.parametrize("answer", [wire.Ack(3, 0, LINK, False), wire.ChunkAck(1, 0),
                                    wire.SnapshotAck(1, 3)], ids=["Ack", "ChunkAck",
                                                                  "SnapshotAck"])
@pytest.mark.parametrize("mac", [wire.NO_MAC, os.urandom(wire.MAC_SIZE)], ids=["none", "random"])
def test_an_acknowledgement_without_the_session_mac_is_refused(answer: wire.Message,
                                                               mac: bytes) -> None:
    """A relay that holds the SSH host key passed the hello through; it then answers the
    request itself, with every field right but no key to make the MAC."""
    c, _ = opened()
    request = {wire.Ack: wire.Write(3, 0, LINK, b"x"), wire.ChunkAck: wire.SnapshotChunk(
        1, 0, b"c"), wire.SnapshotAck: wire.SnapshotEnd(1, 1, b"m")}[type(answer)]
    c.send(request)
    forged = wire.encode(replace(answer, mac=mac))
    assert c.ack_in(forged) is None
    with pytest.raises(ForgedAnswer, match="protocol violation.*MAC.*SSH host key"):
        c.receive_data(forged)
    assert c.closed
    assert issubclass(ForgedAnswer, AckMismatch)      # counted nowhere, connection dropped


def test_the_servers_acknowledgements_are_taken() -> None:
    """The honest server's answers, interleaved with a Fetch's several answers and an
    Error, all verify: both ends count the same requests."""
    c, s = opened()
    assert c.ack_in(write(c, s, 3)) is not None
    c.send(wire.Fetch(-1))
    assert s.receive_data(c.data_to_send()) == [Received(wire.Fetch(-1))]
    c.send(wire.StatusRequest())
    s.receive_data(c.data_to_send())
    c.send(wire.SnapshotChunk(9, 0, b"c" * 5000))
    chunk = c.data_to_send()
    s.receive_data(chunk[:100])                              # in pieces: through the decoder
    s.receive_data(chunk[100:])
    for msg in (wire.FetchSnapshot(3, LINK, 1, b"m", 0), wire.FetchChunk(0, b"c"),
                wire.FetchRecord(3, 0, LINK, b"r", 0), wire.FetchEnd(1),
                wire.Error(int(wire.ErrorCode.NOT_FOUND), "no status"),
                wire.ChunkAck(9, 0)):
        s.send(msg)
    events = c.receive_data(s.data_to_send())
    assert [type(e.message) for e in events if isinstance(e, Received)] == [
        wire.FetchSnapshot, wire.FetchChunk, wire.FetchRecord, wire.FetchEnd, wire.Error,
        wire.ChunkAck]
    assert c.ack_in(write(c, s, 4)) is not None


def test_an_acknowledgement_of_another_request_is_refused() -> None:
    """The replacement of an uncommitted batch is a Write with the same data_version, kind
    and link: a relay that drops it and replays the first batch's (real) Ack is caught,
    since the MAC names the request it answers."""
    c, s = opened()
    first = write(c, s, 3, b"batch")
    assert c.ack_in(first) is not None
    c.write_frame(3, 0, LINK, b"replacement")              # the relay keeps it from s
    with pytest.raises(ForgedAnswer):
        c.receive_data(first)


def test_an_acknowledgement_of_another_session_is_refused() -> None:
    """The same client and server, another session (other nonces): its Acks do not verify."""
    c1, s1 = opened()
    c2, s2 = opened()
    ack = write(c1, s1, 3)
    c2.write_frame(3, 0, LINK, b"x")
    with pytest.raises(ForgedAnswer):
        c2.receive_data(ack)


def test_an_acknowledgement_of_altered_bytes_is_refused() -> None:
    """The relay passes the request on with other sealed bytes (or drops a request before
    it): the server acknowledges what it received, and the client sees it is not what it
    sent."""
    c, s = opened()
    c.write_frame(3, 0, LINK, b"the change")
    (ev,) = s.receive_data(wire.write_frame(3, 0, LINK, b"garbage!!!"))
    assert isinstance(ev, Received)
    with pytest.raises(ForgedAnswer):
        c.receive_data(s.ack(3, 0, LINK, False))
    c, s = opened()
    c.send(wire.SnapshotBegin(1, 3, LINK))                  # dropped by the relay
    c.write_frame(3, 0, LINK, b"x")
    s.receive_data(wire.write_frame(3, 0, LINK, b"x"))
    with pytest.raises(ForgedAnswer):
        c.receive_data(s.ack(3, 0, LINK, False))


def test_an_older_server_is_refused_with_a_reason() -> None:
    """A version-2 server (whose Acks carry no MAC) answers the hello with Error(VERSION),
    or a reply choosing version 2: either way no session, and the error says why."""
    c = ClientSession(SERVER_ID, CLIENT, Role.WRITER, os.urandom(32))
    c.start()
    old = wire.Error(int(wire.ErrorCode.VERSION), "this server speaks protocol versions "
                     "2..2, the client 3..3: upgrade the older side")
    with pytest.raises(RemoteError, match="server key authenticates every acknowledgement"):
        c.receive_data(wire.encode(old))
    assert c.closed and not c.established
    c, s = make()
    s.receive_data(c.start())
    reply = wire.FrameDecoder().feed(s.data_to_send())[0]
    assert isinstance(reply, wire.HelloReply)
    with pytest.raises(ProtocolError, match="version 2, which we do not speak"):
        c.receive_data(wire.encode(replace(reply, version=2)))
    assert not c.established
