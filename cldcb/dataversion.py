"""The data_version rules: what to do with each ``db_write`` hook call.

This module is pure (no I/O, no clock, no randomness). The plugin, the server,
the replayer and recovery all use it, so that they walk the record chain the
same way.

Terms
-----

change
    One ``db_write`` hook call: ``{"data_version": N, "writes": [sql, ...]}``.
record
    A change as the backup holds it (sealed; see ``seal``). Its *link* is the
    SHA256 of the sealed bytes of its *effective predecessor*.
tip
    The newest thing the backup holds: either its newest record, or, when no
    record follows it yet, a snapshot's *anchor* (:class:`Tip` with
    ``is_snapshot=True``).

What lightningd sends (Core Lightning v26.06, see ``tests/data`` and
``traces/README.md``)
---------------------------------------------------------------------------

The database holds a counter ``vars.data_version``; a fresh database is at 0.

1. A **normal** change is one transaction. lightningd runs its statements,
   bumps the counter with ``UPDATE vars SET intval = intval + 1 WHERE name =
   'data_version' AND intval = D-1`` as the change's *last* statement, calls
   the hook with ``data_version = D`` while the transaction is still open,
   and commits only once the hook answered ``continue``. A normal change with
   data_version D turns state D-1 into state D.
2. A **PRAGMA-only** change (table-rebuild migrations send ``PRAGMA
   foreign_keys = OFF;`` and ``= ON;`` as calls of their own) is run outside any
   transaction and does not bump the counter. It carries the data_version of
   the state it applies to, i.e. **the data_version of the batch committed
   just before it**. In every recorded trace the stream starts::

       D=1 normal (schema + migrations)   D=1 PRAGMA foreign_keys = OFF;
       D=2 normal (table rebuild)         D=2 PRAGMA foreign_keys = ON;
       D=3 normal ...

3. If lightningd dies between the hook and COMMIT (a refused hook call, a
   crash), the batch D was sent but never committed; the next start of
   lightningd is again at state D-1 and its first normal change carries D
   again (``cln-crash-restart.jsonl``: data_version 13 twice). The first one
   must be dropped and the second applied: applying both fails with a UNIQUE
   constraint error in that trace.
4. Every start of lightningd commits at least one normal change, so
   data_version rises on every restart. lightningd holds it as a signed 32-bit
   integer: it never exceeds ``2**31 - 1`` (:data:`MAX_DATA_VERSION`). It is
   never negative.

Classification (:func:`classify`)
---------------------------------

A change is :attr:`Kind.PRAGMA` iff every statement of it is a PRAGMA: after
leading whitespace and SQL comments (``-- ...`` to end of line, ``/* ... */``)
are skipped, it starts with the keyword ``PRAGMA`` (any case). Otherwise it
is :attr:`Kind.NORMAL` (a mixed change is normal: it runs in a transaction,
where SQLite ignores ``PRAGMA foreign_keys``). A blank or comment-only
statement is not a PRAGMA.

An **empty** change (no statements) is classified PRAGMA. lightningd never
sends one (it calls the hook only when there are changes), and PRAGMA is the
harmless reading: such a change bumps nothing, so it never replaces a record
and is accepted only at the data_version the backup already holds; anywhere
else it asks for a snapshot. Reading it as normal would let an empty call
with a repeated data_version drop a committed batch.

Decisions (:func:`decide`)
--------------------------

Given the tip and a change ``(D, kind)``, in this order:

=====================================================  ==========  ===========
situation                                              action      new link
=====================================================  ==========  ===========
D outside ``0 .. 2**31-1``, or not an int             (raises)    --
no tip (the backup holds nothing: first contact)       SNAPSHOT    --
PRAGMA, D == tip.D                                     APPEND      tip.hash
PRAGMA, D != tip.D                                     SNAPSHOT    --
normal, D == tip.D + 1                                 APPEND      tip.hash
normal, D == tip.D, tip is a snapshot anchor           SNAPSHOT    --
normal, D == tip.D, tip is a PRAGMA record             APPEND      tip.hash
normal, D == tip.D, tip is a normal record             REPLACE     tip.link
normal, D < tip.D or D > tip.D + 1                     SNAPSHOT    --
=====================================================  ==========  ===========

Why each row:

* **(raises)**: :class:`DataVersionError` (a :class:`~cldcb.errors.CldcbError`
  and a ``ValueError``); lightningd cannot send such a value.
* **APPEND**: the change follows the tip; the new record links to the tip.
* **REPLACE**: the tip is a normal batch that was never committed (fact 3).
  It is dropped; the new record links to the dropped record's predecessor,
  so the chain does not contain the dropped batch.
* **SNAPSHOT**: the stream lost something, or nothing is held. The only safe
  answer is a fresh snapshot of the database (the plugin takes one; the
  replayer cannot, and raises).
* PRAGMA with D == tip.D: fact 2, the PRAGMA repeats the data_version of the
  state the backup holds (after a normal record, that record was committed,
  since lightningd issues the PRAGMA after COMMIT). Nothing is replaced
  (traces/README.md rule 5). This holds on a snapshot anchor too: the anchor
  holds state D.
* PRAGMA with D == tip.D + 1 (decided from the traces): every PRAGMA call in
  the three traces repeats the data_version of the batch committed just
  before it, never the next one, and the Core Lightning source reports a
  PRAGMA outside a transaction without bumping the counter. So a PRAGMA
  carrying tip.D + 1 says state tip.D + 1 was committed and the backup never
  saw the batch that made it: a gap, hence SNAPSHOT. Any other D is a gap or
  a step backwards: SNAPSHOT.
* PRAGMA with D == tip.D - 1 after a normal record: this is what lightningd
  would send if the tip was an uncommitted batch and the next start began
  with a PRAGMA-only call (a crash followed by an upgrade whose first pending
  migration rebuilds a table). It is treated as going backwards (rule 6):
  SNAPSHOT, which is always safe. v26.06 starts by committing a normal
  change, so this is not expected.
* normal with D == tip.D after a PRAGMA record: traces/README.md rule 5 says a
  repeated data_version after a PRAGMA-only call replaces nothing and is
  applied in order, so it is APPENDed (linking to the PRAGMA record). The
  Core Lightning v26.06 source cannot produce it (its optimistic-lock UPDATE
  would match no row and lightningd would stop before calling the hook); if
  it ever arrives, the replayed batch leaves ``vars.data_version`` at D.
* normal with D == tip.D on a snapshot anchor: the snapshot is a committed
  state D; a batch that claims to produce D cannot replace anything inside a
  snapshot. SNAPSHOT.
* An empty database is the state 0: a replayer starting from an empty file
  starts from an anchor tip at data_version 0 (:func:`snapshot_tip`), so the
  stream's first change (normal, D=1) is APPENDed.

Walking the chain (:func:`advance`)
-----------------------------------

After an APPEND or REPLACE with the new record's hash ``h``, the new tip is
``Tip(D, kind, h, link=decision.link)``: for APPEND the link is the old tip's
hash, for REPLACE the dropped tip's link. Two replacements in a row (the same
batch refused twice) both link to the original predecessor. :func:`advance`
refuses a SNAPSHOT decision: after a snapshot the new tip is the snapshot's
anchor (:func:`snapshot_tip`).

Replay planning (:func:`plan`)
------------------------------

:func:`plan` takes the ``(data_version, kind)`` of a stream of records after
a base (a snapshot at data_version S, or an empty database, S = 0) and
returns the positions of the *effective* records: the stream minus every
batch that a later record replaced. It uses :func:`decide` and
:func:`advance` with stand-in hashes derived from positions (hashes only
name records here; the real chain is checked by ``seal``) and walks the
links back from the final tip. A SNAPSHOT decision inside the stream raises
:class:`~cldcb.errors.ReplayError` naming the record. The newest record is
always effective: nothing tells whether lightningd committed it, and it was
acknowledged before lightningd could act on it.

Limits
------

data_version alone cannot tell an uncommitted batch D from a different batch
D that lightningd committed while no ``db_write`` plugin was registered (a
non-important plugin that died, then a restart): the next hooked change D+1
looks like an APPEND. The plugin must be an ``important-plugin`` so that
lightningd never commits unseen; ``status`` shows such windows.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cldcb.errors import DataVersionError, ReplayError

#: lightningd reads data_version as a signed 32-bit integer.
MAX_DATA_VERSION = 2**31 - 1
HASH_LEN = 32


class Kind(enum.IntEnum):
    """What a change does to the database."""

    NORMAL = 0
    """One transaction; its last statement bumps ``vars.data_version``."""
    PRAGMA = 1
    """PRAGMA-only change, applied outside any transaction; bumps nothing."""


class Action(enum.Enum):
    """What to do with a change, relative to the tip."""

    APPEND = "append"
    """Append after the tip; the new record links to ``tip.hash``."""
    REPLACE = "replace"
    """The tip is an uncommitted batch: drop it; the new record links to ``tip.link``."""
    SNAPSHOT = "snapshot"
    """The stream lost something (or nothing is held): only a fresh snapshot is safe."""


@dataclass(frozen=True)
class Tip:
    """The newest thing the backup holds.

    ``hash`` is the SHA256 of the newest record's sealed bytes, or a snapshot's
    anchor; ``link`` is the hash of that record's effective predecessor (for a
    snapshot anchor it is not used by the rules and is :data:`NO_LINK`, as a
    ``Status`` reports it: make such a tip with :func:`snapshot_tip`).
    ``is_snapshot`` is true when the tip is a snapshot's anchor with no record
    after it yet.
    """

    data_version: int
    kind: Kind
    hash: bytes
    link: bytes
    is_snapshot: bool = False

    def __post_init__(self) -> None:
        check_data_version(self.data_version)
        if not isinstance(self.kind, Kind):
            raise TypeError(f"Tip.kind must be a Kind, not {type(self.kind).__name__}")
        if not isinstance(self.hash, bytes) or len(self.hash) != HASH_LEN:
            raise ValueError(f"Tip.hash must be {HASH_LEN} bytes")
        if not isinstance(self.link, bytes) or len(self.link) != HASH_LEN:
            raise ValueError(f"Tip.link must be {HASH_LEN} bytes")


@dataclass(frozen=True)
class Decision:
    """The answer of :func:`decide`.

    ``link`` is what the new record's link must be (None for SNAPSHOT);
    ``reason`` is meant for people (logs, error messages).
    """

    action: Action
    link: bytes | None
    reason: str


DecideFn = Callable[[Tip | None, int, Kind], Decision]


def check_data_version(data_version: int) -> int:
    """Return ``data_version`` if lightningd can send it, else raise DataVersionError."""
    if type(data_version) is int and 0 <= data_version <= MAX_DATA_VERSION:
        return data_version             # the usual case, in one test (called per record)
    if isinstance(data_version, bool) or not isinstance(data_version, int):
        raise DataVersionError(
            f"data_version must be an integer, got {type(data_version).__name__}; "
            "the change is malformed and cannot be backed up"
        )
    if not 0 <= data_version <= MAX_DATA_VERSION:
        raise DataVersionError(
            f"data_version {data_version} is outside 0..{MAX_DATA_VERSION} "
            "(lightningd holds it as a signed 32-bit integer); "
            "the change is malformed and cannot be backed up"
        )
    return data_version


def _skip_space_and_comments(sql: str) -> str:
    """Return ``sql`` without its leading whitespace and SQL comments."""
    rest = sql
    while True:
        rest = rest.lstrip()
        if rest.startswith("--"):
            newline = rest.find("\n")
            rest = "" if newline < 0 else rest[newline + 1:]
        elif rest.startswith("/*"):
            end = rest.find("*/", 2)
            rest = "" if end < 0 else rest[end + 2:]
        else:
            return rest


def is_pragma(statement: str) -> bool:
    """True if ``statement`` is a PRAGMA (leading whitespace/comments skipped)."""
    first = statement[:1]
    if first and not first.isspace() and first not in "-/" and first.upper()[:1] != "P":
        return False        # the usual case (INSERT, UPDATE…): nothing to skip, not a P
    rest = _skip_space_and_comments(statement)
    if rest[:6].upper() != "PRAGMA":
        return False
    following = rest[6:7]
    return not (following.isalnum() or following in ("_", "$"))


def classify(writes: Sequence[str]) -> Kind:
    """PRAGMA iff every statement is a PRAGMA (an empty change is PRAGMA, see above)."""
    return Kind.PRAGMA if all(is_pragma(w) for w in writes) else Kind.NORMAL


NO_LINK = bytes(HASH_LEN)
"""The link of a snapshot anchor's tip: 32 zero bytes, which no record's link is (a
``Status`` whose ``tip_link`` is this describes a snapshot's anchor)."""


def snapshot_tip(data_version: int, anchor: bytes) -> Tip:
    """The tip of a backup whose newest thing is a snapshot of state ``data_version``
    anchored at ``anchor`` (its link is :data:`NO_LINK`)."""
    return Tip(data_version, Kind.NORMAL, anchor, NO_LINK, is_snapshot=True)


def _snapshot(reason: str) -> Decision:
    return Decision(Action.SNAPSHOT, None, reason)


def decide(tip: Tip | None, data_version: int, kind: Kind) -> Decision:
    """Decide what to do with change ``(data_version, kind)`` given ``tip`` (see the table)."""
    check_data_version(data_version)
    if kind.__class__ is not Kind:
        kind = Kind(kind)
    if tip is None:
        return _snapshot(f"first contact: the backup holds nothing, call is {data_version}")
    held = tip.data_version
    what = "snapshot" if tip.is_snapshot else "backup"
    if kind is Kind.PRAGMA:
        if data_version == held:
            return Decision(Action.APPEND, tip.hash,
                            f"PRAGMA-only call at {data_version} applies to the state held")
        if data_version == held + 1:
            return _snapshot(f"gap: {what} holds {held}, PRAGMA-only call is at {data_version}, "
                             f"so batch {data_version} was committed unseen")
        if data_version > held:
            return _snapshot(f"gap: {what} holds {held}, PRAGMA-only call is {data_version}")
        return _snapshot(f"backwards: {what} holds {held}, PRAGMA-only call is {data_version}")
    if data_version == held + 1:
        return Decision(Action.APPEND, tip.hash,
                        f"next: {what} holds {held}, call is {data_version}")
    if data_version == held:
        if tip.is_snapshot:
            return _snapshot(f"repeat on a snapshot: snapshot holds committed state {held}, "
                             f"a batch producing {held} cannot replace inside it")
        if tip.kind is Kind.PRAGMA:
            return Decision(Action.APPEND, tip.hash,
                            f"repeat after a PRAGMA-only call at {held}: applied in order")
        return Decision(Action.REPLACE, tip.link,
                        f"repeat: batch {held} was never committed, the new one replaces it")
    if data_version > held:
        return _snapshot(f"gap: {what} holds {held}, call is {data_version}")
    return _snapshot(f"backwards: {what} holds {held}, call is {data_version}")


def next_link(tip: Tip | None, data_version: int, kind: Kind) -> bytes | None:
    """The link :func:`decide` gives the change it meets most, the next normal change
    after the tip (``APPEND`` onto the tip's hash), without building its Decision; None
    for any other change (then ask :func:`decide`). Runs for every change."""
    if (tip is not None and kind is Kind.NORMAL and type(data_version) is int
            and data_version == tip.data_version + 1 and data_version <= MAX_DATA_VERSION):
        return tip.hash
    return None


def advance(tip: Tip | None, data_version: int, kind: Kind, record_hash: bytes, *,
            decision: Decision | None = None) -> Tip:
    """The new tip after storing the change as a record whose hash is ``record_hash``.

    ``decision`` defaults to ``decide(tip, data_version, kind)``; pass the one
    already made to avoid deciding twice. A SNAPSHOT decision raises
    DataVersionError: after a snapshot the tip is :func:`snapshot_tip`.
    """
    if decision is None:
        decision = decide(tip, data_version, kind)
    if decision.action is Action.SNAPSHOT or decision.link is None:
        raise DataVersionError(
            f"cannot add data_version {data_version} to the chain ({decision.reason}); "
            "a fresh snapshot is needed first"
        )
    return Tip(data_version, Kind(kind), record_hash, decision.link)


#: Stand-in anchor of a replay's base (see :func:`stand_in_hash`).
STAND_IN_ANCHOR = bytes(HASH_LEN)


def stand_in_hash(position: int) -> bytes:
    """Stand-in hash of the record at ``position`` when only (data_version, kind) matter.

    Distinct for every position and never equal to :data:`STAND_IN_ANCHOR`.
    """
    return (position + 1).to_bytes(HASH_LEN, "big")


def plan(records: Iterable[tuple[int, Kind]], *, start: int = 0,
         decide_fn: DecideFn = decide) -> list[int]:
    """Positions of the effective records after a base at data_version ``start``.

    ``records`` are ``(data_version, kind)`` pairs in stream order; ``start`` is
    the base snapshot's data_version (0 for an empty database). Raises
    ReplayError naming the first record that needs a snapshot.
    """
    tip = snapshot_tip(start, STAND_IN_ANCHOR)
    links: dict[bytes, bytes] = {}
    for position, (data_version, kind) in enumerate(records):
        try:
            decision = decide_fn(tip, data_version, kind)
        except DataVersionError as err:
            raise ReplayError(f"record {position}: {err}") from err
        if decision.action is Action.SNAPSHOT or decision.link is None:
            raise ReplayError(
                f"record {position} (data_version {data_version}) cannot follow the records "
                f"before it: {decision.reason}; the backup lost changes here, so it can only "
                "be rebuilt from a snapshot taken after this point"
            )
        record_hash = stand_in_hash(position)
        tip = advance(tip, data_version, kind, record_hash, decision=decision)
        links[record_hash] = decision.link
    effective: list[int] = []
    cursor = tip.hash
    while cursor != STAND_IN_ANCHOR:
        effective.append(int.from_bytes(cursor, "big") - 1)
        cursor = links[cursor]
    effective.reverse()
    return effective
