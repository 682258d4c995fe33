"""Installing the backup on a node: ``installplugin``, ``uninstallplugin``, ``sshkey``.

``installplugin`` (DESIGN sections 5, 6 and 10), in an order that changes
nothing locally until every server holds what it needs:

1. the node: if lightningd answers on its RPC socket, the node id from
   ``getinfo``, the recognition signature from ``signmessage`` (ECDH is
   symmetric, so the client computes the signed message with its own key) and
   the database from ``listconfigs`` (``wallet``; PostgreSQL is refused);
   otherwise the node key from ``hsm_secret`` (its passphrase asked for when
   needed) or ``--alt-hsmd``, and the database from ``wallet=`` in the config
   files, else ``lightningd.sqlite3``;
2. the recognition entry (client key sealed to the node) on every server,
   through a read-only client session (it never takes over from a running
   plugin of the same client);
3. the wrapper (mode 0700, owned by the owner of ``<lightning-dir>/<network>``;
   it holds the client key, so the key file may be deleted afterwards);
4. lightningd running: ``plugin start``, then ``important-plugin=<wrapper>``
   in the network's config (once; only after the plugin started, so that a
   plugin that cannot start is reported now rather than keeping lightningd
   from starting later), then a wait, with progress, until ``quorum`` servers
   hold the first snapshot (:mod:`cldcb.client.firstsnapshot`); lightningd
   stopped: the config line, and its next start begins the backup.

A value missing from the command line is asked for when stdin is a
terminal; otherwise the error names the flag to give. ``install --ssh`` (the
single-step setup, :mod:`cldcb.client.ssh_setup`) runs the same steps with a
client key that exists only in memory until it is written into the wrapper.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from cldcb.cli_common import F, ask, stdin_is_terminal
from cldcb.client.cli import main
from cldcb.client.firstsnapshot import wait_first_snapshot
from cldcb.client.nodeconfig import (
    NodePaths,
    add_important_plugin,
    has_important_plugin,
    remove_important_plugin,
)
from cldcb.client.nodeconfig import wallet_from_config_files as config_wallet
from cldcb.client.nodedir import node_dir_options
from cldcb.client.recover import (
    asked_servers,
    node_key_options,
    open_node_key,
    proxy_option,
    server_options,
    server_specs,
)
from cldcb.connection import Connection, ServerSpec
from cldcb.errors import CldcbError, PluginError, RemoteError, UsageError
from cldcb.ids import client_id_from_pubkey, new_privkey, parse_node_id, pubkey_of
from cldcb.keyfile import read_client_key
from cldcb.plugin.wrapper import (
    DEFAULT_OUTAGE_LIMIT,
    ServerEntry,
    WrapperConfig,
    default_outage_limit,
    default_plugin_path,
    other_holder,
    read_wrapper,
    write_wrapper,
)
from cldcb.programs import SERVER_PROGRAM, find_program
from cldcb.proxy import PROXIED
from cldcb.recognition import make_recognition, message_for_client
from cldcb.rpc import LightningRpc, RpcError, database_from_wallet
from cldcb.session import Role
from cldcb.sshkeys import authorized_keys_line
from cldcb.wire import ErrorCode

_FILE = click.Path(path_type=Path, dir_okay=False)
DEFAULT_WAIT = 600.0
Echo = Callable[[str], None]


# --- asking -------------------------------------------------------------------------------

def confirm(question: str, yes: bool) -> None:
    """Go on if ``yes`` or the operator answers yes on a terminal; else stop."""
    if yes:
        return
    if not stdin_is_terminal():
        raise UsageError(f"{question} Give --yes to confirm (stdin is not a terminal to "
                         "ask).")
    if not click.confirm(question, default=False, err=True):
        raise UsageError("stopped: nothing was changed")


def outage_limit_option(func: F) -> F:
    """``--outage-limit SECONDS`` (default: the wrapper's default for the servers' routes)."""
    return click.option(
        "--outage-limit", type=float, default=None,
        help="Seconds lightningd waits for the servers before the plugin makes it stop "
             f"[default: {DEFAULT_OUTAGE_LIMIT:g}, {PROXIED.outage_limit:g} through a "
             "proxy].")(func)


# --- the node's part --------------------------------------------------------------------

@dataclass(frozen=True)
class NodeSide:
    """What the node contributes: its id, its signature of the recognition message,
    the database path for the wrapper, and whether lightningd is running."""

    node_id: str
    zbase: str
    database: str
    running: bool


@dataclass
class KeySource:
    """Where the node key comes from when lightningd is not running."""

    hsm_secret: Path | None = None
    passphrase_file: Path | None = None
    alt_hsmd: Path | None = None


def node_side(paths: NodePaths, client_priv: bytes, rpc: LightningRpc, keys: KeySource,
              echo: Echo) -> NodeSide:
    """Sign the recognition message with the running node, or with its key."""
    if rpc.is_running():
        if keys.hsm_secret or keys.passphrase_file or keys.alt_hsmd:
            echo("note: lightningd is running, so the node signs through its RPC; "
                 "--hsm-secret, --passphrase-file and --alt-hsmd are not used")
        node_id = rpc.node_id()
        node_pub = parse_node_id(node_id)
        database = rpc.database()
        zbase = rpc.signmessage(message_for_client(client_priv, node_pub))
        echo(f"lightningd is running: node {node_id}, database {database}")
        return NodeSide(node_id, zbase, database, True)
    database = database_from_wallet(config_wallet(paths))
    with open_node_key(paths.lightning_dir, paths.network, keys.hsm_secret,
                       keys.passphrase_file, keys.alt_hsmd) as node:
        message = message_for_client(client_priv, node.pubkey)
        signed = node.sign_message(message)
        echo(f"lightningd is not running: node {node.node_id} (from "
             f"{'--alt-hsmd' if keys.alt_hsmd else 'hsm_secret'}), database {database}")
        return NodeSide(node.node_id, signed.zbase, database, False)


# --- the wrapper already there --------------------------------------------------------------

def check_existing_wrapper(paths: NodePaths, client_id: str, yes: bool) -> None:
    """Ask before replacing a wrapper that holds another client's key."""
    wrapper = paths.wrapper
    what = other_holder(wrapper, client_id)
    if what is None:
        return
    confirm(f"{wrapper} already holds {what}. Replacing it makes this node back up as "
            f"client {client_id} from now on (the old client's backup stays on its servers, "
            f"and recovery still finds it; the old wrapper is kept as {wrapper.name}"
            ".replaced-<time>). Replace it?", yes)


