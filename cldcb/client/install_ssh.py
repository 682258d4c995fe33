"""``cldcb-client install --ssh [USER@]HOST[:PORT]``: the single-step setup.

1. the node's part first (signature from the running node, or its key from
   ``hsm_secret``/``--alt-hsmd``), with a client key made in memory: a failure
   here changes nothing anywhere;
2. the admin's SSH login to the server host (:mod:`cldcb.client.ssh_setup`:
   ~/.ssh/config, known_hosts with explicit confirmation of an unknown host,
   agent, keys, password / keyboard-interactive prompts) and
   ``cldcb-server add CLIENT_ID --json`` there (a key whose forced command is
   ``cldcb-server forced --allow add`` can do exactly that);
3. the address the plugin uses: ``--server``, else the public address from
   ``add --json``, else ``ssh://`` to the account set up through. In that last
   case the client's derived SSH key must be let in: its ``authorized_keys``
   line (forced command ``/abs/cldcb-server --data-dir DIR stdio --client …``:
   ``--server-command`` if given, else the command that host's ``add --json``
   reported of itself, never a bare name looked up on that session's PATH; the
   command used is printed) is added, when the account has a shell, to the file
   sshd reads for it (sshd's ``AuthorizedKeysFile``: see
   :meth:`SetupConnection.authorize`), and the output says which; otherwise, or
   when sshd still refuses the key, the line is printed with the file it must go
   to (on a terminal, the setup waits for it);
4. what ``installplugin`` does (:func:`cldcb.client.install.run_install`).

The client key is written nowhere but the wrapper. Once the client is added
on the server, its wrapper is first written as ``cldcb-plugin-wrapper.pending``
(mode 0700, beside the wrapper, not in lightningd's config): if the setup
stops after that (no terminal to wait at, end of input at a prompt, a server
error), the error names the client, the server and that file, and running
``install`` again reuses that client key (``add`` of a registered client
changes nothing) instead of registering another; the pending file is removed
when the install is done. To give up instead, remove the client on the server
(``cldcb-server remove``) and delete the file.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import click

from cldcb.cli.common import stdin_is_terminal
from cldcb.cli.programs import SERVER_PROGRAM
from cldcb.client.cli import main
from cldcb.client.install import (
    DEFAULT_WAIT,
    Echo,
    Install,
    KeySource,
    ask,
    check_existing_wrapper,
    echo_out,
    node_dir_options,
    node_side,
    outage_limit_option,
    run_install,
)
from cldcb.client.nodeconfig import NodePaths
from cldcb.client.recover import node_key_options, server_specs
from cldcb.client.ssh_setup import Added, SetupConnection, SshTarget, resolve
from cldcb.core.ids import client_id_from_pubkey, new_privkey, pubkey_of
from cldcb.core.session import Role
from cldcb.errors import AuthError, CldcbError, UsageError
from cldcb.node.rpc import LightningRpc
from cldcb.plugin.wrapper import PENDING_NAME, read_wrapper, write_wrapper
from cldcb.transport.connection import Connection, ServerAddress, ServerSpec
from cldcb.transport.proxy import parse_optional
from cldcb.transport.sshkeys import authorized_keys_line

_FILE = click.Path(path_type=Path, dir_okay=False)

def _server_spec(address: ServerAddress, server_id: str, setup: SetupConnection) -> ServerSpec:
    """The spec of the backup server; an ssh:// server on the setup host is pinned to the
    host key seen (and confirmed) by the setup login, any other to known_hosts. It goes
    through the setup's proxy (--proxy) too."""
    t = setup.target
    if address.scheme == "ssh" and (address.host, address.port) == (t.hostname, t.port):
        return ServerSpec(address, server_id, setup.host_key, setup.proxy)
    return replace(server_specs([str(address)], [server_id])[0], proxy=setup.proxy)


async def _probe(spec: ServerSpec, client_priv: bytes) -> None:
    async with await Connection.open(spec, client_priv, Role.READER) as conn:
        await conn.status()


