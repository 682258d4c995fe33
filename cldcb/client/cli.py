"""``cldcb-client``: the node operator's commands (DESIGN section 10).

A thin layer: each command parses its options and calls into the library.
"""

from __future__ import annotations

from pathlib import Path

import click

from cldcb.cli_common import cldcb_group, local_node_key
from cldcb.ids import new_privkey
from cldcb.keyfile import write_key_file

_FILE = click.Path(path_type=Path, dir_okay=False)

passphrase_file_option = click.option(
    "--passphrase-file", type=_FILE, default=None,
    help="File holding the hsm_secret's passphrase (one trailing newline is ignored). "
         "Without it, it is asked for on a terminal when needed.")
"""``--passphrase-file``, of every command that opens an ``hsm_secret``."""


@cldcb_group("cldcb-client")
def main() -> None:
    """cldcb client: keys, plugin install, status, restore drill, disaster recovery."""


@main.command()
@click.argument("file", type=_FILE)
def newclient(file: Path) -> None:
    """Create a new client key in FILE (mode 0600; never overwrites) and print its id."""
    click.echo(write_key_file(file, new_privkey(), "client"))


@main.command()
@click.option("--hsm-secret", "hsm_secret", type=_FILE, required=True,
              help="The node's hsm_secret file.")
@passphrase_file_option
def nodeid(hsm_secret: Path, passphrase_file: Path | None) -> None:
    """Print the node id of an hsm_secret (any format Core Lightning writes)."""
    click.echo(local_node_key(hsm_secret, passphrase_file).node_id)


if __name__ == "__main__":
    main()
