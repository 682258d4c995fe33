"""``cldcb-client recover``: rebuild a lost node's database from its ``hsm_secret`` alone.

DESIGN section 6. In order:

1. refuse at once if ``<lightning-dir>/<network>/lightningd.sqlite3`` (or a
   journal of it) exists: recovery never overwrites a database;
2. the node key: ``--hsm-secret`` (default ``<lightning-dir>/<network>/hsm_secret``,
   any format; the passphrase from ``--passphrase-file`` or a hidden prompt on a
   terminal), or ``--alt-hsmd PROGRAM`` (an hsmd-like program, see
   :mod:`cldcb.alt_hsmd`);
3. on every server, list the recognition entries anonymously (the daemon: SSH
   user ``cldcb-recover``, no credentials; sshd: the operator's own SSH login
   to the ``cldcb`` account, with ``--ssh-key`` files or, by default, the
   operator's keys and agent as ``ssh`` uses them), and keep this node's;
4. with several entries (a reinstall made a new client), ask each server
   what each client holds (``status``), use the client whose backup reaches the
   highest data_version, and name the others;
5. fetch that client's backup from every server, verify and rebuild each into
   a scratch file beside the destination (:mod:`cldcb.restore`), keep the
   highest verified data_version, report the others as stale or failed; a
   server whose newest generation fails is asked for its older ones, newest
   first (:mod:`cldcb.client.fallback`), and one whose verified state stops
   short of what it claims is asked why;
6. if a server failed or could not be reached, it might hold a newer state:
   ask (``--yes`` answers) before using what the others hold; if a server holds
   a newer state that does not verify, refuse unless ``--accept-older`` is given,
   saying which data_version was reached, what is missing and why;
7. move the database into place (never replacing a file), write the wrapper
   (:mod:`cldcb.plugin.wrapper`) and the ``important-plugin=`` line of the
   node's config, so that the recovered node goes on backing up as the same
   client, and print the summary with the warning never to start an older
   state. A wrapper already there that holds another client (possibly the only
   copy of its key) is replaced only with ``--replace-wrapper`` or a yes on a
   terminal, and then kept as ``cldcb-plugin-wrapper.replaced-<time>``; without
   either, recovery stops before writing anything. With a single server, the
   summary also says that it cannot be told from one that withholds its
   newest records (a second, independent server is the defence).

``--list`` (with ``--json``) shows, per client of the node and per server, its
restorable states (:class:`cldcb.wire.RestorableState`) and writes nothing.

Host keys of ``ssh://`` servers: ``--host-key 'ssh-ed25519 AAAA…'``, one per
``ssh://`` server in the order they are given, or else the operator's
``~/.ssh/known_hosts`` (an Ed25519 key preferred). The same key is pinned for
every connection and recorded in the wrapper for the plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import click

from cldcb import restore, wire
from cldcb.alt_hsmd import AltHsmdNodeKey
from cldcb.cli_common import get_passphrase, local_node_key, stdin_is_terminal
from cldcb.client.fallback import (
    DANGER,
    Fallback,
    explain_short,
    list_server_states,
    rebuild_older,
    show_states,
)
from cldcb.client.nodeconfig import NodePaths, add_important_plugin
from cldcb.connection import Connection, ServerAddress, ServerSpec
from cldcb.errors import CldcbError, HsmSecretError, RecoveryError, UsageError
from cldcb.hsm_secret import needs_passphrase
from cldcb.ids import client_id_from_pubkey, parse_server_id
from cldcb.malloc import keep_freed_memory
from cldcb.nodekey import NodeKey, read_hsm_secret_file, with_path
from cldcb.plugin.wrapper import (
    ServerEntry,
    WrapperConfig,
    default_plugin_path,
    other_holder,
    write_wrapper,
)
from cldcb.recognition import Recognition, find_own
from cldcb.session import Role

DATABASE_NAME = "lightningd.sqlite3"
NEVER_OLDER = ("Never start lightningd on an older copy of this database: a node restored "
               "even one payment behind loses its channels to a unilateral close, and "
               "broadcasting a revoked state loses the funds.")
ONE_SERVER = ("note: with a single server, recovery cannot tell whether it withheld its "
              "newest records; back up to a second, independent server too (installplugin "
              "with one --server/--server-id pair per server), so that the next recovery can "
              "compare them")
_FILE = click.Path(path_type=Path, dir_okay=False)
F = TypeVar("F", bound=Callable[..., Any])


# --- what recover, verify and status share -------------------------------------------

def node_dir_options(func: F) -> F:
    """``--lightning-dir DIR`` and ``--network NET``."""
    func = click.option("--network", default="bitcoin", show_default=True,
                        help="The node's network; its files are in <lightning-dir>/<network>.")(
                            func)
    return click.option("--lightning-dir", required=True,
                        type=click.Path(path_type=Path, file_okay=False),
                        help="lightningd's --lightning-dir.")(func)


def node_key_options(func: F) -> F:
    """``--hsm-secret``, ``--passphrase-file``, ``--alt-hsmd``."""
    func = click.option("--alt-hsmd", type=click.Path(path_type=Path, dir_okay=False),
                        default=None, help="An hsmd-like program holding the node key (an "
                        "HSM), run in <lightning-dir>/<network>; instead of --hsm-secret.")(func)
    func = click.option("--passphrase-file", type=_FILE, default=None,
                        help="File holding the hsm_secret's passphrase (one trailing newline "
                        "is ignored). Without it, it is asked for on a terminal.")(func)
    return click.option("--hsm-secret", type=_FILE, default=None,
                        help="The node's hsm_secret (default: "
                        "<lightning-dir>/<network>/hsm_secret).")(func)


@contextlib.contextmanager
def open_node_key(lightning_dir: Path, network: str, hsm_secret: Path | None,
                  passphrase_file: Path | None, alt_hsmd: Path | None) -> Iterator[NodeKey]:
    """The node key from ``hsm_secret`` (asking for a passphrase if needed) or ``alt_hsmd``."""
    folder = lightning_dir / network
    if alt_hsmd is None:
        yield local_node_key(hsm_secret or folder / "hsm_secret", passphrase_file)
        return
    if hsm_secret is not None:
        raise UsageError("give either --hsm-secret or --alt-hsmd, not both (the hsmd-like "
                         "program reads the hsm_secret in <lightning-dir>/<network> itself)")
    secret = folder / "hsm_secret"
    needed = False
    if passphrase_file is None and secret.is_file():
        try:
            needed = needs_passphrase(read_hsm_secret_file(secret))
        except HsmSecretError as err:
            raise with_path(err, secret) from None
    passphrase = get_passphrase(passphrase_file, needed=needed, what=f"hsm_secret {secret}")
    with AltHsmdNodeKey(alt_hsmd, lightning_dir, network, passphrase) as key:
        yield key


def format_time(ms: int | float | None) -> str:
    if not ms:
        return "unknown time"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


class ProgressPrinter:
    """Download and replay progress on stderr: one updated line on a terminal, else a
    line every few seconds and at the end of each phase."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tty = _stderr_is_terminal()
        self._interval = 0.2 if self.tty else 3.0
        self._last = 0.0
        self._pending = ""
        self._phase = ""
        self.progress = restore.Progress(download=self._download, replay=self._replay)

    def _download(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        self._show("download", f"{self.name}: snapshot {pct:5.1f}% ({_mib(done)} of "
                   f"{_mib(total)} MiB)", final=done >= total)

    def _replay(self, records: int) -> None:
        self._show("replay", f"{self.name}: verified and replayed {records} records")

    def _show(self, phase: str, text: str, final: bool = False) -> None:
        if phase != self._phase:
            self._end_phase()
            self._phase = phase
            self._last = 0.0
        self._pending = text
        now = time.monotonic()
        if final or now - self._last >= self._interval:
            self._emit(now)

    def _emit(self, now: float) -> None:
        if self.tty:
            sys.stderr.write("\r" + self._pending + "\x1b[K")
            sys.stderr.flush()
        else:
            click.echo(self._pending, err=True)
        self._pending = ""
        self._last = now

    def _end_phase(self) -> None:
        if self._pending:
            self._emit(time.monotonic())
        if self._phase and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def done(self) -> None:
        self._end_phase()
        self._phase = ""


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def known_host_key(address: ServerAddress) -> str | None:
    """The host key ``~/.ssh/known_hosts`` holds for ``address`` (Ed25519 preferred)."""
    path = Path("~/.ssh/known_hosts").expanduser()
    if not path.is_file():
        return None
    try:
        known = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError, asyncssh.Error):
        return None
    keys = list(known.match(address.host, "", address.port)[0])
    if not keys:
        return None
    keys.sort(key=lambda k: k.get_algorithm() != "ssh-ed25519")
    return " ".join(keys[0].export_public_key("openssh").decode("ascii").split()[:2])


