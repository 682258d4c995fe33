"""Sealing: everything the plugin sends is sealed to the node's public key.

Pure code: randomness (ephemeral keys, anchors) and time come in as
parameters. The node's private key is only ever used through a
:class:`cldcb.node.nodekey.NodeKey` (``ecdh``), so an HSM can open everything.

Keys
----
ECDH is SHA256 of the compressed shared point (coincurve's ``ecdh``, Core
Lightning's hsmd). A *stream* has an ephemeral secp256k1 key ``e``; its key is::

    k = HKDF-SHA256(ikm = ECDH(e, node) || ECDH(client, node),
                    salt = none,
                    info = b"cldcb/1 " + purpose + client_pub)

The second ECDH is a static secret only the client and the node can compute:
a server that knows (or guesses) the node id still cannot forge a record, a
chunk or a manifest. Records of one plugin process share one stream (all its
connections, to every server: a record is sealed once), so the server sees the
same ``e·G`` and a growing counter until lightningd restarts the plugin; each
snapshot has a stream of its own. The AEAD is ChaCha20-Poly1305 with the
nonce ``4 zero bytes || counter (u64 big-endian)``; the sealer never reuses a
counter.

Sealed item layout (the bytes the server stores, and whose SHA256 is the
item's *hash*)::

    snapshot chunk, manifest; record of format 1:
        version (1 byte, = 1) || e·G (33) || counter (u64) || ciphertext || tag (16)
    record of format 2:
        version (1 byte, = 2) || e·G (33) || counter (u64) || replaces (32)
                              || ciphertext || tag (16)

and the AEAD's associated data is ``header || context`` (the header: every
byte before the ciphertext), where context binds what the item is and where
it belongs:

- record:   b"record"   || client_pub || data_version (i64) || kind (u8) || link (32)
- chunk:    b"chunk"    || client_pub || snapshot data_version (i64) || index (u32)
- manifest: b"manifest" || client_pub || snapshot data_version (i64)

The record chain
----------------
A record's ``link`` is the hash of its *effective predecessor*, as
:func:`cldcb.core.dataversion.decide` says: the newest record for an append, the
predecessor of the replaced batch for a replacement, a snapshot's *anchor* for
the first record after a snapshot. A snapshot's manifest names its
data_version and its anchor: the hash of the newest record it contains, or, for
a snapshot taken where the server holds no usable record (first contact, a
gap), 32 fresh random bytes. Because the link is inside the associated data,
the server can neither reorder, splice, drop a middle record, present an
uncommitted batch in place of its replacement, nor move a record to another
client's stream, without :class:`ChainVerifier` noticing.

A record of format 2 also names what it *replaces*: for a REPLACE (the same
data_version again after an uncommitted batch) the hash of the batch it
supersedes, the tip the plugin held, else 32 zero bytes. It travels in the
clear in the header, so it is inside the associated data too: a server
cannot alter it, and a recovery that fetched the replacement from one server
knows it supersedes the tip another server ends on, even when the server that
holds the replacement never held the batch it replaces
(:attr:`ChainVerifier.replaced`; :mod:`cldcb.client.tips` compares tips across
servers). The
verifier does not require ``replaces`` to equal the record it drops: a server
that was not in step when the batch was sent holds the replacement as an
append, and ``replaces`` still names the batch.

Padding
-------
A record's plaintext of format 2 is padded with zero bytes to a size class
(:func:`padded_size`): a power of two, at least :data:`MIN_PADDED` bytes; above
:data:`PAD_STEP` a multiple of it; never past :data:`MAX_PADDED` (so padding
never makes a record the wire cannot carry). Unpadded, the sealed size alone
names the statement a record carries (on the recorded channel trace, the
verb and table of the first statement of 90% of records); padded, of 6%, for
19% more sealed bytes (``bench/padding.py`` measures both on every trace).
The padding is inside the ciphertext, so it is authenticated;
:func:`decode_change` accepts only zero bytes after the statements.
Snapshot chunks are not padded: a snapshot is cut into chunks of one fixed
size, so only the last chunk's size varies, and it tells the database's size,
which the snapshot's total reveals anyway; manifests have one fixed size.

Compatibility: :class:`ChainVerifier` opens records of both formats (a
backup made before format 2 stays recoverable: format 1 has no ``replaces``
and no padding); snapshots are still of format 1. The plugin seals format 2.

Record plaintext: ``time_ms (u64) || count (u32) || (u32 length || UTF-8 SQL)*``,
then (format 2) zero bytes up to :func:`padded_size`.
Manifest plaintext: ``data_version (i64) || anchor (32) || chunk_count (u32) ||
total_size (u64) || time_ms (u64)``. A snapshot's chunks and manifest are one
stream: every chunk must carry the manifest's ephemeral key, its index is in
the associated data, and the manifest counts chunks and bytes, so chunks cannot
be dropped, reordered, or taken from another snapshot.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cldcb.core.dataversion import Action, Decision, Kind, Tip, advance, decide, snapshot_tip
from cldcb.errors import ChainError, SealError

VERSION = 1
"""Format of snapshot chunks and manifests, and of records sealed before format 2."""
RECORD_VERSION = 2
"""Format of the records sealed now: ``replaces`` in the header, padded plaintext."""
HEADER_LEN = 1 + 33 + 8
RECORD_HEADER_LEN = HEADER_LEN + 32
TAG_LEN = 16
OVERHEAD = HEADER_LEN + TAG_LEN
RECORD_OVERHEAD = RECORD_HEADER_LEN + TAG_LEN
ZERO_HASH = bytes(32)
_HEADER_LENS = {VERSION: HEADER_LEN, RECORD_VERSION: RECORD_HEADER_LEN}

MIN_PADDED = 256
"""The smallest size class of a record's plaintext."""
PAD_STEP = 1 << 20
"""Size classes are powers of two up to this, multiples of it above."""
MAX_PADDED = 15 << 20
"""Padding stops here: a record stays well inside the wire's frame limit (16 MiB)."""