# --- the servers' part ------------------------------------------------------------------

async def _put_one(spec: ServerSpec, client_priv: bytes, entry: bytes) -> None:
    async with await Connection.open(spec, client_priv, Role.READER) as conn:
        await conn.put_recognition(entry)


async def _put_all(specs: Sequence[ServerSpec], client_priv: bytes,
                   entry: bytes) -> list[BaseException | None]:
    return list(await asyncio.gather(*(_put_one(s, client_priv, entry) for s in specs),
                                     return_exceptions=True))


def store_recognition(specs: Sequence[ServerSpec], client_priv: bytes, node: NodeSide,
                      echo: Echo) -> None:
    """The recognition entry on every server; an error naming each that failed."""
    entry = make_recognition(client_priv, parse_node_id(node.node_id), node.zbase,
                             new_privkey()).encode()
    results = asyncio.run(_put_all(specs, client_priv, entry))
    failed = []
    for spec, res in zip(specs, results, strict=True):
        if res is None:
            echo(f"  {spec.address}: recognition entry stored")
        elif isinstance(res, RemoteError) and res.code == ErrorCode.KEPT:
            echo(f"  {spec.address}: recognition entry kept (the client is append-only "
                 "there: the entry it holds is never replaced)")
        elif isinstance(res, CldcbError):
            failed.append(f"{spec.address}: {res}")
        else:
            failed.append(f"{spec.address}: {type(res).__name__}: {res}")
    if failed:
        raise PluginError("the recognition entry could not be stored on every server, so "
                          "nothing was installed locally:\n  " + "\n  ".join(failed))


# --- the whole installation --------------------------------------------------------------

@dataclass
class Install:
    """Everything ``installplugin`` (and ``install --ssh``) needs to finish the job."""

    paths: NodePaths
    client_priv: bytes = field(repr=False)
    specs: list[ServerSpec]
    quorum: int | None = None
    outage_limit: float | None = None     # None: default_outage_limit of the servers
    wait: float = DEFAULT_WAIT

    @property
    def client_id(self) -> str:
        return client_id_from_pubkey(pubkey_of(self.client_priv))

    def wrapper_config(self, node: NodeSide) -> WrapperConfig:
        servers = tuple(ServerEntry.of(s) for s in self.specs)
        limit = self.outage_limit or default_outage_limit(servers)
        return WrapperConfig(client_id=self.client_id, client_priv=self.client_priv,
                             node_id=node.node_id, servers=servers, database=node.database,
                             quorum=self.quorum, outage_limit=limit,
                             plugin_path=default_plugin_path()).validate()


