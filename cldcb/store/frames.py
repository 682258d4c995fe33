"""On-disk framing of the store's files (see :mod:`cldcb.store` for the layout).

Every record, snapshot chunk and snapshot trailer is one frame::

    magic (4) || length (u32) || crc32(body) (u32) || crc32(first 12 bytes) (u32) || body

The header has its own checksum so a damaged length is never trusted: a frame
whose header or body does not check is *damage*, and whether it is a torn
tail (cut it) or damage in the middle (refuse to go on) is decided by
:func:`valid_frame_after`: a torn tail never has a valid frame after it,
because the store only ever appends.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cldcb.errors import Damage

HEADER = struct.Struct(">4sIII")
HEADER_LEN = HEADER.size
_FIRST12 = struct.Struct(">4sII")
_U32 = struct.Struct(">I")
MAX_BODY = 64 * 1024 * 1024

RECORD_MAGIC = b"cbR1"
CHUNK_MAGIC = b"cbC1"
TRAILER_MAGIC = b"cbT1"

# record body: data_version, kind, link, receive time (ms), then the sealed bytes
RECORD_HEAD = struct.Struct(">qB32sQ")
# chunk body: index, then the sealed bytes
CHUNK_HEAD = struct.Struct(">I")
# trailer body: data_version, anchor, chunk_count, commit time, anchored,
# start segment, start offset, then the sealed manifest
TRAILER_HEAD = struct.Struct(">q32sIQBQQ")

SNAPSHOT_HEADER = b"cldcbSN1"
FOOTER = struct.Struct(">Q8s")
FOOTER_MAGIC = b"cldcbEND"

_WINDOW = 1 << 20


def frame_header(magic: bytes, *body: bytes | memoryview) -> bytes:
    """The header of the frame of the body made of the ``body`` pieces (the checksum runs
    over them in turn; nothing is copied)."""
    crc = size = 0
    for piece in body:
        crc = zlib.crc32(piece, crc)
        size += len(piece)
    head = _FIRST12.pack(magic, size, crc)
    return head + _U32.pack(zlib.crc32(head))


def encode_frame(magic: bytes, *body: bytes) -> bytes:
    """The frame of the body made of the ``body`` pieces, each copied once (into the
    frame)."""
    return b"".join((frame_header(magic, *body), *body))


def frame_len(body_len: int) -> int:
    return HEADER_LEN + body_len


def read_frame(f: BinaryIO, offset: int, end: int, magic: bytes) -> tuple[bytes, int]:
    """The body of the frame at ``offset`` and the offset after it, or raise Damage."""
    if end - offset < HEADER_LEN:
        raise Damage(offset, "a frame header is cut short")
    f.seek(offset)
    head = f.read(HEADER_LEN)
    if len(head) < HEADER_LEN:
        raise Damage(offset, "a frame header is cut short")
    got_magic, length, body_crc, head_crc = HEADER.unpack(head)
    if got_magic != magic or zlib.crc32(head[:12]) != head_crc or length > MAX_BODY:
        raise Damage(offset, "a frame header is damaged")
    nxt = offset + HEADER_LEN + length
    if nxt > end:
        raise Damage(offset, "a frame is cut short")
    body = f.read(length)
    if len(body) != length:
        raise Damage(offset, "a frame is cut short")
    if zlib.crc32(body) != body_crc:
        raise Damage(offset, "a frame's checksum does not match")
    return body, nxt


def iter_frames(f: BinaryIO, start: int, end: int, magic: bytes) -> Iterator[tuple[int, bytes]]:
    """``(offset, body)`` of each frame from ``start`` to ``end``; Damage at the first bad one."""
    pos = start
    while pos < end:
        body, nxt = read_frame(f, pos, end, magic)
        yield pos, body
        pos = nxt


def valid_frame_after(f: BinaryIO, offset: int, end: int, magic: bytes) -> int | None:
    """Offset of a valid frame starting after ``offset`` (None if there is none)."""
    pos = offset + 1
    while pos < end:
        f.seek(pos)
        window = f.read(min(_WINDOW + len(magic), end - pos))
        if not window:
            return None
        i = window.find(magic)
        while i >= 0:
            try:
                read_frame(f, pos + i, end, magic)
                return pos + i
            except Damage:
                pass
            i = window.find(magic, i + 1)
        pos += max(1, len(window) - len(magic) + 1)
    return None


@dataclass(frozen=True)
class RecordFrame:
    """A stored record: what a fetch serves of it (the receive time too)."""

    data_version: int
    kind: int
    link: bytes
    time_ms: int
    sealed: bytes


def encode_record(data_version: int, kind: int, link: bytes, time_ms: int,
                  sealed: bytes) -> bytes:
    return encode_frame(RECORD_MAGIC, RECORD_HEAD.pack(data_version, kind, link, time_ms),
                        sealed)


def decode_record(body: bytes) -> RecordFrame:
    dv, kind, link, time_ms = RECORD_HEAD.unpack_from(body, 0)
    return RecordFrame(dv, kind, link, time_ms, body[RECORD_HEAD.size:])


def encode_chunk(index: int, sealed: bytes) -> bytes:
    return encode_frame(CHUNK_MAGIC, CHUNK_HEAD.pack(index), sealed)


def chunk_head(index: int, sealed: bytes | memoryview) -> bytes:
    """The bytes of :func:`encode_chunk` before ``sealed``: written, then ``sealed`` itself,
    the same bytes without building a copy of the chunk."""
    head = CHUNK_HEAD.pack(index)
    return frame_header(CHUNK_MAGIC, head, sealed) + head


@dataclass(frozen=True)
class ChunkFrame:
    """A stored snapshot chunk: its index and sealed bytes."""

    index: int
    sealed: bytes


def decode_chunk(body: bytes) -> tuple[int, bytes]:
    return CHUNK_HEAD.unpack_from(body, 0)[0], body[CHUNK_HEAD.size:]