def server_specs(servers: Sequence[str], server_ids: Sequence[str],
                 host_keys: Sequence[str] = ()) -> list[ServerSpec]:
    """``--server``/``--server-id``/``--host-key`` as ServerSpecs (host keys for ssh://)."""
    if len(servers) != len(server_ids):
        raise UsageError(f"{len(servers)} --server but {len(server_ids)} --server-id: give "
                         "one --server-id after each --server")
    addresses = [ServerAddress.parse(s) for s in servers]
    ssh = [a for a in addresses if a.scheme == "ssh"]
    if host_keys and len(host_keys) != len(ssh):
        raise UsageError(f"{len(host_keys)} --host-key for {len(ssh)} ssh:// servers: give "
                         "one per ssh:// server, in their order")
    given = iter(host_keys)
    specs, seen = [], set()
    for address, sid in zip(addresses, server_ids, strict=True):
        parse_server_id(sid)
        if sid.lower() in seen:
            raise UsageError(f"server id {sid[:14]}… is given twice")
        seen.add(sid.lower())
        key = None
        if address.scheme == "ssh":
            key = next(given, None) or known_host_key(address)
            if key is None:
                raise UsageError(
                    f"no host key is known for {address}: give --host-key 'ssh-ed25519 "
                    "AAAA…' (ask its operator for /etc/ssh/ssh_host_ed25519_key.pub) or "
                    "put it in ~/.ssh/known_hosts (ssh once to it)")
            try:
                asyncssh.import_public_key(key)
            except (ValueError, asyncssh.KeyImportError):
                raise UsageError(f"--host-key for {address} is not an SSH public key "
                                 "('TYPE BASE64')") from None
            key = " ".join(key.split()[:2])
        specs.append(ServerSpec(address, sid.lower(), key))
    return specs


