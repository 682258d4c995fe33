"""Recovery falls back instead of failing (DESIGN §11).

When a server's newest generation cannot be verified (a damaged snapshot, a
record that does not open or does not follow), :func:`rebuild_older` asks
that server for its restorable states (``ListStates``) and rebuilds each
older generation not marked damaged, newest first, until one verifies. It
says what is missing: from which data_version on, up to the newest state the
server lists, and why (the error of each newer generation, or the server's
note on it). ``cldcb-client recover`` uses such an older state only with
``--accept-older``: a node started behind its real state loses its channels.

:func:`list_server_states` is ``recover --list``: per server, the states it
could restore; it writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import click

from cldcb.core import wire
from cldcb.core.seal import EcdhKey
from cldcb.core.session import Role
from cldcb.errors import CldcbError
from cldcb.node import restore
from cldcb.transport.connection import Connection, ServerSpec

DANGER = ("A node started on an older state than the one its peers know loses its channels: "
          "its peers close them with the newer state, and any update it broadcasts from the "
          "older one is revoked and loses the funds in it.")


def _when(ms: int) -> str:
    from cldcb.client.recover import format_time  # (recover imports this module)
    return format_time(ms)


def describe(s: wire.RestorableState) -> str:
    """One line: the generation, its snapshot, the data_version range of its records."""
    snap = (f"snapshot at data_version {s.snapshot_data_version} of {_when(s.snapshot_time)}"
            if s.snapshot_data_version >= 0 else "snapshot unreadable")
    recs = (f"records {s.first_data_version}..{s.last_data_version} ({s.record_count}, newest "
            f"of {_when(s.newest_time)})" if s.record_count else "no records")
    head = f"generation {s.generation}: {snap}, {recs}"
    if s.damaged:
        return f"{head}; DAMAGED, not restorable: {s.note}"
    return f"{head}; restores data_version {s.data_version}" + (f" ({s.note})" if s.note
                                                                 else "")


def as_json(s: wire.RestorableState) -> dict[str, object]:
    return {"generation": s.generation, "damaged": s.damaged,
            "snapshot_data_version": s.snapshot_data_version,
            "snapshot_time_ms": s.snapshot_time,
            "first_record_data_version": s.first_data_version,
            "last_record_data_version": s.last_data_version,
            "record_count": s.record_count, "newest_record_time_ms": s.newest_time,
            "restores_data_version": None if s.damaged else s.data_version, "note": s.note}


@dataclass
class Fallback:
    """An older state rebuilt after the newest failed, and what it lacks."""

    rebuilt: restore.Rebuilt
    generation: int
    newest: int
    """The newest data_version the server lists (the state it would restore if intact)."""
    why: list[str] = field(default_factory=list)
    """Why each newer state is not used (one line each)."""

    @property
    def label(self) -> str:
        return f"generation {self.generation}" if self.generation >= 0 else "a generation"

    @property
    def missing(self) -> str:
        return (f"data_version {self.rebuilt.data_version + 1} to {self.newest} is missing"
                if self.newest > self.rebuilt.data_version else "nothing newer is listed")


async def list_states(spec: ServerSpec, client_priv: bytes) -> list[wire.RestorableState]:
    async with await Connection.open(spec, client_priv, Role.READER) as conn:
        return await conn.list_states()


async def rebuild_older(spec: ServerSpec, node: EcdhKey, client_priv: bytes,
                        client_pub: bytes, dest: Path, first_error: str,
                        progress: restore.Progress | None = None) -> Fallback | None:
    """The newest state of ``spec`` that verifies, older than its failed newest one (None:
    none does, or the server cannot list its states: then ``first_error`` stands)."""
    name = str(spec.address)
    states = await list_states(spec, client_priv)
    newest = max((s.data_version for s in states), default=-1)
    why = [f"{name}: the newest state failed: {first_error}"]
    for s in sorted(states, key=lambda s: s.generation, reverse=True):
        if s.damaged:
            why.append(f"{name}: {describe(s)}")
            continue
        scratch = restore.temp_path(dest, "recover")
        try:
            async with await Connection.open(spec, client_priv, Role.READER) as conn:
                rebuilt = await restore.rebuild(conn, node, client_pub, scratch,
                                                generation=s.generation, source=name,
                                                progress=progress)
        except CldcbError as exc:
            restore.discard(scratch)
            why.append(f"{name}: generation {s.generation} failed: {exc}")
            continue
        return Fallback(rebuilt, s.generation, max(newest, rebuilt.data_version), why)
    return None


async def explain_short(spec: ServerSpec, client_priv: bytes, rebuilt: restore.Rebuilt,
                        claimed: int) -> Fallback:
    """A rebuild that verified but stops short of what the server says it holds
    (``claimed``): which generation it was and why the newer states are not in it."""
    name = str(spec.address)
    try:
        states = await list_states(spec, client_priv)
    except CldcbError as exc:
        return Fallback(rebuilt, -1, claimed, [f"{name}: it claims data_version {claimed} "
                                               f"but cannot list its states: {exc}"])
    used = [s for s in states if not s.damaged and s.data_version == rebuilt.data_version
            and s.snapshot_data_version == rebuilt.snapshot_data_version]
    newer = [s for s in states if s.data_version > rebuilt.data_version or s.damaged]
    why = [f"{name}: it claims data_version {claimed}"]
    why += [f"{name}: {describe(s)}" for s in newer if s not in used]
    return Fallback(rebuilt, used[-1].generation if used else -1,
                    max([claimed] + [s.data_version for s in states]), why)


async def list_server_states(specs: list[ServerSpec],
                             client_priv: bytes) -> dict[str, list[wire.RestorableState] | str]:
    """``recover --list``: per server, its states of the client, or why it cannot say."""
    out: dict[str, list[wire.RestorableState] | str] = {}
    for spec in specs:
        try:
            out[str(spec.address)] = await list_states(spec, client_priv)
        except CldcbError as exc:
            out[str(spec.address)] = str(exc)
    return out


def show_states(found: dict[str, dict[str, list[wire.RestorableState] | str]],
                as_json_out: bool) -> None:
    """Print ``recover --list``: per client, per server, its states (newest first)."""
    if as_json_out:
        click.echo(json.dumps({cid: {srv: {"error": v} if isinstance(v, str) else
                                     [as_json(s) for s in reversed(v)]
                                     for srv, v in servers.items()}
                               for cid, servers in found.items()}, indent=2))
        return
    for cid, servers in found.items():
        click.echo(f"client {cid}")
        for srv, states in servers.items():
            if isinstance(states, str):
                click.echo(f"  {srv}: cannot list: {states}")
                continue
            click.echo(f"  {srv}: {len(states)} states" + ("" if states else
                                                           " (holds no snapshot)"))
            for s in reversed(states):
                click.echo(f"    {describe(s)}")