class EcdhKey(Protocol):
    """What opening needs from the node key (see :mod:`cldcb.node.nodekey`)."""

    @property
    def pubkey(self) -> bytes: ...

    def ecdh(self, point: bytes) -> bytes: ...


def item_hash(sealed: bytes) -> bytes:
    """The hash that links and anchors refer to: SHA256 of the sealed bytes."""
    return hashlib.sha256(sealed).digest()


def stream_key(shared_ephemeral: bytes, shared_static: bytes, purpose: bytes,
               client_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"cldcb/1 " + purpose + client_pub).derive(
                    shared_ephemeral + shared_static)


_CHANGE_HEAD = struct.Struct(">QI")  # a change's time (ms) and statement count
_LENGTH = struct.Struct(">I")
_NONCE = struct.Struct(">4xQ")      # 4 zero bytes, then the item counter
_COUNTER = struct.Struct(">Q")
_RECORD_AT = struct.Struct(">qB")


def _nonce(counter: int) -> bytes:
    return _NONCE.pack(counter)


def record_context(client_pub: bytes, data_version: int, kind: Kind, link: bytes) -> bytes:
    return b"record" + client_pub + _RECORD_AT.pack(data_version, int(kind)) + link


def chunk_context(client_pub: bytes, data_version: int, index: int) -> bytes:
    return b"chunk" + client_pub + struct.pack(">qI", data_version, index)


def manifest_context(client_pub: bytes, data_version: int) -> bytes:
    return b"manifest" + client_pub + struct.pack(">q", data_version)