# --- recovery ----------------------------------------------------------------------------

# Imported here, after the helpers above: cldcb.client.cli imports the modules that
# register commands, and some of them import those helpers from this module.
from cldcb.client.cli import main  # noqa: E402


@dataclass
class ServerResult:
    spec: ServerSpec
    claimed: int | None = None        # newest data_version its status names for the client
    rebuilt: restore.Rebuilt | None = None
    error: str = ""
    fallback: Fallback | None = None     # rebuilt is an older generation: what it lacks


@dataclass
class Candidate:
    client_priv: bytes = field(repr=False)
    client_pub: bytes
    best_claim: int = -1
    best_server: str = ""

    @property
    def client_id(self) -> str:
        return client_id_from_pubkey(self.client_pub)


def _say(text: str = "") -> None:
    click.echo(text, err=True)


async def _find_candidates(specs: list[ServerSpec], node: NodeKey, operator_keys: list[str],
                           results: dict[str, ServerResult]) -> dict[bytes, Candidate]:
    """Anonymous listing on every server; this node's entries, by client key."""
    found: dict[bytes, Candidate] = {}
    for spec in specs:
        name = str(spec.address)
        count = 0
        own: list[tuple[Recognition, bytes]] = []
        try:
            conn = await Connection.open(spec, None, Role.READER,
                                         operator_keys=operator_keys or None)
            try:
                async for entries in conn.recognition_pages():
                    count += len(entries)
                    own += find_own(entries, node)
            finally:
                await conn.close()
        except CldcbError as exc:
            results[name].error = f"cannot list its recognition entries: {exc}"
            _say(f"{name}: {results[name].error}")
            continue
        _say(f"{name}: {count} recognition entries, {len(own)} of this node")
        for entry, priv in own:
            found.setdefault(entry.client_pub, Candidate(priv, entry.client_pub))
    return found