def _wait_until_authorized(spec: ServerSpec, client_priv: bytes, line: str, setup_user: str,
                           written: str | None, echo: Echo) -> None:
    """Check the client's SSH key gets in; if not, show the line to add, say plainly where
    it must go, and (on a terminal) wait for the operator to add it. ``written``: where
    cldcb added it already (None: it could not)."""
    user = spec.address.user or setup_user
    where = (f"the file that sshd's AuthorizedKeysFile names for {user} (as root there, "
             f"`sshd -T -C user={user},host=localhost,addr=127.0.0.1 | grep -i "
             "authorizedkeysfile` shows it; the default is ~/.ssh/authorized_keys)")
    while True:
        try:
            asyncio.run(_probe(spec, client_priv))
            return
        except AuthError as exc:
            reason = str(exc)
        done = (f"cldcb added it to {written}, but sshd does not take it from there. "
                if written else "")
        echo(f"The client's SSH key is not let into {spec.address} ({reason}).\n"
             f"{done}Add this line to {where}:\n\n{line}\n")
        if not stdin_is_terminal():
            why = ("sshd does not read it where cldcb added it" if written else
                   "this account does not let cldcb add it")
            raise UsageError(
                f"the client's SSH key must be in {where} on {spec.address} (see the line "
                f"above), and {why}. Add it and run install again, or give --server with "
                "the address of a `cldcb-server serve` daemon")
        try:
            answer = click.prompt("Press Enter once it is there (q to stop)", default="",
                                  show_default=False, err=True)
        except click.exceptions.Abort:
            raise UsageError("stopped: no answer at the prompt (end of input)") from None
        if answer.strip().lower() == "q":
            raise UsageError("stopped")


@main.command()
@node_dir_options
@click.option("--ssh", "ssh_target", default=None, metavar="[USER@]HOST[:PORT]",
              help="The server host to set up through (an ~/.ssh/config alias works).")
@click.option("--server", "server", default=None, metavar="ADDR",
              help="Address the plugin uses [default: the server's public address from "
                   "`add --json`, else ssh:// to the host set up through].")
@click.option("--ssh-config", type=_FILE, default=None,
              help="OpenSSH client config to use [default: ~/.ssh/config].")
@click.option("--accept-host-key", default=None, metavar="SHA256:…",
              help="Trust an unknown host whose key has exactly this fingerprint (it is "
                   "added to known_hosts). --yes does not accept host keys.")
@click.option("--server-command", default=None, metavar="COMMAND",
              help="How to run cldcb-server on the host, also in the client key's forced "
                   "command [default: `cldcb-server` to add the client; in the forced command "
                   "the absolute path that server reports of itself].")
@outage_limit_option
@click.option("--proxy", default=None, metavar="socks5://HOST:PORT",
              help="Reach the host (setup login and backups) through this SOCKS5 proxy (Tor: "
                   "socks5://127.0.0.1:9050, the default for .onion hosts).")
@node_key_options
@click.option("--wait", "wait", type=float, default=DEFAULT_WAIT, show_default=True,
              help="Seconds to wait for the first snapshot when lightningd is running.")
