"""The wire decoder only ever raises ProtocolError, and never allocates a huge frame."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cldcb.core import wire
from cldcb.errors import ProtocolError

SAMPLES: list[wire.Message] = [
    wire.Hello(1, 1, b"n" * 32),
    wire.HelloReply(1, b"\x02" + b"k" * 32, b"s" * 32, b"sig"),
    wire.Auth(False, b"\x03" + b"c" * 32, 1, b"sig"),
    wire.AuthOk(1),
    wire.PutRecognition(b"entry"),
    wire.ListRecognitions("", 256),
    wire.ListRecognitions("c2" + "ab" * 32, 0),
    wire.StatusRequest(),
    wire.Write(806, 0, b"l" * 32, b"sealed" * 100),
    wire.SnapshotBegin(3, 805, b"a" * 32),
    wire.SnapshotChunk(3, 0, b"c" * 5000),
    wire.SnapshotEnd(3, 1, b"m" * 90),
    wire.Fetch(-1),
    wire.FetchGeneration(2),
    wire.ListStates(),
    wire.Ok(),
    wire.Recognitions([b"a", b"bb", b""], ""),
    wire.Recognitions([b"a"], "c3" + "0f" * 32),
    wire.Status(True, 5, 1, b"h" * 32, b"p" * 32, 7, -1, 0, 123, 0, True, False, 2),
    wire.Ack(806, 1, b"l" * 32, True),
    wire.NeedSnapshot(807, "gap: backup holds 805, call is 807"),
    wire.ChunkAck(3, 0),
    wire.SnapshotAck(3, 805),
    wire.FetchSnapshot(805, b"a" * 32, 2, b"m" * 90, 99),
    wire.FetchChunk(1, b"c"),
    wire.FetchRecord(806, 0, b"l" * 32, b"s", 100),
    wire.FetchEnd(1),
    wire.States([wire.RestorableState(2, True, -1, 0, 21, 22, 2, 99, "damaged").encode()]),
    wire.Error(int(wire.ErrorCode.QUOTA), "quota exceeded: 10 MiB of 10 MiB used"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: wire.Message) -> None:
    frame = wire.encode(msg)
    dec = wire.FrameDecoder()
    got = []
    for i in range(len(frame)):  # byte by byte: frames split anywhere
        got += dec.feed(frame[i:i + 1])
    assert got == [msg] and dec.pending == 0


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(wire.MESSAGES.values())


def test_a_huge_length_prefix_is_refused_without_allocating() -> None:
    dec = wire.FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            dec.feed(struct.pack(">IB", 0xFFFFFFFF, 13) + b"x" * 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    with pytest.raises(ProtocolError):
        wire.FrameDecoder().feed(struct.pack(">I", wire.MAX_FRAME + 1))


def test_a_huge_inner_length_is_refused() -> None:
    body = struct.pack(">qB32sI", 1, 0, b"l" * 32, 0xFFFFFFF0) + b"abc"
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode(wire.Write.TYPE, body)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        wire.decode(wire.Recognitions.TYPE, struct.pack(">I", 0xFFFFFFFF))


def test_trailing_bytes_and_unknown_types_are_refused() -> None:
    frame = wire.encode(wire.Ack(1, 0, bytes(32), False))
    with pytest.raises(ProtocolError, match="trailing"):
        wire.decode(wire.Ack.TYPE, frame[5:] + b"\0")
    with pytest.raises(ProtocolError, match="unknown message type"):
        wire.decode(250, b"")
    with pytest.raises(ProtocolError, match="empty frame"):
        wire.FrameDecoder().feed(b"\0\0\0\0")


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        wire.FrameDecoder().feed(data)
    except ProtocolError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_frames_only_raise_protocol_error(msg: wire.Message, data: st.DataObject) -> None:
    frame = bytearray(wire.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "type"]))
        if op == "flip" and frame:
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut" and frame:
            del frame[data.draw(st.integers(0, len(frame) - 1)):]
        elif op == "insert":
            i = data.draw(st.integers(0, len(frame)))
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "type" and len(frame) > 4:
            frame[4] = data.draw(st.integers(0, 255))
    try:
        for m in wire.FrameDecoder().feed(bytes(frame)):
            assert isinstance(m, wire.Message)
    except ProtocolError:
        pass


def _mutated(body: bytes, data: st.DataObject, *, keep: int = 0) -> bytes:
    """``body`` with, each or not, a byte flipped, its end cut off after ``keep`` bytes,
    a few bytes added."""
    out = bytearray(body)
    if data.draw(st.booleans()) and out:
        out[data.draw(st.integers(0, len(out) - 1))] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        del out[data.draw(st.integers(keep, len(out))):]
    if data.draw(st.booleans()):
        out += data.draw(st.binary(min_size=1, max_size=6))
    return bytes(out)


def _outcome(feed: list[bytes]) -> list[wire.Message] | str:
    dec = wire.FrameDecoder()
    got: list[wire.Message] = []
    try:
        for piece in feed:
            got += dec.feed(piece)
    except ProtocolError as exc:
        return str(exc)
    return got


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_a_whole_frame_decodes_as_its_bytes_fed_one_by_one(msg: wire.Message,
                                                           data: st.DataObject) -> None:
    """A read holding exactly one frame (the decoder's quick case: no buffering) gives
    the same message, or the same error, as the same bytes arriving one at a time."""
    body = _mutated(wire.encode(msg)[4:], data, keep=1)      # the type byte stays
    frame = struct.pack(">I", len(body)) + body
    whole = _outcome([frame])
    assert whole == _outcome([frame[i:i + 1] for i in range(len(frame))])
    if not isinstance(whole, str):
        assert whole == [msg] or body != wire.encode(msg)[4:]


def _generic_body(msg: wire.Message) -> bytes:
    out: list[bytes] = []
    for f, spec in zip(wire.fields(msg), msg.SPEC, strict=True):
        wire._encode_field(spec, getattr(msg, f.name), out)
    return b"".join(out)


def _generic_decode(type_: int, body: bytes) -> wire.Message | str:
    cls = wire.MESSAGES[type_]
    r = wire._Reader(body)
    try:
        values = [wire._decode_field(spec, r) for spec in cls.SPEC]
        if r.pos != len(r.buf):
            raise ProtocolError(f"{cls.__name__} has {len(r.buf) - r.pos} trailing bytes")
    except ProtocolError as exc:
        return str(exc)
    return cls(*values)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([m for m in SAMPLES if m.TYPE in wire._FAST]), st.data())
def test_the_fast_codec_is_the_field_by_field_codec(msg: wire.Message,
                                                    data: st.DataObject) -> None:
    """Messages of fixed-size fields (and a last BYTES one) use one struct: the same
    bytes out, and for any body in, the same message or the same error."""
    generic = _generic_body(msg)
    assert msg.body() == generic
    assert wire.encode(msg) == struct.pack(">IB", len(generic) + 1, msg.TYPE) + generic
    body = _mutated(generic, data)
    want = _generic_decode(msg.TYPE, body)
    try:
        got: wire.Message | str = wire.decode(msg.TYPE, body)
    except ProtocolError as exc:
        got = str(exc)
    assert got == want


def test_fetch_answers_use_the_fast_codec() -> None:
    """Recovery decodes one FetchRecord per record (100,000 in a large backup): it and
    FetchSnapshot, whose BYTES field is not the last, get the one-struct codec too (the
    test above holds it to the field-by-field one)."""
    assert {wire.FetchRecord.TYPE, wire.FetchSnapshot.TYPE} <= set(wire._FAST)


@settings(max_examples=800, deadline=None)
@given(st.integers(-2**63, 2**63 - 1), st.integers(0, 255), st.binary(min_size=32, max_size=32),
       st.binary(max_size=3000), st.booleans(), st.data())
def test_the_per_change_frames_are_the_generic_ones(dv: int, kind: int, link: bytes,
                                                    sealed: bytes, want: bool,
                                                    data: st.DataObject) -> None:
    """A Write and an Ack packed in one piece are the frames encode() makes; recognised
    in one piece, they are what the decoder makes of the same bytes, and anything else
    (a mutated frame) is left to the decoder (None)."""
    write, ack = wire.Write(dv, kind, link, sealed), wire.Ack(dv, kind, link, want)
    assert wire.write_frame(dv, kind, link, sealed) == wire.encode(write)
    assert wire.ack_frame(dv, kind, link, want) == wire.encode(ack)
    assert wire.write_in(wire.encode(write)) == write
    assert wire.ack_in(wire.encode(ack)) == ack
    for msg, recognise in ((write, wire.write_in), (ack, wire.ack_in)):
        frame = bytearray(wire.encode(msg))
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            del frame[data.draw(st.integers(0, len(frame))):]
        got = recognise(bytes(frame))
        if got is not None:
            assert _outcome([bytes(frame)]) == [got]


@pytest.mark.parametrize("args", [(1, 0, b"short link", b"x"), (2**63, 0, bytes(32), b"x"),
                                  (1, 256, bytes(32), b"x"), (1, -1, bytes(32), b""),
                                  (1, 0, bytearray(32), b"")])
@pytest.mark.parametrize("cls, one_piece", [(wire.Write, wire.write_frame),
                                            (wire.Ack, wire.ack_frame)], ids=["Write", "Ack"])
def test_a_bad_write_or_ack_is_refused_in_one_piece_as_in_pieces(
        args: tuple, cls: type[wire.Message], one_piece: Callable[..., bytes]) -> None:
    if cls is wire.Ack:
        args = (*args[:3], True)          # an Ack's last field: want_snapshot
    with pytest.raises(ProtocolError) as generic:
        wire.encode(cls(*args))
    with pytest.raises(ProtocolError) as quick:
        one_piece(*args)
    assert str(quick.value) == str(generic.value)


def test_a_restorable_state_round_trips_and_bad_ones_are_refused() -> None:
    state = wire.RestorableState(1, False, 10, 5, 11, 15, 5, 7, "chain ends: gap")
    assert wire.RestorableState.decode(state.encode()) == state
    assert state.data_version == 15
    with pytest.raises(ProtocolError):
        wire.RestorableState.decode(state.encode()[:20])
    bad = bytearray(state.encode())
    bad[8] = 2
    with pytest.raises(ProtocolError):
        wire.RestorableState.decode(bytes(bad))


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=32768), min_size=1, max_size=12),
       size=st.integers(min_value=wire.LARGE_FRAME, max_value=wire.LARGE_FRAME * 3))
def test_a_large_frame_is_assembled_once_in_a_buffer_of_its_own(cuts: list[int],
                                                                 size: int) -> None:
    """A snapshot chunk arriving in SSH-sized pieces (at most 32 KiB, asyncssh's packet),
    between small frames: the same
    messages as fed whole, and ``on_frame`` gets the large frame as the one buffer its
    pieces were copied into (a bytearray it may keep: hashed later without another
    copy), the small ones as views or bytes equal to their frames; the chunk's sealed
    bytes are a view of that buffer, not another copy."""
    small = wire.StatusRequest()
    chunk = wire.SnapshotChunk(7, 3, bytes(range(256)) * (size // 256))
    frames = [wire.encode(small), wire.encode(chunk), wire.encode(small)]
    stream = b"".join(frames)
    dec = wire.FrameDecoder()
    seen: list[tuple[type, bytes]] = []
    dec_frames: list[object] = []

    def on_frame(f: bytes | bytearray | memoryview) -> None:
        seen.append((type(f), bytes(f)))
        if type(f) is bytearray:
            dec_frames.append(f)

    dec.on_frame = on_frame
    got: list[wire.Message] = []
    ends = [sum(len(f) for f in frames[:k + 1]) for k in range(len(frames))]
    pos = i = 0
    while pos < len(stream):
        cut = cuts[i % len(cuts)]
        got += dec.feed(stream[pos:pos + cut])
        pos, i = min(len(stream), pos + cut), i + 1
        whole = [e for e in ends if e <= pos]
        assert dec.pending == pos - (whole[-1] if whole else 0)   # (mid-frame is not idle)
        assert len(got) == len(whole)
    assert got == [small, chunk, small] and dec.pending == 0
    assert [f for _, f in seen] == frames
    assert seen[1][0] is bytearray
    sealed = got[1].sealed                      # type: ignore[attr-defined]
    assert isinstance(sealed, memoryview) and sealed.obj is not None
    assert sealed.obj is dec_frames[0]


@settings(max_examples=50, deadline=None)
@given(snapshot_id=st.integers(0, 2**32 - 1), index=st.integers(0, 2**32 - 1),
       sealed=st.binary(max_size=5000))
def test_a_chunk_frame_built_whole_is_the_encoded_chunk(snapshot_id: int, index: int,
                                                        sealed: bytes) -> None:
    """A chunk sealed straight into its frame (the plugin's upload) sends the bytes that
    encoding the message sends."""
    frame, at = wire.snapshot_chunk_frame(snapshot_id, index, len(sealed))
    assert len(frame) == at + len(sealed)
    frame[at:] = sealed
    assert bytes(frame) == wire.encode(wire.SnapshotChunk(snapshot_id, index, sealed))


def test_a_chunk_frame_too_large_or_out_of_range_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds the frame limit"):
        wire.snapshot_chunk_frame(1, 0, wire.MAX_FRAME)
    with pytest.raises(ProtocolError, match="out of range"):
        wire.snapshot_chunk_frame(2**32, 0, 10)