def padded_size(size: int) -> int:
    """The size class of a plaintext of ``size`` bytes (see "Padding" above)."""
    if size >= MAX_PADDED:
        return size
    if size <= PAD_STEP:
        return max(MIN_PADDED, 1 << (size - 1).bit_length())
    return min(-(-size // PAD_STEP) * PAD_STEP, MAX_PADDED)


def pad(plain: bytes) -> bytes:
    """``plain`` followed by zero bytes up to its size class."""
    return plain + bytes(padded_size(len(plain)) - len(plain))


class StreamSealer:
    """Seals items of one stream (one plugin connection, or one snapshot)."""

    def __init__(self, node_pub: bytes, client_priv: bytes, purpose: bytes,
                 ephemeral_priv: bytes, version: int = VERSION) -> None:
        eph = coincurve.PrivateKey(ephemeral_priv)
        self.client_pub = coincurve.PrivateKey(client_priv).public_key.format()
        self.ephemeral_pub = eph.public_key.format()
        shared_e = eph.ecdh(node_pub)
        shared_s = coincurve.PrivateKey(client_priv).ecdh(node_pub)
        self._aead = ChaCha20Poly1305(stream_key(shared_e, shared_s, purpose, self.client_pub))
        self._counter = 0
        self._head = bytes([version]) + self.ephemeral_pub

    def seal(self, plaintext: bytes, context: bytes, extra: bytes = b"") -> bytes:
        """``extra``: the header's bytes after the counter (format 2 records: replaces)."""
        header = self._head + _COUNTER.pack(self._counter) + extra
        ct = self._aead.encrypt(_NONCE.pack(self._counter), plaintext, header + context)
        self._counter += 1
        return header + ct


    def seal_into(self, plaintext: bytes | memoryview, context: bytes,
                  out: memoryview) -> None:
        """:meth:`seal` written into ``out`` (exactly ``OVERHEAD + len(plaintext)`` bytes)
        instead of new bytes: the header, then the ciphertext and tag, no copy between."""
        header = self._head + _COUNTER.pack(self._counter)
        out[:len(header)] = header
        self._aead.encrypt_into(_NONCE.pack(self._counter), plaintext, header + context,
                                out[len(header):])
        self._counter += 1


class StreamOpener:
    """Opens items sealed for one client; caches one key per ephemeral key."""

    def __init__(self, node: EcdhKey, client_pub: bytes, purpose: bytes) -> None:
        self.client_pub = client_pub
        self._node = node
        self._purpose = purpose
        self._static = node.ecdh(client_pub)
        self._keys: dict[bytes, ChaCha20Poly1305] = {}

    def open(self, sealed: bytes, context: bytes, what: str,
             versions: tuple[int, ...] = (VERSION,)) -> bytes:
        """The plaintext of ``sealed``, an item of one of the formats ``versions``."""
        header_len = _HEADER_LENS.get(sealed[0], 0) if sealed else 0
        if not sealed or sealed[0] not in versions or len(sealed) < header_len + TAG_LEN:
            raise SealError(f"{what} is truncated or not a cldcb sealed item of format "
                            f"{' or '.join(map(str, versions))}")
        header = sealed[:header_len]
        epub = sealed[1:34]
        aead = self._keys.get(epub)
        if aead is None:
            try:
                shared_e = self._node.ecdh(epub)
            except Exception as exc:  # not a point on the curve
                raise SealError(f"{what} names an invalid ephemeral key") from exc
            aead = ChaCha20Poly1305(stream_key(shared_e, self._static, self._purpose,
                                               self.client_pub))
            self._keys[epub] = aead
        counter = struct.unpack(">Q", sealed[34:42])[0]
        try:
            return aead.decrypt(_nonce(counter), sealed[header_len:], header + context)
        except InvalidTag:
            raise SealError(
                f"{what} does not open: it was altered, belongs to another client or "
                "position, or this is not the node it was sealed for") from None


# --- changes (record plaintext) -------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One db_write hook call: its statements and when the plugin saw it."""

    data_version: int
    kind: Kind
    writes: tuple[str, ...]
    time_ms: int


def encode_change(writes: Sequence[str], time_ms: int) -> bytes:
    """The plaintext of a record; SealError if a statement is not text that UTF-8 can
    carry (lightningd never sends one: the call is malformed)."""
    parts = [_CHANGE_HEAD.pack(time_ms, len(writes))]
    length = _LENGTH.pack
    try:
        for w in writes:
            b = w.encode()
            parts += (length(len(b)), b)
    except (AttributeError, UnicodeEncodeError):
        raise SealError("a db_write statement is not valid text (a string that UTF-8 can "
                        "encode); the call is malformed and cannot be backed up") from None
    return b"".join(parts)


def decode_change(plain: bytes, padded: bool = False) -> tuple[int, tuple[str, ...]]:
    """A record's plaintext back as (time_ms, statements); ``padded`` (format 2): zero
    bytes may follow the statements."""
    try:
        time_ms, count = _CHANGE_HEAD.unpack_from(plain, 0)
        pos = _CHANGE_HEAD.size
        size = len(plain)
        length = _LENGTH.unpack_from
        out = []
        for _ in range(count):
            (n,) = length(plain, pos)
            pos += 4
            if pos + n > size:
                raise ValueError("short")
            out.append(plain[pos:pos + n].decode("utf-8"))
            pos += n
        if pos != size and not (padded and plain.count(0, pos) == size - pos):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise SealError(f"a record's content is malformed ({exc})") from None
    return time_ms, tuple(out)


class RecordSealer:
    """The plugin side of the record chain: one per plugin connection.

    ``seal_change`` seals a change (format 2, padded) with the link the caller
    decided (see :func:`cldcb.core.dataversion.decide`) and, for a REPLACE, the hash
    of the batch it replaces; the same bytes go to every server.
    """

    def __init__(self, node_pub: bytes, client_priv: bytes, ephemeral_priv: bytes) -> None:
        self._stream = StreamSealer(node_pub, client_priv, b"record", ephemeral_priv,
                                    RECORD_VERSION)
        self.client_pub = self._stream.client_pub

    def seal_change(self, data_version: int, kind: Kind, link: bytes,
                    writes: Sequence[str], time_ms: int,
                    replaces: bytes = ZERO_HASH) -> bytes:
        if len(replaces) != 32:
            raise SealError("replaces must be a record's hash (32 bytes)")
        return self._stream.seal(pad(encode_change(writes, time_ms)),
                                 record_context(self.client_pub, data_version, kind, link),
                                 replaces)


def replaced_hash(tip: Tip | None, decision: Decision) -> bytes:
    """The ``replaces`` of a change decided against ``tip``: the tip's hash for a REPLACE
    (the uncommitted batch it supersedes), else zero bytes."""
    if decision.action is Action.REPLACE and tip is not None:
        return tip.hash
    return ZERO_HASH


def record_replaces(sealed: bytes) -> bytes:
    """What a sealed record says it replaces (zero bytes: nothing, or format 1). Only
    meaningful once the record opened (the header is authenticated then)."""
    if sealed[:1] == bytes([RECORD_VERSION]) and len(sealed) >= RECORD_HEADER_LEN:
        return sealed[HEADER_LEN:RECORD_HEADER_LEN]
    return ZERO_HASH


# --- snapshots ------------------------------------------------------------------

@dataclass(frozen=True)
class Manifest:
    data_version: int
    anchor: bytes
    chunk_count: int
    total_size: int
    time_ms: int

    def encode(self) -> bytes:
        return struct.pack(">q32sIQQ", self.data_version, self.anchor, self.chunk_count,
                           self.total_size, self.time_ms)

    @classmethod
    def decode(cls, plain: bytes) -> Manifest:
        try:
            return cls(*struct.unpack(">q32sIQQ", plain))
        except struct.error:
            raise SealError("a snapshot manifest is malformed") from None


class SnapshotSealer:
    """Seals one snapshot in chunks (bounded memory): chunks, then the manifest."""

    def __init__(self, node_pub: bytes, client_priv: bytes, ephemeral_priv: bytes,
                 data_version: int, anchor: bytes) -> None:
        self._stream = StreamSealer(node_pub, client_priv, b"snapshot", ephemeral_priv)
        self.client_pub = self._stream.client_pub
        self.data_version = data_version
        self.anchor = anchor
        self._index = 0
        self._size = 0

    def seal_chunk(self, data: bytes | memoryview) -> bytes:
        self._size += len(data)
        sealed = self._stream.seal(data, chunk_context(self.client_pub, self.data_version,
                                                       self._index))
        self._index += 1
        return sealed

    def seal_chunk_into(self, data: bytes | memoryview, out: memoryview) -> None:
        """:meth:`seal_chunk` written into ``out`` (``OVERHEAD + len(data)`` bytes: where a
        frame holds the sealed chunk, see :func:`cldcb.core.wire.snapshot_chunk_frame`)."""
        self._size += len(data)
        self._stream.seal_into(data, chunk_context(self.client_pub, self.data_version,
                                                   self._index), out)
        self._index += 1

    @property
    def chunk_count(self) -> int:
        return self._index

    def seal_manifest(self, time_ms: int) -> bytes:
        m = Manifest(self.data_version, self.anchor, self._index, self._size, time_ms)
        return self._stream.seal(m.encode(), manifest_context(self.client_pub,
                                                              self.data_version))


class SnapshotOpener:
    """Opens a snapshot: the manifest first, then each chunk in order, then ``finish``."""

    def __init__(self, node: EcdhKey, client_pub: bytes, data_version: int,
                 sealed_manifest: bytes) -> None:
        self._opener = StreamOpener(node, client_pub, b"snapshot")
        plain = self._opener.open(sealed_manifest, manifest_context(client_pub, data_version),
                                  f"the manifest of the snapshot at data_version {data_version}")
        self.manifest = Manifest.decode(plain)
        if self.manifest.data_version != data_version:
            raise SealError("a snapshot manifest names another data_version than the server")
        self._epub = sealed_manifest[1:34]
        self._next = 0
        self._size = 0

    def open_chunk(self, index: int, sealed: bytes) -> bytes:
        if index != self._next:
            raise SealError(f"snapshot chunk {index} arrived where chunk {self._next} belongs")
        if sealed[1:34] != self._epub:
            raise SealError(f"snapshot chunk {index} (data_version {self.manifest.data_version}) "
                            "belongs to another snapshot")
        data = self._opener.open(sealed, chunk_context(self._opener.client_pub,
                                                       self.manifest.data_version, index),
                                 f"snapshot chunk {index} (data_version "
                                 f"{self.manifest.data_version})")
        self._next += 1
        self._size += len(data)
        return data

    def finish(self) -> None:
        m = self.manifest
        if self._next != m.chunk_count or self._size != m.total_size:
            raise SealError(
                f"the snapshot at data_version {m.data_version} is incomplete or altered "
                f"({self._next} of {m.chunk_count} chunks, {self._size} of {m.total_size} bytes)")


# --- verifying the chain on recovery ------------------------------------------------

class ChainVerifier:
    """Opens fetched records one by one and checks the chain.

    Start it from a snapshot's (data_version, anchor): every fetched stream
    begins with one, since a client's first contact is always a snapshot.
    Each :meth:`open` returns the :class:`Change` and what the data_version
    rules decided for it; any break raises :class:`ChainError` naming the
    record (its position in the fetched stream and its data_version).
    Records of format 1 and 2 are opened (see "Compatibility").

    :attr:`replaced` collects the hashes of the batches this chain supersedes:
    each record a REPLACE dropped, and each hash a record of format 2 names in
    ``replaces``. A tip another server ends on that is in this set was never
    committed by lightningd.
    """

    def __init__(self, node: EcdhKey, client_pub: bytes, snapshot_data_version: int,
                 anchor: bytes) -> None:
        self._opener = StreamOpener(node, client_pub, b"record")
        self.client_pub = client_pub
        self.position = 0
        self.tip = snapshot_tip(snapshot_data_version, anchor)
        self.replaced: set[bytes] = set()

    def open(self, data_version: int, kind: Kind, link: bytes,
             sealed: bytes) -> tuple[Change, Decision]:
        pos = self.position
        where = f"record #{pos} (data_version {data_version})"
        try:
            plain = self._opener.open(
                sealed, record_context(self.client_pub, data_version, kind, link), where,
                (VERSION, RECORD_VERSION))
        except SealError as exc:
            raise ChainError(str(exc), position=pos, data_version=data_version) from None
        decision = decide(self.tip, data_version, kind)
        if decision.link is None:
            raise ChainError(f"{where} does not follow data_version "
                             f"{self.tip.data_version}: {decision.reason}; a record "
                             "is missing or out of order", position=pos,
                             data_version=data_version)
        if decision.link != link:
            raise ChainError(f"{where} is not linked to its predecessor: a record was "
                             "dropped, reordered or replaced", position=pos,
                             data_version=data_version)
        time_ms, writes = decode_change(plain, padded=sealed[0] == RECORD_VERSION)
        if decision.action is Action.REPLACE:
            self.replaced.add(self.tip.hash)
        replaces = record_replaces(sealed)
        if replaces != ZERO_HASH:
            self.replaced.add(replaces)
        self.tip = advance(self.tip, data_version, kind, item_hash(sealed),
                           decision=decision)
        self.position += 1
        return Change(data_version, kind, writes, time_ms), decision

