"""Waiting, with progress, until ``quorum`` servers hold the plugin's first snapshot.

After ``plugin start`` on a running node, the plugin takes its first snapshot
at the next ``db_write`` call (DESIGN section 5). An idle node may not write
for minutes, so this asks lightningd for one harmless write: it stores and
then deletes the datastore entry ``cldcb/install`` (in a thread: the call
returns only once the plugin answered the hook, i.e. after the snapshot).

Meanwhile it polls every server's ``status`` through a read-only session
(which never takes over from the plugin's writing session), shows the
snapshot's upload progress from the plugin's status file, and checks that
lightningd still runs the plugin. It returns once ``quorum`` servers hold a
complete snapshot, and raises :class:`~cldcb.errors.PluginError` if the
plugin stopped or nothing arrived within the time allowed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cldcb import wire
from cldcb.client.nodeconfig import NodePaths
from cldcb.connection import Connection, ServerSpec
from cldcb.errors import CldcbError, PluginError
from cldcb.plugin.status import read_status_file
from cldcb.rpc import LightningRpc
from cldcb.session import Role

POLL_INTERVAL = 0.5
PLUGIN_CHECK_INTERVAL = 2.0
HEARTBEAT = 10.0
NUDGE_KEY = ["cldcb", "install"]
Echo = Callable[[str], None]


def _mib(n: int | float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def nudge(rpc: LightningRpc, timeout: float) -> threading.Thread:
    """Make lightningd write once (datastore entry stored, then deleted), in a thread."""
    def run() -> None:
        try:
            rpc.call("datastore", {"key": NUDGE_KEY, "string": f"{time.time():.0f}",
                                   "mode": "create-or-replace"}, timeout=timeout)
            rpc.call("deldatastore", {"key": NUDGE_KEY}, timeout=timeout)
        except CldcbError:
            pass  # an older lightningd, or it stopped: the wait reports what matters

    thread = threading.Thread(target=run, name="cldcb-nudge", daemon=True)
    thread.start()
    return thread


def _read_status(paths: NodePaths) -> dict[str, Any] | None:
    """The plugin's status file; None while it is missing or unreadable."""
    try:
        return read_status_file(paths.status_file)
    except (OSError, ValueError):
        return None


def _upload_progress(status: dict[str, Any] | None) -> str:
    """``snapshot: 3.0 of 12.0 MiB sent`` from the plugin's status file, or ''."""
    if not status:
        return ""
    parts = []
    for server in status.get("servers") or []:
        snap = server.get("snapshot") if isinstance(server, dict) else None
        if isinstance(snap, dict) and isinstance(snap.get("bytes_sent"), int):
            total = snap.get("bytes")
            of = f" of {_mib(total)}" if isinstance(total, int) and total else ""
            parts.append(f"{server.get('address')}: {_mib(snap['bytes_sent'])}{of} sent")
    return "snapshot upload: " + ", ".join(parts) if parts else ""


def _plugin_error(status: dict[str, Any] | None) -> str:
    if not status:
        return ""
    errors = [str(s.get("last_error")) for s in status.get("servers") or []
              if isinstance(s, dict) and s.get("last_error")]
    last = status.get("last_hook_result")
    if isinstance(last, str) and last != "continue":
        errors.insert(0, last)
    return "; ".join(errors)


class _Poller:
    """Read-only sessions to each server, reopened when they break."""

    def __init__(self, specs: Sequence[ServerSpec], client_priv: bytes) -> None:
        self.specs = list(specs)
        self._priv = client_priv
        self._conns: dict[int, Connection] = {}

    async def _status(self, i: int) -> wire.Status | CldcbError:
        try:
            conn = self._conns.get(i)
            if conn is None or conn.is_closed:
                conn = self._conns[i] = await Connection.open(
                    self.specs[i], self._priv, Role.READER, timeout=self.specs[i].timeout(10))
            return await asyncio.wait_for(conn.status(), self.specs[i].timeout(10))
        except CldcbError as exc:
            self._conns.pop(i, None)
            return exc
        except TimeoutError:
            self._conns.pop(i, None)
            return CldcbError("no answer to status within 10 s")

    async def poll(self) -> list[wire.Status | CldcbError]:
        return list(await asyncio.gather(*(self._status(i) for i in range(len(self.specs)))))

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()


async def _wait(specs: Sequence[ServerSpec], client_priv: bytes, quorum: int, wait: float,
                rpc: LightningRpc, paths: NodePaths, echo: Echo) -> None:
    poller = _Poller(specs, client_priv)
    start = time.monotonic()
    held: dict[int, int] = {}
    shown: dict[int, str] = {}
    last_progress, last_beat, last_check = "", start, start
    nudged: threading.Thread | None = None
    try:
        while True:
            results = await poller.poll()
            for i, res in enumerate(results):
                if isinstance(res, wire.Status) and res.snapshot_data_version >= 0:
                    state = f"holds the first snapshot (data_version {res.snapshot_data_version})"
                    held[i] = res.snapshot_data_version
                elif isinstance(res, wire.Status):
                    state = "no snapshot yet"
                else:
                    state = f"unreachable for now ({res})"
                if shown.get(i) != state:
                    echo(f"  {specs[i].address}: {state}")
                    shown[i] = state
            if len(held) >= quorum:
                echo(f"the backup is running: {len(held)} of {len(specs)} server(s) hold the "
                     f"first snapshot (quorum {quorum})")
                if nudged is not None:
                    nudged.join(5)
                return
            now = time.monotonic()
            if nudged is None:
                echo(f"waiting up to {wait:.0f} s for the first snapshot on {quorum} of "
                     f"{len(specs)} server(s); asking lightningd for one database write (the "
                     f"datastore entry {'/'.join(NUDGE_KEY)}, deleted at once) so that the "
                     "plugin takes it now")
                nudged = nudge(rpc, wait)
            status = _read_status(paths)
            progress = _upload_progress(status)
            if progress and progress != last_progress:
                echo(f"  {progress}")
                last_progress = progress
            if now - last_check >= PLUGIN_CHECK_INTERVAL:
                last_check = now
                if not await asyncio.to_thread(rpc.plugin_active, paths.wrapper):
                    why = _plugin_error(_read_status(paths))
                    raise PluginError("the plugin stopped before the first snapshot was held"
                                      + (f" ({why})" if why else "")
                                      + ": see lightningd's log and "
                                      f"{paths.status_file}, fix the cause, then run "
                                      "installplugin again")
            if now - start >= wait:
                raise PluginError(
                    f"after {wait:.0f} s only {len(held)} of the {quorum} server(s) needed "
                    "hold a first snapshot. The plugin is running and takes it at "
                    "lightningd's next database write; check with `cldcb-client status`")
            if now - last_beat >= HEARTBEAT:
                last_beat = now
                echo(f"  still waiting ({now - start:.0f} s)")
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        await poller.close()


def wait_first_snapshot(specs: Sequence[ServerSpec], client_priv: bytes, quorum: int,
                        wait: float, rpc: LightningRpc, paths: NodePaths, echo: Echo) -> None:
    """See the module docstring."""
    asyncio.run(_wait(specs, client_priv, quorum, wait, rpc, paths, echo))