async def _claims(specs: list[ServerSpec], cand: Candidate,
                  results: dict[str, ServerResult] | None) -> None:
    """Ask every server what it holds for ``cand`` (status); note the best."""
    for spec in specs:
        name = str(spec.address)
        try:
            async with await Connection.open(spec, cand.client_priv, Role.READER) as conn:
                st = await conn.status()
        except CldcbError as exc:
            if results is not None and not results[name].error:
                results[name].error = f"cannot ask it for client {cand.client_id[:14]}…: {exc}"
            continue
        if st.has_tip:
            claim = st.tip_data_version
        elif st.snapshot_data_version >= 0:
            claim = st.snapshot_data_version
        else:
            continue
        if results is not None:
            results[name].claimed = claim
        if claim > cand.best_claim:
            cand.best_claim, cand.best_server = claim, name


async def _fetch_all(specs: list[ServerSpec], node: NodeKey, cand: Candidate, dest: Path,
                     results: dict[str, ServerResult]) -> ServerResult | None:
    """Rebuild from every server in turn; keep only the best scratch file."""
    best: ServerResult | None = None
    try:
        for spec in specs:
            res = results[str(spec.address)]
            if res.claimed is None and res.error:
                continue
            res.error = ""
            await _fetch_one(spec, node, cand, dest, res)
            r = res.rebuilt
            if r is None:
                continue
            if best is None or best.rebuilt is None or r.data_version > best.rebuilt.data_version:
                if best is not None and best.rebuilt is not None:
                    restore.discard(best.rebuilt.path)
                best = res
            else:
                restore.discard(r.path)
    except BaseException:
        if best is not None and best.rebuilt is not None:
            restore.discard(best.rebuilt.path)
        raise
    return best


async def _fetch_one(spec: ServerSpec, node: NodeKey, cand: Candidate, dest: Path,
                     res: ServerResult) -> None:
    name = str(spec.address)
    scratch = restore.temp_path(dest, "recover")
    printer = ProgressPrinter(name)
    try:
        async with await Connection.open(spec, cand.client_priv, Role.READER) as conn:
            res.rebuilt = await restore.rebuild(conn, node, cand.client_pub, scratch,
                                                source=name, progress=printer.progress)
    except CldcbError as exc:
        printer.done()
        res.error = str(exc)
        _say(f"{name}: FAILED: {exc}")
        restore.discard(scratch)
        await _fall_back(spec, node, cand, dest, res, printer)
        return
    finally:
        if res.rebuilt is None:
            restore.discard(scratch)
    printer.done()
    r = res.rebuilt
    _say(f"{name}: verified: data_version {r.data_version} (snapshot at "
         f"{r.snapshot_data_version} + {r.records} records)")
    if res.claimed is not None and res.claimed > r.data_version:
        res.fallback = await explain_short(spec, cand.client_priv, r, res.claimed)
        _say(f"{name}: but it claims data_version {res.claimed}: {res.fallback.missing}")


async def _fall_back(spec: ServerSpec, node: NodeKey, cand: Candidate, dest: Path,
                     res: ServerResult, printer: ProgressPrinter) -> None:
    """The newest state of ``spec`` that verifies, after its newest failed (DESIGN §11)."""
    name = str(spec.address)
    try:
        fb = await rebuild_older(spec, node, cand.client_priv, cand.client_pub, dest,
                                 res.error, printer.progress)
    except CldcbError as exc:
        _say(f"{name}: cannot list its older states either: {exc}")
        return
    finally:
        printer.done()
    if fb is None:
        _say(f"{name}: no older state verifies either")
        return
    res.rebuilt, res.fallback, res.error = fb.rebuilt, fb, ""
    _say(f"{name}: verified an OLDER state: data_version {fb.rebuilt.data_version} "
         f"({fb.label}); {fb.missing}")


def _refuse_fallback(results: dict[str, ServerResult], best: ServerResult,
                     accept_older: bool) -> None:
    """A state older than one a server holds but could not deliver verified (its newest
    generation failed, or it stops short of what the server claims) is used only with
    ``--accept-older``."""
    r = best.rebuilt
    assert r is not None
    short = [res.fallback for res in results.values()
             if res.fallback is not None and res.fallback.newest > r.data_version]
    if not short:
        return
    newest = max(fb.newest for fb in short)
    used = f"{best.fallback.label} on " if best.fallback else ""
    text = (f"the newest state that verifies is data_version {r.data_version} ({used}"
            f"{best.spec.address}); data_version {r.data_version + 1} to {newest} is missing, "
            "because:\n  " + "\n  ".join(line for fb in short for line in fb.why)
            + f"\n{DANGER}")
    if accept_older:
        _say(f"warning: {text}\ngoing on because of --accept-older")
        return
    raise RecoveryError(f"{text}\nNothing was written. Start that node only if you accept "
                        "losing its channels (close them from the newer state first if you "
                        "can): then run recover again with --accept-older")


