"""``cldcb-server``: the server operator's commands (DESIGN section 10).

A thin layer. The group's ``--data-dir`` (default ``$CLDCB_SERVER_DIR``, else
``/var/lib/cldcb`` for root, else ``~/.local/share/cldcb``) reaches commands
as a :class:`ServerContext` through :data:`pass_server`.

The data directory holds ``server_key`` (the server's key file, mode 0600) and
``server.json`` (``{"public_address": "HOST:PORT" or null}``; ``init`` writes it,
``set-address`` changes it and never touches the key).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import click

from cldcb.cli.common import cldcb_group
from cldcb.cli.programs import running_server_command
from cldcb.core.ids import new_privkey
from cldcb.errors import KeyFileError, UsageError
from cldcb.node.durable import replace_file
from cldcb.node.keyfile import read_server_key, write_key_file

SERVER_KEY_NAME = "server_key"
SERVER_JSON_NAME = "server.json"
DATA_DIR_MODE = 0o700


def default_data_dir() -> Path:
    """``$CLDCB_SERVER_DIR``, else /var/lib/cldcb for root, else ~/.local/share/cldcb."""
    env = os.environ.get("CLDCB_SERVER_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cldcb")
    return Path.home() / ".local" / "share" / "cldcb"


@dataclass(frozen=True)
class ServerContext:
    """What the group passes to its commands."""

    data_dir: Path

    @property
    def key_path(self) -> Path:
        return self.data_dir / SERVER_KEY_NAME

    @property
    def json_path(self) -> Path:
        return self.data_dir / SERVER_JSON_NAME

    def read_key(self) -> tuple[bytes, str]:
        """``(privkey32, server_id)``; a clear error if ``init`` was not run."""
        if not self.key_path.exists():
            raise KeyFileError(f"no server key in {self.data_dir}: run `cldcb-server "
                               "init` first, or give the right --data-dir")
        return read_server_key(self.key_path)

    def public_address(self) -> str | None:
        """The public address given at ``init``, if any."""
        try:
            value = json.loads(self.json_path.read_text("utf-8")).get("public_address")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            raise KeyFileError(f"cannot read {self.json_path}: {exc}; fix or remove it "
                               "and run `cldcb-server init` again") from None
        return value if isinstance(value, str) else None

    def command(self) -> str:
        """The command line that runs this server program on this data directory (absolute
        paths), for ``authorized_keys``, sshd's ``Subsystem`` and systemd's ``ExecStart``."""
        return shlex.join([*running_server_command(), "--data-dir",
                           os.path.abspath(self.data_dir)])


pass_server = click.make_pass_decorator(ServerContext)


def parse_host_port(value: str, option: str = "--public-address") -> str:
    """``value`` if it is ``HOST:PORT`` (IPv6 as ``[ADDR]:PORT``), else a UsageError."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        ok_host = bool(host) and ":" in host
    else:
        host, sep, port = value.rpartition(":")
        ok_host = bool(host) and ":" not in host and not any(c.isspace() for c in host)
    if not sep or not ok_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{option} must be HOST:PORT (an IPv6 address as [ADDR]:PORT), "
                         f"got {value!r}")
    return value


@cldcb_group("cldcb-server")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The server's data directory [default: $CLDCB_SERVER_DIR, else "
                   "/var/lib/cldcb for root, else ~/.local/share/cldcb].")
@click.pass_context
def main(ctx: click.Context, data_dir: Path | None) -> None:
    """cldcb server: stores encrypted backups of Core Lightning nodes."""
    ctx.obj = ServerContext(data_dir if data_dir is not None else default_data_dir())


@main.command()
@click.option("--public-address", default=None, metavar="HOST:PORT",
              help="Address clients should use to reach this server (shown by `add --json`).")
@pass_server
def init(server: ServerContext, public_address: str | None) -> None:
    """Create the server key (never replaces one) and print the server id."""
    if public_address is not None:
        parse_host_port(public_address)
    if server.key_path.exists():
        raise KeyFileError(f"{server.key_path} already exists: this server is already "
                           "initialised (see `cldcb-server id`); its key is never replaced, "
                           "as clients trust it")
    _make_data_dir(server.data_dir)
    server_id = write_key_file(server.key_path, new_privkey(), "server")
    _write_json(server.json_path, {"public_address": public_address})
    click.echo(server_id)


@main.command("set-address")
@click.argument("address", required=False, metavar="HOST:PORT")
@click.option("--clear", is_flag=True, help="Remove the public address instead.")
@pass_server
def set_address(server: ServerContext, address: str | None, clear: bool) -> None:
    """Change the public address clients are told (`add --json`); the key stays."""
    if clear == (address is not None):
        raise UsageError("give the new address as HOST:PORT, or --clear (not both)")
    if address is not None:
        parse_host_port(address)
    server.read_key()    # a clear error when `init` was not run
    old = server.public_address()
    _write_json(server.json_path, {"public_address": address})
    click.echo(f"public address changed from {old or 'none'} to {address or 'none'} "
               "(the server key and id are unchanged)")


@main.command("id")
@pass_server
def id_(server: ServerContext) -> None:
    """Print the server id."""
    click.echo(server.read_key()[1])


def _make_data_dir(path: Path) -> None:
    if path.is_dir():
        return
    try:
        path.mkdir(mode=DATA_DIR_MODE, parents=True)
        path.chmod(DATA_DIR_MODE)
    except OSError as exc:
        raise KeyFileError(f"cannot create data directory {path}: {exc.strerror or exc}; "
                           "give another --data-dir or create it first") from None


def _write_json(path: Path, data: dict[str, object]) -> None:
    try:
        replace_file(path, json.dumps(data, indent=1) + "\n", mode=0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None


if __name__ == "__main__":
    main()
