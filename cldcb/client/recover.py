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
   a scratch file beside the destination (:mod:`cldcb.restore`), choose by
   :mod:`cldcb.client.tips` (tips compared by hash: a tip that another server's
   chain replaced is never used; then the highest verified data_version; two
   different tips there, neither replacing the other, are refused), report the
   others as replaced, stale or failed; a
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
   newest records (a second, independent server is the defence), and whenever
   one server alone holds the newest record (a normal batch), that it may be a
   batch lightningd never committed.

``--list`` (with ``--json``) shows, per client of the node and per server, its
restorable states (:class:`cldcb.wire.RestorableState`) and writes nothing.
Without ``--list``, ``--json`` prints the summary as one JSON object on stdout
(what was recovered, each server's outcome, the warning); notes, questions and
progress stay on stderr, and an error too is one JSON object.

Host keys of ``ssh://`` servers: ``--host-key 'ssh-ed25519 AAAA…'``, one per
``ssh://`` server in the order they are given, or else the operator's
``~/.ssh/known_hosts`` (an Ed25519 key preferred). The same key is pinned for
every connection and recorded in the wrapper for the plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import click

from cldcb import restore, wire
from cldcb.alt_hsmd import AltHsmdNodeKey
from cldcb.cli_common import (
    ask,
    echo_json,
    get_passphrase,
    json_option,
    local_node_key,
    stdin_is_terminal,
)
from cldcb.client.fallback import (
    DANGER,
    Fallback,
    explain_short,
    list_server_states,
    rebuild_older,
    show_states,
)
from cldcb.client.nodeconfig import NodePaths, add_important_plugin
from cldcb.client.nodedir import node_dir_options
from cldcb.client.progress import ProgressPrinter
from cldcb.client.tips import compare, tip_hash, unconfirmed
from cldcb.connection import Connection, ServerAddress, ServerSpec
from cldcb.errors import CldcbError, ExitCode, HsmSecretError, RecoveryError, UsageError
from cldcb.hsm_secret import needs_passphrase
from cldcb.ids import client_id_from_pubkey, parse_server_id
from cldcb.malloc import keep_freed_memory
from cldcb.nodekey import NodeKey, read_hsm_secret_file, with_path
from cldcb.plugin.wrapper import (
    ServerEntry,
    WrapperConfig,
    default_outage_limit,
    default_plugin_path,
    other_holder,
    write_wrapper,
)
from cldcb.proxy import Proxy, parse_optional
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

def asked_servers(servers: tuple[str, ...], server_ids: tuple[str, ...]
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``servers`` and ``server_ids``; when neither was given, one of each asked for on a
    terminal (else a UsageError naming ``--server``)."""
    if servers or server_ids:
        return servers, server_ids
    return ((ask(None, "--server", "Server address (HOST:PORT or ssh://USER@HOST)"),),
            (ask(None, "--server-id", "Its server id (52…/53…)"),))


def node_key_options(func: F) -> F:
    """``--hsm-secret``, ``--passphrase-file``, ``--alt-hsmd``."""
    func = click.option("--alt-hsmd", type=click.Path(path_type=Path, dir_okay=False),
                        default=None, help="An hsmd-like program holding the node key (an "
                        "HSM), run in <lightning-dir>/<network>; instead of --hsm-secret.")(func)
    func = passphrase_file_option(func)
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


def known_hosts_path() -> Path:
    """``~/.ssh/known_hosts``, expanded (the file messages name)."""
    return Path("~/.ssh/known_hosts").expanduser()


def known_host_key(address: ServerAddress) -> str | None:
    """The host key ``~/.ssh/known_hosts`` holds for ``address`` (Ed25519 preferred)."""
    path = known_hosts_path()
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


def proxy_option(func: F) -> F:
    """``--proxy``: the SOCKS5 proxy (Tor) of the servers, once for all or once each."""
    return click.option(
        "--proxy", "proxies", multiple=True, metavar="socks5://HOST:PORT",
        help="Reach the servers through this SOCKS5 proxy (Tor: socks5://127.0.0.1:9050, the "
             "default for .onion addresses). Once for all servers, or once per --server in "
             "their order ('direct' for none).")(func)


def server_options(func: F) -> F:
    """``--server ADDR --server-id ID`` (repeated, in pairs) and ``--host-key``."""
    func = click.option(
        "--host-key", "host_keys", multiple=True, metavar="'TYPE BASE64'",
        help="The sshd host key of each ssh:// server, in their order (default: from your "
             "~/.ssh/known_hosts).")(func)
    func = click.option(
        "--server-id", "server_ids", multiple=True, metavar="ID",
        help="The server id (52…/53…) of each --server, in the same order.")(func)
    return click.option(
        "--server", "servers", multiple=True, metavar="ADDR",
        help="A server: HOST:PORT (cldcb-server serve) or ssh://[USER@]HOST[:PORT] (OpenSSH "
             "sshd). Repeat for several, each with its --server-id (asked for on a terminal "
             "when not given).")(func)


def route_override_option(func: F) -> F:
    """``--proxy`` of a command that reads the servers (and their routes) from the wrapper."""
    return click.option(
        "--proxy", default=None, metavar="socks5://HOST:PORT",
        help="Reach every server through this SOCKS5 proxy [default: the route the "
             "wrapper records for each].")(func)


def server_proxies(proxies: Sequence[str], count: int) -> list[Proxy | None]:
    """``--proxy`` given once (for all), once per server, or not at all."""
    if not proxies:
        return [None] * count
    if len(proxies) == 1:
        return [parse_optional(proxies[0])] * count
    if len(proxies) != count:
        raise UsageError(f"{len(proxies)} --proxy for {count} servers: give one for all, or "
                         "one per --server in their order ('direct' for none)")
    return [parse_optional(p) for p in proxies]


def _fingerprint(key: str) -> str:
    """``SHA256:…`` of an SSH public key given as ``TYPE BASE64`` ("?" if unreadable)."""
    try:
        return asyncssh.import_public_key(key).get_fingerprint("sha256")
    except (ValueError, asyncssh.KeyImportError):
        return "(unreadable key)"


def server_specs(servers: Sequence[str], server_ids: Sequence[str],
                 host_keys: Sequence[str] = (), proxies: Sequence[str] = ()) -> list[ServerSpec]:
    """``--server``/``--server-id``/``--host-key``/``--proxy`` as ServerSpecs (host keys
    for ssh://)."""
    if len(servers) != len(server_ids):
        raise UsageError(f"{len(servers)} --server but {len(server_ids)} --server-id: give "
                         "one --server-id after each --server")
    addresses = [ServerAddress.parse(s) for s in servers]
    via = server_proxies(proxies, len(addresses))
    ssh = [a for a in addresses if a.scheme == "ssh"]
    if host_keys and len(host_keys) != len(ssh):
        raise UsageError(f"{len(host_keys)} --host-key for {len(ssh)} ssh:// servers: give "
                         "one per ssh:// server, in their order")
    given = iter(host_keys)
    specs, seen = [], set()
    for address, sid, proxy in zip(addresses, server_ids, via, strict=True):
        parse_server_id(sid)
        if sid.lower() in seen:
            raise UsageError(f"server id {sid[:14]}… is given twice")
        seen.add(sid.lower())
        key = None
        if address.scheme == "ssh":
            key = next(given, None)
            if key is None:
                key = known_host_key(address)
                if key is not None:
                    _say(f"{address}: the sshd host key comes from ~/.ssh/known_hosts: "
                         f"{key.split()[0]} {_fingerprint(key)}; check it with the server's "
                         "operator (or give --host-key): it is recorded for the plugin")
            if key is None:
                raise UsageError(
                    f"no host key is known for {address}: give --host-key 'ssh-ed25519 "
                    "AAAA…' (ask its operator for /etc/ssh/ssh_host_ed25519_key.pub) or "
                    f"put it in {known_hosts_path()} (ssh once to it)")
            try:
                asyncssh.import_public_key(key)
            except (ValueError, asyncssh.KeyImportError):
                raise UsageError(f"--host-key for {address} is not an SSH public key "
                                 "('TYPE BASE64')") from None
            key = " ".join(key.split()[:2])
        specs.append(ServerSpec(address, sid.lower(), key, proxy))
    return specs


# --- recovery ----------------------------------------------------------------------------

# Imported here, after the helpers above: cldcb.client.cli imports the modules that
# register commands, and some of them import those helpers from this module.
from cldcb.client.cli import main, passphrase_file_option  # noqa: E402


@dataclass
class ServerResult:
    spec: ServerSpec
    claimed: int | None = None        # newest data_version its status names for the client
    rebuilt: restore.Rebuilt | None = None
    error: str = ""
    fallback: Fallback | None = None     # rebuilt is an older generation: what it lacks
    replaced_by: str = ""                # its tip is a batch another server's chain replaced


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
    """Rebuild from every server in turn and choose by :mod:`cldcb.client.tips`; keep the
    scratch files of the states that may still win, and in the end the winner's only.
    RecoveryError when the newest tips disagree."""
    done: list[ServerResult] = []
    kept: set[int] = set()
    best: ServerResult | None = None
    try:
        for spec in specs:
            res = results[str(spec.address)]
            if res.claimed is None and res.error:
                continue
            res.error = ""
            await _fetch_one(spec, node, cand, dest, res)
            if res.rebuilt is not None:
                done.append(res)
                kept.add(len(done) - 1)
                kept = _keep_only(done, kept, compare(_states(done)).winners)
        verdict = compare(_states(done))
        for i, by in verdict.superseded.items():
            done[i].replaced_by = str(done[by].spec.address)
        if verdict.disagree:
            raise RecoveryError(_disagreement(done, verdict.winners))
        if done:
            best = done[verdict.winners[0]]
            kept = _keep_only(done, kept, [verdict.winners[0]])
    except BaseException:
        _keep_only(done, kept, [])
        raise
    return best


def _states(done: list[ServerResult]) -> list[restore.Rebuilt]:
    return [r.rebuilt for r in done if r.rebuilt is not None]


def _keep_only(done: list[ServerResult], kept: set[int], keep: list[int]) -> set[int]:
    """Discard the scratch files of the results in ``kept`` but not in ``keep``."""
    for i in kept - set(keep):
        rebuilt = done[i].rebuilt
        assert rebuilt is not None
        restore.discard(rebuilt.path)
    return kept & set(keep)


def _disagreement(done: list[ServerResult], winners: list[int]) -> str:
    states = _states(done)
    lines = [f"{done[i].spec.address}: newest record of "
             f"{format_time(states[i].newest_time_ms)}, hash "
             f"{(tip_hash(states[i]) or b'').hex()[:16]}…" for i in winners]
    dv = states[winners[0]].data_version
    return (f"the servers disagree: each verifies up to data_version {dv}, but with a "
            "different newest record, and none replaces another:\n  " + "\n  ".join(lines)
            + "\nOnly one of them was committed by lightningd; recovery cannot tell which. "
            "Nothing was written. See each server's states with `recover --list`, then run "
            "recover again with only the --server you trust")


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
        elif res.rebuilt is not None and res.replaced_by:
            lines.append(head + f"REPLACED: it ends on data_version {res.rebuilt.data_version}"
                         f", a batch lightningd never committed: the chain on {res.replaced_by}"
                         " holds the record that replaced it")
        elif res.rebuilt is not None:
            r = res.rebuilt
            state = "stale" if r.data_version < top else "same state"
            lines.append(head + f"{state}: data_version {r.data_version}, newest record "
                         f"{format_time(r.newest_time_ms)}")
        else:
            claim = f" (it claims data_version {res.claimed})" if res.claimed is not None else ""
            lines.append(head + f"FAILED{claim}: {res.error or 'nothing held'}")
    others = [r.rebuilt for r in results.values() if r is not best and r.rebuilt is not None]
    if unconfirmed(best.rebuilt, others):
        lines.append(
            f"note: its newest record (data_version {top}) is held by "
            f"{best.spec.address} alone: that lightningd never committed it, and that the "
            "record which replaced it was dropped (with everything after it) or never "
            "reached this server, cannot be ruled out; a second server holding the "
            "replacement would show it")
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
    servers = tuple(ServerEntry.of(s) for s in specs)
    return WrapperConfig(
        client_id=cand.client_id, client_priv=cand.client_priv, node_id=node_id,
        servers=servers, database=DATABASE_NAME, outage_limit=default_outage_limit(servers),
        plugin_path=plugin_path).validate()


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
    return cand, best, tried[cand.client_pub]


def _outcomes(specs: list[ServerSpec], results: dict[str, ServerResult],
              best: ServerResult) -> list[dict[str, Any]]:
    """Each server's part in the recovery, for ``--json``."""
    assert best.rebuilt is not None
    out = []
    for spec in specs:
        res = results[str(spec.address)]
        r = res.rebuilt
        outcome = ("used" if res is best else "failed" if r is None
                   else "replaced" if res.replaced_by
                   else "stale" if r.data_version < best.rebuilt.data_version else "same state")
        out.append({"address": str(spec.address), "server_id": spec.server_id,
                    "outcome": outcome, "replaced_by": res.replaced_by or None,
                    "data_version": r.data_version if r else None,
                    "newest_record_ms": r.newest_time_ms if r else None,
                    "claimed_data_version": res.claimed,
                    "older": ({"generation": res.fallback.label, "missing": res.fallback.missing}
                              if res.fallback else None),
                    "error": None if r else (res.error or "nothing held")})
    return out


@main.command()
@node_dir_options
@server_options
@click.option("--ssh-key", "ssh_keys", multiple=True,
              type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Your SSH private key for listing this node's entries on ssh:// servers "
                   "(default: your keys and agent, as ssh uses them).")
@proxy_option
@node_key_options
@click.option("--yes", is_flag=True, help="Answer yes to confirmations.")
@click.option("--accept-older", is_flag=True,
              help="Restore an older state when the newest cannot be verified (the node then "
                   "loses its channels if they changed since): never done without it.")
@click.option("--list", "list_only", is_flag=True,
              help="Show each server's restorable states (generation, data_version range, "
                   "times) and write nothing.")
@json_option("Print one JSON object on stdout: the summary, or with --list the states "
             "(an error too).")
@click.option("--replace-wrapper", is_flag=True,
              help="Replace a cldcb-plugin-wrapper that holds another client; the old one is "
                   "kept as cldcb-plugin-wrapper.replaced-<time>.")
def recover(lightning_dir: Path, network: str, servers: tuple[str, ...],
            server_ids: tuple[str, ...], host_keys: tuple[str, ...], ssh_keys: tuple[Path, ...],
            proxies: tuple[str, ...], hsm_secret: Path | None, passphrase_file: Path | None,
            alt_hsmd: Path | None, yes: bool, accept_older: bool, list_only: bool,
            as_json: bool, replace_wrapper: bool) -> None:
    """Rebuild the node's database from the servers, with its hsm_secret alone.

    Writes <lightning-dir>/<network>/lightningd.sqlite3 (never over an existing
    one), the cldcb-plugin-wrapper and its important-plugin line, so that the
    node goes on backing up as the same client.
    """
    paths = NodePaths(lightning_dir, network)
    folder = paths.network_dir
    dest = folder / DATABASE_NAME
    if list_only:
        specs = server_specs(*asked_servers(servers, server_ids), host_keys, proxies)
        with open_node_key(lightning_dir, network, hsm_secret, passphrase_file,
                           alt_hsmd) as node:
            show_states(asyncio.run(list_node_states(specs, node, [str(k) for k in ssh_keys])),
                        as_json)
        return
    restore.refuse_existing(dest)
    if not folder.is_dir():
        raise RecoveryError(f"{folder} does not exist: create it and put the node's "
                            "hsm_secret in it (or give --hsm-secret)")
    specs = server_specs(*asked_servers(servers, server_ids), host_keys, proxies)
    plugin_path = default_plugin_path()
    keep_freed_memory()                 # megabyte chunks, fetched and opened one by one
    for stale in restore.remove_stale_scratch(dest):
        _say(f"removed {stale.name}, left by an interrupted recovery")
    with open_node_key(lightning_dir, network, hsm_secret, passphrase_file, alt_hsmd) as node:
        node_id = node.node_id
        _say(f"node {node_id}")
        cand, best, results = asyncio.run(recover_node(
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
    if as_json:
        echo_json({"ok": True, "exit_code": int(ExitCode.OK), "database": str(dest),
                   "node_id": node_id, "client_id": cand.client_id,
                   "data_version": r.data_version, "newest_record_ms": r.newest_time_ms,
                   "snapshot_data_version": r.snapshot_data_version,
                   "snapshot_ms": r.snapshot_time_ms, "records": r.records,
                   "servers": _outcomes(specs, results, best), "wrapper": str(paths.wrapper),
                   "replaced_wrapper_kept_as": str(kept) if kept is not None else None,
                   "config": str(paths.config), "important_plugin_added": added,
                   "note": ONE_SERVER if len(specs) == 1 else None,
                   "newest_record_unconfirmed": unconfirmed(
                       r, [x.rebuilt for x in results.values()
                           if x is not best and x.rebuilt is not None]),
                   "warning": NEVER_OLDER})
        return
    lines = _summary(specs, results, best)
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