def check_quorum(quorum: int | None, count: int) -> None:
    if quorum is not None and not 1 <= quorum <= count:
        raise UsageError(f"--quorum {quorum} must be between 1 and the number of servers "
                         f"({count})")


def run_install(job: Install, node: NodeSide, rpc: LightningRpc, echo: Echo) -> None:
    """Steps 2 to 4 of the module docstring."""
    check_quorum(job.quorum, len(job.specs))
    if not job.paths.network_dir.is_dir():
        raise UsageError(f"{job.paths.network_dir} does not exist: check --lightning-dir "
                         "and --network")
    cfg = job.wrapper_config(node)
    echo(f"client {job.client_id}: storing its recognition entry on "
         f"{len(job.specs)} server(s)")
    store_recognition(job.specs, job.client_priv, node, echo)
    wrapper = job.paths.wrapper
    unchanged = wrapper.exists() and _same_config(wrapper, cfg)
    kept = write_wrapper(wrapper, cfg)
    echo(f"wrote {wrapper} (mode 0700; it holds the client key)")
    if kept is not None:
        echo(f"kept the wrapper it replaced (another client's key) as {kept}")
    if not node.running:
        config_line(job.paths, echo)
        echo("lightningd is not running: its next start begins the backup (the plugin "
             "takes the first snapshot before lightningd commits anything).")
        return
    try:
        started = start_plugin(rpc, wrapper, unchanged, echo)
    except CldcbError as exc:
        raise PluginError(
            f"{exc}\nThe wrapper was written but not added to lightningd's config, so "
            "lightningd goes on (and would restart) without the backup: fix the cause (see "
            "lightningd's log) and run installplugin again") from None
    # only now: an important plugin that cannot start would keep lightningd from starting
    config_line(job.paths, echo)
    if started:
        wait_first_snapshot(job.specs, job.client_priv, cfg.effective_quorum, job.wait, rpc,
                            job.paths, echo)


def config_line(paths: NodePaths, echo: Echo) -> None:
    if add_important_plugin(paths, paths.wrapper):
        echo(f"added important-plugin={paths.wrapper} to {paths.config}")
    else:
        echo(f"{paths.config} already has important-plugin={paths.wrapper}")


def _same_config(path: Path, cfg: WrapperConfig) -> bool:
    try:
        old = read_wrapper(path)
    except CldcbError:
        return False
    return old == cfg


def start_plugin(rpc: LightningRpc, wrapper: Path, unchanged: bool, echo: Echo) -> bool:
    """``plugin start``; False when lightningd goes on running an older wrapper."""
    if rpc.plugin_active(wrapper):
        if unchanged:
            echo("the plugin is already running with this configuration")
            return True
        echo("the plugin runs an older configuration: restarting it")
        try:
            rpc.plugin_stop(wrapper)
        except RpcError as exc:
            echo(f"lightningd would not stop it ({exc.rpc_message}): restart lightningd to "
                 "use the new wrapper; until then the previous configuration backs up")
            return False
    echo(f"starting the plugin: plugin start {wrapper}")
    rpc.plugin_start(wrapper)
    return True


# --- commands --------------------------------------------------------------------------

def echo_out(text: str) -> None:
    click.echo(text)


@main.command()
@node_dir_options
@click.option("--client-privkey", type=_FILE, default=None,
              help="The client key file (from `cldcb-client newclient`).")
@server_options
@click.option("--quorum", type=int, default=None,
              help="Servers that must hold each change before lightningd commits it "
                   "[default: all].")
@outage_limit_option
@proxy_option
@node_key_options
@click.option("--wait", "wait", type=float, default=DEFAULT_WAIT, show_default=True,
              help="Seconds to wait for the first snapshot when lightningd is running.")