def _summary(specs: list[ServerSpec], results: dict[str, ServerResult],
             best: ServerResult) -> list[str]:
    assert best.rebuilt is not None
    top = best.rebuilt.data_version
    lines = []
    for spec in specs:
        res = results[str(spec.address)]
        head = f"  {spec.address} ({spec.server_id[:14]}…): "
        if res is best:
            r = best.rebuilt
            lines.append(head + f"USED: data_version {r.data_version}, newest record "
                         f"{format_time(r.newest_time_ms)}" + (
                             f" (OLDER: {res.fallback.label}, "
                             f"{res.fallback.missing})" if res.fallback else ""))
        elif res.rebuilt is not None:
            r = res.rebuilt
            state = "stale" if r.data_version < top else "same state"
            lines.append(head + f"{state}: data_version {r.data_version}, newest record "
                         f"{format_time(r.newest_time_ms)}")
        else:
            claim = f" (it claims data_version {res.claimed})" if res.claimed is not None else ""
            lines.append(head + f"FAILED{claim}: {res.error or 'nothing held'}")
    return lines


def _confirm_older(results: dict[str, ServerResult], top: int, yes: bool) -> None:
    doubtful = [n for n, r in results.items() if r.rebuilt is None
                and (r.claimed is None or r.claimed > top)]
    if not doubtful:
        return
    text = (f"{', '.join(doubtful)} could not be verified and may hold a state newer than "
            f"data_version {top}")
    if yes:
        _say(f"warning: {text}; going on because of --yes")
        return
    if not stdin_is_terminal():
        raise RecoveryError(f"{text}. Nothing was written. Fix that server and run again, "
                            "or give --yes to restore the newest verified state anyway")
    if not click.confirm(f"{text}. Restore data_version {top} anyway?", default=False,
                         err=True):
        raise RecoveryError("stopped; nothing was written")


def confirm_replace_wrapper(wrapper: Path, client_id: str, replace: bool) -> None:
    """Before writing anything: a wrapper that holds another client is replaced only with
    ``--replace-wrapper`` or a yes on a terminal (it is then kept aside)."""
    holder = other_holder(wrapper, client_id)
    if holder is None or replace:
        return
    text = (f"{wrapper} holds {holder}, not the recovered client {client_id}; it may be the "
            "only copy of that key")
    if not stdin_is_terminal():
        raise RecoveryError(f"{text}. Nothing was written. Give --replace-wrapper to keep it "
                            f"as {wrapper.name}.replaced-<time> and write the new one, or move "
                            "it away first")
    if not click.confirm(f"{text}. Keep it as {wrapper.name}.replaced-<time> and write the "
                         "new one?", default=False, err=True):
        raise RecoveryError("stopped; nothing was written")


def _wrapper_config(specs: list[ServerSpec], cand: Candidate, node_id: str,
                    plugin_path: str) -> WrapperConfig:
    return WrapperConfig(
        client_id=cand.client_id, client_priv=cand.client_priv, node_id=node_id,
        servers=tuple(ServerEntry(str(s.address), s.server_id, s.host_key) for s in specs),
        database=DATABASE_NAME, plugin_path=plugin_path).validate()


async def _node_clients(specs: list[ServerSpec], node: NodeKey, operator_keys: list[str]
                        ) -> tuple[dict[str, ServerResult], dict[bytes, Candidate]]:
    """Step 3: this node's clients on the servers; RecoveryError when there are none."""
    listing = {str(s.address): ServerResult(s) for s in specs}
    found = await _find_candidates(specs, node, operator_keys, listing)
    if not found:
        raise RecoveryError(_nothing_found(node.node_id, listing))
    return listing, found


def _nothing_found(node_id: str, listing: dict[str, ServerResult]) -> str:
    """Why no backup of the node was found: the servers that answered without one (then
    the node key may be the wrong one), and each failure with its own advice."""
    problems = "; ".join(f"{n}: {r.error}" for n, r in listing.items() if r.error)
    answered = [n for n, r in listing.items() if not r.error]
    if not answered:
        return (f"could not list the backups of node {node_id} on any server ({problems}). "
                "Nothing was written")
    return (f"no server holds a backup of node {node_id}: {', '.join(answered)} answered but "
            f"holds no backup of node {node_id}: check that this is the node's hsm_secret "
            "(and passphrase) and that these are its servers"
            + (f". Not asked: {problems}" if problems else ""))


