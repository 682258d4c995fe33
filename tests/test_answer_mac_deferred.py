"""The answer MAC's hashing of large request frames (snapshot chunks) runs off the event loop.

cldcb.core.answermac queues a frame of DEFER_BYTES or more (and what follows it) instead of
hashing it when it is counted; AnswerMacs.absorb hashes the queue in order, from a
worker thread. What must hold: the loop does not hash a chunk; the MACs are exactly
those of hashing every frame at once; an altered chunk still fails its ChunkAck.
"""

from __future__ import annotations

import os
import threading

import pytest
from test_answer_mac import LINK, opened, write

from cldcb.core import answermac, wire
from cldcb.core.answermac import DEFER_BYTES, AnswerMacs
from cldcb.core.session import Received
from cldcb.errors import ForgedAnswer

KEY = b"k" * 32
BIG = DEFER_BYTES + 17


def frames() -> list[bytes]:
    """Small and large request frames, interleaved."""
    return [wire.encode(m) for m in (
        wire.Write(3, 0, LINK, b"a"), wire.SnapshotChunk(1, 0, os.urandom(BIG)),
        wire.Write(4, 0, LINK, b"b"), wire.SnapshotChunk(1, 1, os.urandom(BIG)),
        wire.SnapshotChunk(1, 2, os.urandom(5)), wire.StatusRequest())]


def answers(macs: AnswerMacs, count: int) -> list[bytes]:
    return [macs.seal(wire.encode(wire.ChunkAck(1, i))) for i in range(count)]


def test_a_large_request_is_not_hashed_when_it_is_counted() -> None:
    macs = AnswerMacs(KEY)
    macs.request(wire.encode(wire.Write(3, 0, LINK, b"a")))
    assert macs.deferred == 0                   # a small one first: hashed at once
    macs.request(wire.encode(wire.SnapshotChunk(1, 0, os.urandom(BIG))))
    macs.request(wire.encode(wire.Write(4, 0, LINK, b"b")))
    assert macs.deferred == 2                   # the chunk, and what came after it
    worker = threading.Thread(target=macs.absorb)
    worker.start()
    worker.join()
    assert macs.deferred == 0


@pytest.mark.parametrize("absorb", ["in a thread", "when answered"])
def test_deferred_hashing_gives_the_same_macs(monkeypatch: pytest.MonkeyPatch,
                                              absorb: str) -> None:
    sent = frames()
    monkeypatch.setattr(answermac, "DEFER_BYTES", 1 << 40)      # hashed as they come
    eager = AnswerMacs(KEY)
    for f in sent:
        eager.request(f)
    assert eager.deferred == 0
    expected = answers(eager, len(sent))
    monkeypatch.undo()
    lazy = AnswerMacs(KEY, threading.Lock())     # absorb from worker threads: a lock
    workers = []
    for f in sent:
        buf = bytearray(f)
        lazy.request(memoryview(buf))       # a view of the decoder's buffer...
        buf[:] = bytes(len(buf))            # ...which it then reuses
        if absorb == "in a thread":
            workers.append(threading.Thread(target=lazy.absorb))
            workers[-1].start()
    for w in workers:
        w.join()
    assert lazy.deferred == (0 if absorb == "in a thread" else 5)
    assert answers(lazy, len(sent)) == expected and lazy.deferred == 0


def test_an_acknowledgement_of_an_altered_chunk_is_refused() -> None:
    """Through the sessions: the server hashes the chunks in a worker (absorb); the honest
    ChunkAck verifies, and one for a chunk a relay altered does not."""
    c, s = opened()
    c.send(wire.SnapshotChunk(1, 0, os.urandom(BIG)))
    (ev,) = s.receive_data(c.data_to_send())
    assert isinstance(ev, Received) and c.unhashed_requests == 1 == s.unhashed_requests
    for side in (c, s):
        worker = threading.Thread(target=side.absorb)
        worker.start()
        worker.join()
    s.send(wire.ChunkAck(1, 0))
    (ack,) = c.receive_data(s.data_to_send())
    assert ack == Received(wire.ChunkAck(1, 0, ack.message.mac))
    chunk = wire.encode(wire.SnapshotChunk(1, 1, os.urandom(BIG)))
    c.send(wire.SnapshotChunk(1, 1, os.urandom(BIG)))
    c.data_to_send()
    s.receive_data(chunk)                               # the relay's bytes
    s.send(wire.ChunkAck(1, 1))
    with pytest.raises(ForgedAnswer):
        c.receive_data(s.data_to_send())
    c, s = opened()
    assert c.ack_in(write(c, s, 3)) is not None
