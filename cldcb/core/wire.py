"""The cldcb wire codec: length-prefixed binary frames, one message each.

Pure code. A frame is::

    length (u32 big-endian, counts type + body) || type (u8) || body

``length`` is checked against :data:`MAX_FRAME` before anything is
allocated: a larger frame is a :class:`~cldcb.errors.ProtocolError`. Bodies
are the message's fields in order, each in its fixed encoding (integers
big-endian; ``bytes`` fields are ``u32 length || bytes``; ``str`` fields are
``u16 length || UTF-8``; lists are ``u32 count || items``). A body with
trailing bytes, an unknown type or a field out of range is a protocol error:
:func:`decode` and :class:`FrameDecoder` raise nothing else.

``str`` fields are text for people (error texts, reasons) that the peer wrote:
decoding escapes their control characters
(:func:`cldcb.core.remote_text.escape_remote`), so that no text a server sends
reaches a terminal, a log or a status file raw.

The messages and what they mean are in :mod:`cldcb.core.session`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

from cldcb.core.remote_text import escape_remote
from cldcb.errors import ProtocolError

MAX_FRAME = 16 * 1024 * 1024
"""Largest frame (type + body) either side accepts."""
_U32 = struct.Struct(">I")

MAX_LIST = 100_000
"""Most items in one list field (recognition entries)."""

MAX_RECOGNITION = 1024
"""Largest recognition entry a server stores and lists. A real one is 196 bytes
(:mod:`cldcb.core.recognition`: version, client key, sealed client key, sealed signature)."""

RECOGNITION_PAGE = 256
"""Most entries in one ``Recognitions`` page: 256 of the largest entries make a frame of
about 260 KiB, whatever the number of clients a server holds."""

PROTOCOL_VERSION = 3
"""2: an Ack names its write's kind and link; the recognition listing comes in pages;
ListStates, States and FetchGeneration. 3: Ack, ChunkAck and SnapshotAck carry a MAC under
the session key (:mod:`cldcb.core.answermac`). Older peers are refused with Error(VERSION)."""

MAC_SIZE = 16
"""Bytes of the MAC that ends every Ack, ChunkAck and SnapshotAck."""
NO_MAC = bytes(MAC_SIZE)
"""The MAC field of an answer not yet authenticated (the session fills it in)."""


class ErrorCode(IntEnum):
    """Explicit error codes of the ``Error`` message."""

    PROTOCOL = 1        # malformed frame or message out of order
    VERSION = 2         # no common protocol version
    AUTH = 3            # hello failed: unknown client, bad signature
    NOT_ALLOWED = 4     # this session may not do that (anonymous, read-only)
    QUOTA = 5           # the client's quota would be exceeded; nothing stored
    STORAGE = 6         # the server could not store (disk full, I/O error)
    NOT_FOUND = 7       # nothing to fetch
    SUPERSEDED = 8      # a newer writing session of this client took over
    BAD_REQUEST = 9     # a well-formed request that makes no sense here
    INTERNAL = 10       # the server failed; see its log
    SHUTTING_DOWN = 11  # the server is stopping; reconnect later
    KEPT = 12           # append-only: the recognition entry held is kept, not replaced


# --- field codecs -------------------------------------------------------------

def _fixed(n: int) -> tuple[str, int]:
    return ("fixed", n)


U8, U16, U32, U64, I64, BOOL = ("B", 1), ("H", 2), ("I", 4), ("Q", 8), ("q", 8), ("?", 1)
B32, B33, B16 = _fixed(32), _fixed(33), _fixed(MAC_SIZE)
BYTES = ("bytes", 0)
STR = ("str", 0)
LIST_BYTES = ("list", 0)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolError("message is truncated")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str, size: int) -> Any:
        return struct.unpack(">" + fmt, self.take(size))[0]


def _encode_field(spec: tuple[str, int], value: Any, out: list[bytes]) -> None:
    kind, n = spec
    if kind == "fixed":
        if not isinstance(value, bytes) or len(value) != n:
            raise ProtocolError(f"field must be {n} bytes")
        out.append(value)
    elif kind == "bytes":
        out.append(struct.pack(">I", len(value)))
        out.append(bytes(value))
    elif kind == "str":
        b = value.encode("utf-8")
        if len(b) > 0xFFFF:
            b = b[:0xFFFF].decode("utf-8", "ignore").encode("utf-8")
        out.append(struct.pack(">H", len(b)))
        out.append(b)
    elif kind == "list":
        out.append(struct.pack(">I", len(value)))
        for item in value:
            out.append(struct.pack(">I", len(item)))
            out.append(bytes(item))
    else:
        try:
            out.append(struct.pack(">" + kind, value))
        except struct.error as exc:
            raise ProtocolError(f"field out of range: {exc}") from None


def _decode_field(spec: tuple[str, int], r: _Reader) -> Any:
    kind, n = spec
    if kind == "fixed":
        return r.take(n)
    if kind == "bytes":
        return r.take(r.unpack("I", 4))
    if kind == "str":
        try:
            return escape_remote(r.take(r.unpack("H", 2)).decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("text field is not UTF-8") from None
    if kind == "list":
        count = r.unpack("I", 4)
        if count > MAX_LIST:
            raise ProtocolError(f"list of {count} items exceeds the limit of {MAX_LIST}")
        return [r.take(r.unpack("I", 4)) for _ in range(count)]
    if kind == "?":
        b = r.take(1)[0]
        if b > 1:
            raise ProtocolError("boolean field is neither 0 nor 1")
        return bool(b)
    return r.unpack(kind, n)


# --- messages ------------------------------------------------------------------

MESSAGES: dict[int, type[Message]] = {}


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[int] = 0
    SPEC: ClassVar[tuple[tuple[str, int], ...]] = ()

    def body(self) -> bytes:
        fast = _FAST.get(self.TYPE)
        if fast is not None:
            return fast.encode(self)
        out: list[bytes] = []
        for f, spec in zip(fields(self), self.SPEC, strict=True):
            _encode_field(spec, getattr(self, f.name), out)
        return b"".join(out)


class _FastCodec:
    """One ``struct`` for a message whose fields are all fixed-size but perhaps one
    ``BYTES`` field (Write, Ack, chunks, fetched records…), and one more for the fixed
    fields after that one: the same bytes and the same errors as the field-by-field
    codec, in a fraction of the time (these are the per-change ones)."""

    def __init__(self, cls: type[Message], spec: tuple[tuple[str, int], ...]) -> None:
        self.cls = cls
        self.names = [f.name for f in fields(cls)]
        self.tail = BYTES in spec
        self.nhead = spec.index(BYTES) if self.tail else len(spec)
        head, after = spec[:self.nhead], spec[self.nhead + 1:]
        self.struct, self.fixed, self.bools = self._layout(head)
        self.after, fixed_after, self.after_bools = self._layout(after)
        self.fixed += [(self.nhead + 1 + i, n) for i, n in fixed_after]

    @staticmethod
    def _layout(spec: tuple[tuple[str, int], ...]
                ) -> tuple[struct.Struct, list[tuple[int, int]], list[int]]:
        """The struct of fixed fields, (index, size) of the byte strings among them, and
        the offsets of the booleans."""
        packed = struct.Struct(">" + "".join(f"{n}s" if k == "fixed" else k for k, n in spec))
        offsets, pos = [], 0
        for _kind, n in spec:
            offsets.append(pos)
            pos += n
        return (packed, [(i, n) for i, (k, n) in enumerate(spec) if k == "fixed"],
                [offsets[i] for i, (k, _) in enumerate(spec) if k == "?"])

    @staticmethod
    def fits(spec: tuple[tuple[str, int], ...]) -> bool:
        if spec.count(BYTES) > 1:
            return False
        return all(k == "fixed" or k in "BHIQq?" for k, _ in spec if (k, _) != BYTES)

    def encode(self, msg: Message) -> bytes:
        values = [getattr(msg, name) for name in self.names]
        head = self.encode_head(values)
        if not self.tail:
            return head
        tail = values[self.nhead]
        return b"".join((head, struct.pack(">I", len(tail)), tail, self.encode_after(values)))

    def frame(self, msg: Message) -> bytes:
        """The whole frame in one piece (one copy of a chunk's bytes, not three)."""
        values = [getattr(msg, name) for name in self.names]
        head = self.encode_head(values)
        if not self.tail:
            return struct.pack(">IB", len(head) + 1, msg.TYPE) + head
        tail = values[self.nhead]
        after = self.encode_after(values)
        length = len(head) + 4 + len(tail) + len(after) + 1
        if length > MAX_FRAME:
            raise ProtocolError(f"{type(msg).__name__} of {length - 1} bytes exceeds the "
                                f"frame limit of {MAX_FRAME}")
        return b"".join((struct.pack(">IB", length, msg.TYPE), head,
                         struct.pack(">I", len(tail)), tail, after))

    def encode_head(self, values: list[object]) -> bytes:
        for i, n in self.fixed:
            if not isinstance(values[i], bytes) or len(values[i]) != n:
                raise ProtocolError(f"field must be {n} bytes")
        try:
            return self.struct.pack(*values[:self.nhead])
        except struct.error as exc:
            raise ProtocolError(f"field out of range: {exc}") from None

    def encode_after(self, values: list[object]) -> bytes:
        """The fixed fields after the BYTES one (b"" when there are none)."""
        try:
            return self.after.pack(*values[self.nhead + 1:])
        except struct.error as exc:
            raise ProtocolError(f"field out of range: {exc}") from None

    @staticmethod
    def _check_bools(body: bytes | memoryview, base: int, bools: list[int]) -> None:
        have = len(body)
        for off in bools:               # in field order, as the field-by-field codec
            if base + off < have and body[base + off] > 1:
                raise ProtocolError("boolean field is neither 0 nor 1")

    def decode(self, body: bytes | memoryview) -> Message:
        size = self.struct.size
        have = len(body)
        if self.bools:
            self._check_bools(body, 0, self.bools)
        if have < size:
            raise ProtocolError("message is truncated")
        end = size
        if self.tail:
            if have < size + 4:
                raise ProtocolError("message is truncated")
            mid = size + 4 + _U32.unpack_from(body, size)[0]
            if mid > have:
                raise ProtocolError("message is truncated")
            if self.after_bools:
                self._check_bools(body, mid, self.after_bools)
            end = mid + self.after.size
            if end > have:
                raise ProtocolError("message is truncated")
        if end != have:
            raise ProtocolError(f"{self.cls.__name__} has {have - end} trailing bytes")
        if not self.tail:
            return self.cls(*self.struct.unpack_from(body, 0))
        if self.after.size:
            return self.cls(*self.struct.unpack_from(body, 0), bytes(body[size + 4:mid]),
                            *self.after.unpack_from(body, mid))
        return self.cls(*self.struct.unpack_from(body, 0), bytes(body[size + 4:mid]))


_FAST: dict[int, _FastCodec] = {}


def message(type_: int, *spec: tuple[str, int]):  # noqa: ANN201 - class decorator
    def wrap(cls: type[Message]) -> type[Message]:
        cls = dataclass(frozen=True)(cls)
        cls.TYPE = type_
        cls.SPEC = spec
        if len(fields(cls)) != len(spec):
            raise TypeError(f"{cls.__name__}: fields and spec differ")
        if type_ in MESSAGES:
            raise TypeError(f"message type {type_} used twice")
        MESSAGES[type_] = cls
        if _FastCodec.fits(spec):
            _FAST[type_] = _FastCodec(cls, spec)
        return cls
    return wrap


# Hello (see cldcb.core.session for the transcript and signatures)
@message(1, U16, U16, B32)
class Hello(Message):
    min_version: int
    max_version: int
    client_nonce: bytes


@message(2, U16, B33, B32, BYTES)
class HelloReply(Message):
    version: int
    server_pub: bytes
    server_nonce: bytes
    signature: bytes


@message(3, BOOL, B33, U8, BYTES)
class Auth(Message):
    anonymous: bool
    client_pub: bytes
    role: int
    signature: bytes


@message(4, U8)
class AuthOk(Message):
    role: int


# Requests
@message(10, BYTES)
class PutRecognition(Message):
    entry: bytes


@message(11, STR, U32)
class ListRecognitions(Message):
    after: str              # "": from the first entry; else a previous page's next_after
    max_count: int          # the server sends at most min(max_count, RECOGNITION_PAGE)


@message(12)
class StatusRequest(Message):
    pass


@message(13, I64, U8, B32, BYTES)
class Write(Message):
    data_version: int
    kind: int
    link: bytes
    sealed: bytes


@message(14, U32, I64, B32)
class SnapshotBegin(Message):
    snapshot_id: int
    data_version: int
    anchor: bytes


@message(15, U32, U32, BYTES)
class SnapshotChunk(Message):
    snapshot_id: int
    index: int
    sealed: bytes


@message(16, U32, U32, BYTES)
class SnapshotEnd(Message):
    snapshot_id: int
    chunk_count: int
    manifest: bytes


@message(17, I64)
class Fetch(Message):
    at_data_version: int    # -1: the newest; else the state at that data_version


@message(24, U64)
class FetchGeneration(Message):
    generation: int         # a snapshot's number, as ``States`` names it


@message(25)
class ListStates(Message):
    pass


# Responses
@message(30)
class Ok(Message):
    pass


@message(31, LIST_BYTES, STR)
class Recognitions(Message):
    entries: list[bytes]
    next_after: str         # "": this was the last page; else ask on with after=next_after


@message(32, BOOL, I64, U8, B32, B32, U64, I64, U64, U64, U64, BOOL, BOOL, U32)
class Status(Message):
    has_tip: bool
    tip_data_version: int
    tip_kind: int
    tip_hash: bytes
    tip_link: bytes
    tip_time: int           # server's receive time of the newest record, unix ms
    snapshot_data_version: int   # -1: no complete snapshot
    snapshot_time: int
    bytes_used: int
    quota: int              # 0: no quota
    append_only: bool
    want_snapshot: bool
    generations: int


@message(33, I64, U8, B32, BOOL, B16)
class Ack(Message):
    """The answer to ``Write(data_version, kind, link, …)`` once it is durable: it names
    that write (see :mod:`cldcb.core.session`: a client counts only an Ack that matches, and
    whose ``mac`` the server key's session key made)."""

    data_version: int
    kind: int
    link: bytes
    want_snapshot: bool
    mac: bytes = NO_MAC


@message(34, I64, STR)
class NeedSnapshot(Message):
    data_version: int
    reason: str


@message(35, U32, U32, B16)
class ChunkAck(Message):
    snapshot_id: int
    index: int
    mac: bytes = NO_MAC


@message(36, U32, I64, B16)
class SnapshotAck(Message):
    snapshot_id: int
    data_version: int
    mac: bytes = NO_MAC


MACED = (Ack, ChunkAck, SnapshotAck)
"""The answers that count toward durability: each ends with a MAC (:mod:`cldcb.core.answermac`)."""


@message(37, I64, B32, U32, BYTES, U64)
class FetchSnapshot(Message):
    data_version: int
    anchor: bytes
    chunk_count: int
    manifest: bytes
    time: int


@message(38, U32, BYTES)
class FetchChunk(Message):
    index: int
    sealed: bytes


@message(39, I64, U8, B32, BYTES, U64)
class FetchRecord(Message):
    data_version: int
    kind: int
    link: bytes
    sealed: bytes
    time: int


@message(40, U64)
class FetchEnd(Message):
    record_count: int


@message(45, LIST_BYTES)
class States(Message):
    states: list[bytes]     # each one :meth:`RestorableState.encode`


_STATE = struct.Struct(">QBqQqqQQ")


@dataclass(frozen=True)
class RestorableState:
    """One kept snapshot generation and the records of its chain (``States``).

    ``damaged``: the snapshot was found damaged (its generation cannot be
    restored; ``note`` says how); ``snapshot_data_version`` is -1 and
    ``snapshot_time`` 0 when its trailer is unreadable. ``first_data_version`` and
    ``last_data_version`` are -1 when no record follows the snapshot.
    """

    generation: int
    damaged: bool
    snapshot_data_version: int
    snapshot_time: int
    first_data_version: int
    last_data_version: int
    record_count: int
    newest_time: int
    note: str = ""

    @property
    def data_version(self) -> int:
        """The newest state this generation restores to (-1: unknown)."""
        return max(self.snapshot_data_version, self.last_data_version)

    def encode(self) -> bytes:
        try:
            head = _STATE.pack(self.generation, int(self.damaged), self.snapshot_data_version,
                               self.snapshot_time, self.first_data_version,
                               self.last_data_version, self.record_count, self.newest_time)
        except struct.error as exc:
            raise ProtocolError(f"state field out of range: {exc}") from None
        return head + self.note.encode("utf-8")[:1000]

    @classmethod
    def decode(cls, data: bytes) -> RestorableState:
        if len(data) < _STATE.size or data[8] > 1:
            raise ProtocolError("a restorable state is malformed")
        gen, damaged, sdv, stime, first, last, count, newest = _STATE.unpack_from(data)
        note = data[_STATE.size:].decode("utf-8", "replace")
        return cls(gen, bool(damaged), sdv, stime, first, last, count, newest, note)


@message(50, U16, STR)
class Error(Message):
    code: int
    text: str


# --- frames ----------------------------------------------------------------------

def encode(msg: Message) -> bytes:
    """One frame holding ``msg``."""
    fast = _FAST.get(msg.TYPE)
    if fast is not None and type(msg) is fast.cls:
        return fast.frame(msg)
    body = msg.body()
    if len(body) + 1 > MAX_FRAME:
        raise ProtocolError(f"{type(msg).__name__} of {len(body)} bytes exceeds the frame "
                            f"limit of {MAX_FRAME}")
    return struct.pack(">IB", len(body) + 1, msg.TYPE) + body


def decode(type_: int, body: bytes | memoryview) -> Message:
    """The message of one frame's type and body; only ever raises ProtocolError."""
    fast = _FAST.get(type_)
    if fast is not None:
        return fast.decode(body)
    cls = MESSAGES.get(type_)
    if cls is None:
        raise ProtocolError(f"unknown message type {type_}")
    r = _Reader(body)
    values = [_decode_field(spec, r) for spec in cls.SPEC]
    if r.pos != len(r.buf):
        raise ProtocolError(f"{cls.__name__} has {len(r.buf) - r.pos} trailing bytes")
    return cls(*values)


# --- the per-change frames in one piece --------------------------------------------
# A streaming writer's requests are nearly all Writes and their answers Acks: these
# encode and recognise those two frames with one struct each, without building and
# taking apart the message objects. Same bytes as encode(), same message as decode()
# (tests/test_wire.py checks both).

_WRITE_HEAD = struct.Struct(">IBqB32sI")   # length, type, data_version, kind, link, len
_ACK_FRAME = struct.Struct(">IBqB32sB16s")  # length, type, data_version, kind, link, want, mac
_ACK_LENGTH = _ACK_FRAME.size - 4
_WRITE, _ACK = Write.TYPE, Ack.TYPE
_CHUNK_HEAD = struct.Struct(">IBIII")     # length, type, snapshot_id, index, len


def write_frame(data_version: int, kind: int, link: bytes, sealed: bytes) -> bytes:
    """``encode(Write(data_version, kind, link, sealed))``; ProtocolError as encode."""
    if not isinstance(link, bytes) or len(link) != 32:
        raise ProtocolError("field must be 32 bytes")
    length = _WRITE_HEAD.size - 4 + len(sealed)
    if length > MAX_FRAME:
        raise ProtocolError(f"Write of {length - 1} bytes exceeds the frame limit of "
                            f"{MAX_FRAME}")
    try:
        return _WRITE_HEAD.pack(length, _WRITE, data_version, kind, link, len(sealed)) + sealed
    except struct.error as exc:
        raise ProtocolError(f"field out of range: {exc}") from None


def snapshot_chunk_frame(snapshot_id: int, index: int, sealed_len: int) -> tuple[bytearray, int]:
    """A ``SnapshotChunk`` frame whose sealed bytes are still to be written: the frame
    (``encode(SnapshotChunk(snapshot_id, index, sealed))`` once ``sealed_len`` bytes are
    written at the offset returned) and that offset. So a chunk is sealed straight into
    the frame that is sent. ProtocolError as encode."""
    length = 1 + 8 + 4 + sealed_len
    if length > MAX_FRAME:
        raise ProtocolError(f"SnapshotChunk of {length - 1} bytes exceeds the frame limit of "
                            f"{MAX_FRAME}")
    frame = bytearray(4 + length)
    try:
        _CHUNK_HEAD.pack_into(frame, 0, length, SnapshotChunk.TYPE, snapshot_id, index,
                              sealed_len)
    except struct.error as exc:
        raise ProtocolError(f"field out of range: {exc}") from None
    return frame, _CHUNK_HEAD.size


def write_in(data: bytes) -> Write | None:
    """The Write ``data`` is, if it is exactly one whole well-formed Write frame; else
    None (then FrameDecoder says what it is, or what is wrong with it)."""
    if len(data) < _WRITE_HEAD.size or data[4] != _WRITE:
        return None
    length, _, data_version, kind, link, n = _WRITE_HEAD.unpack_from(data)
    if length != len(data) - 4 or n != len(data) - _WRITE_HEAD.size or length > MAX_FRAME:
        return None
    return Write(data_version, kind, link, data[_WRITE_HEAD.size:])


def ack_frame(data_version: int, kind: int, link: bytes, want_snapshot: bool,
              mac: bytes = NO_MAC) -> bytes:
    """``encode(Ack(data_version, kind, link, want_snapshot, mac))``; ProtocolError as
    encode."""
    if not isinstance(link, bytes) or len(link) != 32:
        raise ProtocolError("field must be 32 bytes")
    if not isinstance(mac, bytes) or len(mac) != MAC_SIZE:
        raise ProtocolError(f"field must be {MAC_SIZE} bytes")
    try:
        return _ACK_FRAME.pack(_ACK_LENGTH, _ACK, data_version, kind, link,
                               1 if want_snapshot else 0, mac)
    except struct.error as exc:
        raise ProtocolError(f"field out of range: {exc}") from None


def ack_in(data: bytes) -> Ack | None:
    """The Ack ``data`` is, if it is exactly one whole well-formed Ack frame; else None."""
    if len(data) != _ACK_FRAME.size or data[4] != _ACK:
        return None
    length, _, data_version, kind, link, want, mac = _ACK_FRAME.unpack(data)
    if length != _ACK_LENGTH or want > 1:
        return None
    return Ack(data_version, kind, link, want == 1, mac)


LARGE_FRAME = 64 * 1024
"""A frame at least this long (a snapshot chunk) is assembled in a buffer of its own as
its pieces arrive: its bytes are copied once, and that buffer is what ``on_frame`` gets."""


class FrameDecoder:
    """Turns a byte stream into messages; feed it whatever arrives."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._frame: bytearray | None = None   # a large frame being assembled
        self._have = 0                          # ... its bytes so far
        self.max_frame = max_frame
        """Longer frames are refused as soon as their length arrives (may change)."""
        self.on_frame: Callable[[bytes | bytearray | memoryview], None] | None = None
        """Called with each whole frame (length included) before it is decoded; it must
        not keep a memoryview (its buffer is reused), and may keep a ``bytes`` or a
        ``bytearray`` (never changed again) (may change)."""

    def feed(self, data: bytes | memoryview) -> list[Message]:
        out: list[Message] = []
        if self._frame is not None:
            data = self._assemble(data, out)
            if not data:
                return out
        if not self._buf and len(data) > 4:
            # The usual case (a request, an answer): exactly one whole frame, decoded
            # from ``data`` itself, with no copy into the buffer and out again.
            (length,) = _U32.unpack_from(data, 0)
            if length == len(data) - 4 and length <= self.max_frame:
                type_ = data[4]
                if self.on_frame is not None:
                    self.on_frame(data)
                body = memoryview(data)[5:] if type_ in _FAST else data[5:]
                out.append(decode(type_, body))
                return out
        self._buf += data
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from(">I", self._buf, 0)
            if length == 0:
                raise ProtocolError("empty frame")
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of "
                                    f"{self.max_frame}")
            if len(self._buf) < 4 + length:
                if length >= LARGE_FRAME:        # the rest goes straight into its own buffer
                    self._frame = frame = bytearray(4 + length)
                    self._have = len(self._buf)
                    frame[:self._have] = self._buf
                    self._buf.clear()
                break
            type_ = self._buf[4]
            with memoryview(self._buf) as view:
                if self.on_frame is not None:
                    with view[:4 + length] as frame_view:
                        self.on_frame(frame_view)
                body = bytes(view[5:4 + length])
            del self._buf[:4 + length]
            out.append(decode(type_, body))
        return out

    def _assemble(self, data: bytes | memoryview, out: list[Message]) -> memoryview:
        """Copy what ``data`` holds of the large frame being assembled; when it is whole,
        decode it into ``out``. Returns the rest of ``data``."""
        frame = self._frame
        assert frame is not None
        view = memoryview(data)
        take = min(len(view), len(frame) - self._have)
        frame[self._have:self._have + take] = view[:take]
        self._have += take
        if self._have == len(frame):
            self._frame = None
            if self.on_frame is not None:
                self.on_frame(frame)
            out.append(_decode_owned(frame))
        return view[take:]

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buf) + (self._have if self._frame is not None else 0)


def _decode_owned(frame: bytearray) -> Message:
    """The message of a whole large frame in a buffer of its own (never changed again): a
    snapshot chunk's ``sealed`` is a view of it rather than a copy (the server writes it
    as it is); anything else as :func:`decode` gives it."""
    body = memoryview(frame)[5:]
    if frame[4] != SnapshotChunk.TYPE:
        return decode(frame[4], body)
    codec = _FAST[SnapshotChunk.TYPE]
    size = codec.struct.size
    if len(body) < size + 4 or size + 4 + _U32.unpack_from(body, size)[0] != len(body):
        return decode(frame[4], body)           # (raises what is wrong with it)
    snapshot_id, index = codec.struct.unpack_from(body, 0)
    return SnapshotChunk(snapshot_id, index, body[size + 4:])  # type: ignore[arg-type]