async def list_node_states(specs: list[ServerSpec], node: NodeKey, operator_keys: list[str]
                           ) -> dict[str, dict[str, list[wire.RestorableState] | str]]:
    """``recover --list``: per client of this node, per server, its restorable states."""
    _, found = await _node_clients(specs, node, operator_keys)
    return {c.client_id: await list_server_states(specs, c.client_priv)
            for c in found.values()}


async def recover_node(specs: list[ServerSpec], node: NodeKey, dest: Path,
                       operator_keys: list[str], yes: bool,
                       accept_older: bool = False) -> tuple[Candidate, ServerResult, list[str]]:
    """Steps 3 to 6; returns the client used, the server used and the summary lines.

    Clients are tried in the order of what the servers claim to hold for them
    (``status``), newest first, until the best verified data_version is at
    least the next client's claim: a server cannot make an old client win by
    claiming more than it can deliver.
    """
    listing, found = await _node_clients(specs, node, operator_keys)
    cands = list(found.values())
    tried: dict[bytes, dict[str, ServerResult]] = {}
    for cand in cands:
        tried[cand.client_pub] = {n: ServerResult(r.spec, error=r.error)
                                  for n, r in listing.items()}
        await _claims(specs, cand, tried[cand.client_pub])
    cands.sort(key=lambda c: c.best_claim, reverse=True)
    chosen: tuple[Candidate, ServerResult] | None = None
    try:
        for cand in cands:
            if chosen is not None and chosen[1].rebuilt is not None and \
                    chosen[1].rebuilt.data_version >= cand.best_claim:
                break
            if len(cands) > 1:
                _say(f"client {cand.client_id}: servers claim data_version "
                     f"{cand.best_claim if cand.best_claim >= 0 else 'none'}")
            best = await _fetch_all(specs, node, cand, dest, tried[cand.client_pub])
            if best is None or best.rebuilt is None:
                continue
            if chosen is None or chosen[1].rebuilt is None or \
                    best.rebuilt.data_version > chosen[1].rebuilt.data_version:
                if chosen is not None and chosen[1].rebuilt is not None:
                    restore.discard(chosen[1].rebuilt.path)
                chosen = (cand, best)
            else:
                restore.discard(best.rebuilt.path)
        if chosen is None or chosen[1].rebuilt is None:
            results = tried[cands[0].client_pub]
            problems = "; ".join(f"{n}: {r.error or 'nothing held'}" for n, r in results.items())
            raise RecoveryError(f"no server gave a backup that verifies ({problems}). Nothing "
                                "was written")
        cand, best = chosen
        assert best.rebuilt is not None
        for other in cands:
            if other is not cand:
                where = (f"data_version {other.best_claim} on {other.best_server}"
                         if other.best_claim >= 0 else "nothing fetchable")
                _say(f"also found client {other.client_id} ({where}); not used: the backup "
                     f"of {cand.client_id} reaches data_version {best.rebuilt.data_version}")
        _say(f"using client {cand.client_id}")
        _confirm_older(tried[cand.client_pub], best.rebuilt.data_version, yes)
        _refuse_fallback(tried[cand.client_pub], best, accept_older)
    except BaseException:
        if chosen is not None and chosen[1].rebuilt is not None:
            restore.discard(chosen[1].rebuilt.path)
        raise
    return cand, best, _summary(specs, tried[cand.client_pub], best)


@main.command()
@node_dir_options
@click.option("--server", "servers", multiple=True, required=True, metavar="ADDR",
              help="A server: HOST:PORT (cldcb-server serve) or ssh://[USER@]HOST[:PORT] "
                   "(OpenSSH). Repeat for several, each with its --server-id.")
@click.option("--server-id", "server_ids", multiple=True, required=True, metavar="ID",
              help="The server id (52…/53…) of each --server, in the same order.")
@click.option("--host-key", "host_keys", multiple=True, metavar="'TYPE BASE64'",
              help="The sshd host key of each ssh:// server, in their order (default: "
                   "from your ~/.ssh/known_hosts).")