@click.option("--yes", is_flag=True, help="Answer yes to confirmations.")
def installplugin(lightning_dir: Path, network: str, client_privkey: Path | None,
                  servers: tuple[str, ...], server_ids: tuple[str, ...],
                  host_keys: tuple[str, ...], quorum: int | None, outage_limit: float | None,
                  proxies: tuple[str, ...], hsm_secret: Path | None, passphrase_file: Path | None,
                  alt_hsmd: Path | None, wait: float, yes: bool) -> None:
    """Install the backup plugin on this node for an existing client key."""
    key_path = Path(os.path.expanduser(ask(
        str(client_privkey) if client_privkey else None, "--client-privkey",
        "Client key file (made by `cldcb-client newclient`)")))
    specs = server_specs(*asked_servers(servers, server_ids), host_keys, proxies)
    check_quorum(quorum, len(specs))
    client_priv, client_id = read_client_key(key_path)
    paths = NodePaths(lightning_dir, network)
    check_existing_wrapper(paths, client_id, yes)
    rpc = LightningRpc.for_node(lightning_dir, network)
    node = node_side(paths, client_priv, rpc, KeySource(hsm_secret, passphrase_file, alt_hsmd),
                     echo_out)
    run_install(Install(paths, client_priv, specs, quorum, outage_limit, wait), node, rpc,
                echo_out)
    click.echo(f"done. The wrapper holds the client key: {key_path} may be deleted (or kept "
               "offline).")


@main.command()
@node_dir_options
@click.option("--yes", is_flag=True, help="Answer yes to the confirmation.")
def uninstallplugin(lightning_dir: Path, network: str, yes: bool) -> None:
    """Remove the backup plugin from this node (the wrapper and its config line)."""
    paths = NodePaths(lightning_dir, network)
    wrapper = paths.wrapper
    if not wrapper.exists() and not has_important_plugin(paths, wrapper):
        click.echo(f"nothing to remove: no {wrapper} and no config line naming it")
        return
    click.echo("Without the plugin, lightningd commits changes that no backup holds: from "
               "then on the servers' copy grows stale, and restoring a stale copy loses "
               "channels (and broadcasting a revoked state loses funds). Recovery from "
               "hsm_secret keeps working for what the servers hold now; install again to "
               "resume (a new first snapshot is taken).")
    confirm(f"Remove {wrapper} and its important-plugin line?", yes)
    rpc = LightningRpc.for_node(lightning_dir, network)
    if rpc.is_running() and rpc.plugin_active(wrapper):
        try:
            rpc.plugin_stop(wrapper)
            click.echo("stopped the running plugin")
        except RpcError as exc:
            click.echo(f"lightningd would not stop the running plugin ({exc.rpc_message}); "
                       "it goes on until lightningd restarts")
    for cfg in remove_important_plugin(paths, wrapper):
        click.echo(f"removed the plugin line from {cfg}")
    if wrapper.exists():
        wrapper.unlink()
        click.echo(f"removed {wrapper}")


@main.command()
@click.option("--client-privkey", type=_FILE, default=None,
              help="The client key file.")
@click.option("--lightning-dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="Read the client key from this node's wrapper instead.")
@click.option("--network", default="bitcoin", show_default=True,
              help="The node's network (with --lightning-dir).")
@click.option("--server-command", default=None, metavar="COMMAND",
              help="How the server host runs cldcb-server (the forced command's program) "
                   "[default: the absolute path of cldcb-server on this host].")
def sshkey(client_privkey: Path | None, lightning_dir: Path | None, network: str,
           server_command: str | None) -> None:
    """Print the authorized_keys line for a server behind OpenSSH sshd."""
    if (client_privkey is None) == (lightning_dir is None):
        raise UsageError("give either --client-privkey FILE or --lightning-dir DIR")
    if client_privkey is not None:
        priv, client_id = read_client_key(client_privkey)
    else:
        assert lightning_dir is not None
        cfg = read_wrapper(NodePaths(lightning_dir, network).wrapper)
        priv, client_id = cfg.client_priv, cfg.client_id
    if server_command is None:
        server_command = find_program(SERVER_PROGRAM)
        if server_command is None:
            raise UsageError("cldcb-server is not installed on this host: give its absolute "
                             "path on the server host with --server-command")
        click.echo(f"forced command: {server_command} (where cldcb-server is on this host; "
                   "if the server host has it elsewhere, give that path with "
                   "--server-command)", err=True)
    click.echo(authorized_keys_line(priv, client_id, server_command))