@click.option("--yes", is_flag=True, help="Answer yes to confirmations about this node.")
def install(lightning_dir: Path, network: str, ssh_target: str | None, server: str | None,
            ssh_config: Path | None, accept_host_key: str | None, server_command: str | None,
            outage_limit: float | None, proxy: str | None, hsm_secret: Path | None,
            passphrase_file: Path | None, alt_hsmd: Path | None, wait: float, yes: bool) -> None:
    """Single-step setup: register a new client on a server over SSH and install the plugin.

    The client key is made in memory and written nowhere but the wrapper.
    """
    echo = echo_out
    target = resolve(SshTarget.parse(ask(ssh_target, "--ssh", "Server host "
                                         "([USER@]HOST[:PORT])")), ssh_config)
    backup_address = ServerAddress.parse(server) if server else None
    paths = NodePaths(lightning_dir, network)
    if not paths.network_dir.is_dir():
        raise UsageError(f"{paths.network_dir} does not exist: check --lightning-dir and "
                         "--network")
    pending = paths.network_dir / PENDING_NAME
    client_priv = _pending_key(pending, echo) or new_privkey()
    client_id = client_id_from_pubkey(pubkey_of(client_priv))
    check_existing_wrapper(paths, client_id, yes)
    rpc = LightningRpc.for_node(lightning_dir, network)
    node = node_side(paths, client_priv, rpc, KeySource(hsm_secret, passphrase_file, alt_hsmd),
                     echo)
    interactive = stdin_is_terminal()
    echo(f"connecting to {target.user}@{target.hostname}:{target.port}")
    with SetupConnection(target, accept_host_key=accept_host_key, interactive=interactive,
                         echo=echo, proxy=parse_optional(proxy)) as setup:
        added = setup.add_client(client_id, server_command or SERVER_PROGRAM)
        echo(f"added client {client_id} on {target.hostname} (server {added.server_id})")
        try:
            if backup_address is None:
                backup_address = (ServerAddress.parse(added.public_address)
                                  if added.public_address else
                                  ServerAddress("ssh", target.hostname, target.port,
                                                target.user))
            spec = _server_spec(backup_address, added.server_id, setup)
            job = Install(paths, client_priv, [spec], None, outage_limit, wait)
            write_wrapper(pending, job.wrapper_config(node))
            forced, whence = _forced_program(server_command, added)
            line = authorized_keys_line(client_priv, client_id, forced)
            written: str | None = None
            if spec.address.scheme == "ssh":
                echo(f"the client key's forced command runs {forced} ({whence})")
                same_account = (spec.address.host, spec.address.port, spec.address.user) == (
                    target.hostname, target.port, target.user)
                written = setup.authorize(line) if same_account else None
                if written:
                    echo(f"added the client's SSH key (forced command `{forced} "
                         f"stdio --client {client_id[:12]}…`) to {written} for {target.user}")
        except CldcbError as exc:
            raise _noted(exc, _left(client_id, target.hostname, pending)) from None
    echo(f"the plugin will use {spec.address} ({spec.describe_route()})")
    try:
        if spec.address.scheme == "ssh":
            _wait_until_authorized(spec, client_priv, line, target.user, written, echo)
        run_install(job, node, rpc, echo)
    except CldcbError as exc:
        if paths.wrapper.exists() and _holds(paths, client_id):
            pending.unlink(missing_ok=True)
            raise
        raise _noted(exc, _left(client_id, target.hostname, pending)) from None
    pending.unlink(missing_ok=True)
    echo(f"done: client {client_id} backs up this node to {spec.address}. Its key is only "
         f"in {paths.wrapper}.")


def _forced_program(given: str | None, added: Added) -> tuple[str, str]:
    """The program of the client key's forced command, and where it came from."""
    if given:
        return given, "--server-command"
    if added.server_command:
        return added.server_command, "as the server host reported it"
    return SERVER_PROGRAM, ("found through PATH there: the server host did not report its "
                            "path; give --server-command to pin it")


def _pending_key(pending: Path, echo: Echo) -> bytes | None:
    """The client key kept by an install that stopped after adding its client, if any."""
    if not pending.exists():
        return None
    try:
        cfg = read_wrapper(pending)
    except CldcbError as exc:
        raise UsageError(f"{exc}. It was left by an install that stopped; if its client is "
                         "no longer wanted, remove the client on the server and delete the "
                         "file, then run again") from None
    echo(f"reusing client {cfg.client_id}, kept in {pending} by an install that stopped")
    return cfg.client_priv


def _left(client_id: str, host: str, pending: Path) -> str:
    """What a stopped install left, and where."""
    where = (f"its key is kept in {pending} (mode 0700): run install again to finish with "
             "this same client (nothing new is registered), or " if pending.exists() else "")
    return (f"client {client_id} is registered on {host} but nothing was installed here; "
            f"{where}remove it there with `cldcb-server remove {client_id}`"
            + (f" and delete {pending}" if where else ""))


def _holds(paths: NodePaths, client_id: str) -> bool:
    try:
        return read_wrapper(paths.wrapper).client_id == client_id
    except CldcbError:
        return False


def _noted(exc: CldcbError, note: str) -> CldcbError:
    """``exc`` with ``note`` appended to its message (same exit code)."""
    noted = CldcbError(f"{exc}\n({note})")
    noted.exit_code = exc.exit_code
    return noted