@click.option("--ssh-key", "ssh_keys", multiple=True,
              type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Your SSH private key for listing this node's entries on ssh:// servers "
                   "(default: your keys and agent, as ssh uses them).")
@node_key_options
@click.option("--yes", is_flag=True, help="Answer yes to confirmations.")
@click.option("--accept-older", is_flag=True,
              help="Restore an older state when the newest cannot be verified (the node then "
                   "loses its channels if they changed since): never done without it.")
@click.option("--list", "list_only", is_flag=True,
              help="Show each server's restorable states (generation, data_version range, "
                   "times) and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --list: print JSON.")
@click.option("--replace-wrapper", is_flag=True,
              help="Replace a cldcb-plugin-wrapper that holds another client; the old one is "
                   "kept as cldcb-plugin-wrapper.replaced-<time>.")
def recover(lightning_dir: Path, network: str, servers: tuple[str, ...],
            server_ids: tuple[str, ...], host_keys: tuple[str, ...], ssh_keys: tuple[Path, ...],
            hsm_secret: Path | None, passphrase_file: Path | None, alt_hsmd: Path | None,
            yes: bool, accept_older: bool, list_only: bool, as_json: bool,
            replace_wrapper: bool) -> None:
    """Rebuild the node's database from the servers, with its hsm_secret alone.

    Writes <lightning-dir>/<network>/lightningd.sqlite3 (never over an existing
    one), the cldcb-plugin-wrapper and its important-plugin line, so that the
    node goes on backing up as the same client.
    """
    paths = NodePaths(lightning_dir, network)
    folder = paths.network_dir
    dest = folder / DATABASE_NAME
    if list_only:
        specs = server_specs(servers, server_ids, host_keys)
        with open_node_key(lightning_dir, network, hsm_secret, passphrase_file,
                           alt_hsmd) as node:
            show_states(asyncio.run(list_node_states(specs, node, [str(k) for k in ssh_keys])),
                        as_json)
        return
    if as_json:
        raise UsageError("--json goes with --list only")
    restore.refuse_existing(dest)
    if not folder.is_dir():
        raise RecoveryError(f"{folder} does not exist: create it and put the node's "
                            "hsm_secret in it (or give --hsm-secret)")
    specs = server_specs(servers, server_ids, host_keys)
    plugin_path = default_plugin_path()
    keep_freed_memory()                 # megabyte chunks, fetched and opened one by one
    for stale in restore.remove_stale_scratch(dest):
        _say(f"removed {stale.name}, left by an interrupted recovery")
    with open_node_key(lightning_dir, network, hsm_secret, passphrase_file, alt_hsmd) as node:
        node_id = node.node_id
        _say(f"node {node_id}")
        cand, best, lines = asyncio.run(recover_node(
            specs, node, dest, [str(k) for k in ssh_keys], yes, accept_older))
    rebuilt = best.rebuilt
    assert rebuilt is not None
    try:
        cfg = _wrapper_config(specs, cand, node_id, plugin_path)
        confirm_replace_wrapper(paths.wrapper, cand.client_id, replace_wrapper)
        restore.install(rebuilt.path, dest)
    finally:
        restore.discard(rebuilt.path)
    kept = write_wrapper(paths.wrapper, cfg)
    added = add_important_plugin(paths, paths.wrapper)
    r = rebuilt
    click.echo(f"Recovered {dest}")
    click.echo(f"  node {node_id}, client {cand.client_id}")
    click.echo(f"  data_version {r.data_version}, newest record of "
               f"{format_time(r.newest_time_ms)} (snapshot at data_version "
               f"{r.snapshot_data_version} of {format_time(r.snapshot_time_ms)}, then "
               f"{r.records} records)")
    click.echo("  servers:")
    for line in lines:
        click.echo(line)
    click.echo(f"  wrote {paths.wrapper}: backups go on as the same client")
    if kept is not None:
        click.echo(f"  kept the wrapper it replaced (another client's key) as {kept}")
    click.echo(f"  {'added' if added else 'kept'} important-plugin={paths.wrapper} in "
               f"{paths.config}")
    if len(specs) == 1:
        click.echo(ONE_SERVER)
    click.echo("")
    click.echo(f"WARNING: {NEVER_OLDER}")
