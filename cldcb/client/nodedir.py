"""Which node a ``cldcb-client`` command is about: ``--lightning-dir`` and ``--network``.

Every command that works on a node takes both (:func:`node_dir_options`), and finds the
lightning dir as lightningd would, without ever guessing silently:

1. ``--lightning-dir DIR`` when given (``~`` expanded);
2. the current folder when it is that node's ``<lightning-dir>/<network>`` (it holds
   ``hsm_secret`` or ``lightningd.sqlite3``), or has a ``<network>`` folder:
   ``cd ~/.lightning && cldcb-client recover …`` works;
3. lightningd's own default ``~/.lightning`` when ``~/.lightning/<network>`` exists;
4. else asked for on a terminal, else a :class:`~cldcb.errors.UsageError` naming
   ``--lightning-dir``.

The folder found by 2 or 3 is named on stderr. ``--network`` defaults to ``bitcoin``
(lightningd's default); when ``<lightning-dir>/<network>`` does not exist but a folder
for another network there holds a node, the error names ``--network`` with it (a
regtest node otherwise gets advice about a missing ``hsm_secret``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cldcb.cli.common import ask
from cldcb.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_NETWORK = "bitcoin"
NODE_FILES = ("hsm_secret", "lightningd.sqlite3")


def _holds_node(folder: Path) -> bool:
    return any((folder / name).exists() for name in NODE_FILES)


def find_lightning_dir(given: Path | None, network: str,
                       cwd: Path | None = None) -> tuple[Path | None, str]:
    """(the lightning dir, how it was found), or (None, "") when nothing fits."""
    if given is not None:
        return Path(os.path.expanduser(given)), ""
    here = (cwd or Path.cwd()).absolute()
    if here.name == network and _holds_node(here):
        return here.parent, f"the current folder is its {network} folder"
    if (here / network).is_dir():
        return here, f"the current folder has a {network} folder"
    default = Path(os.path.expanduser("~/.lightning"))
    if (default / network).is_dir():
        return default, "lightningd's default"
    return None, ""


def check_network(lightning_dir: Path, network: str) -> None:
    """A UsageError naming ``--network`` when the node in ``lightning_dir`` is another
    network's."""
    if (lightning_dir / network).is_dir() or not lightning_dir.is_dir():
        return
    others = sorted(d.name for d in lightning_dir.iterdir() if d.is_dir() and _holds_node(d))
    if others:
        raise UsageError(f"{lightning_dir / network} does not exist, but {lightning_dir} holds "
                         f"a node for {', '.join(others)}: give --network {others[0]} "
                         f"(the default is {DEFAULT_NETWORK})")


def lightning_dir_of(given: Path | None, network: str) -> Path:
    """The lightning dir to use (see the module docstring)."""
    found, how = find_lightning_dir(given, network)
    if found is None:
        found = Path(os.path.expanduser(ask(None, "--lightning-dir",
                                            "lightningd's --lightning-dir")))
    elif how:
        click.echo(f"using --lightning-dir {found} ({how})", err=True)
    check_network(found, network)
    return found


def node_dir_options(func: F) -> F:
    """``--lightning-dir DIR`` and ``--network NET``; the command gets the dir found."""

    @functools.wraps(func)
    def resolved(*args: Any, **kwargs: Any) -> Any:
        kwargs["lightning_dir"] = lightning_dir_of(kwargs.get("lightning_dir"),
                                                   kwargs["network"])
        return func(*args, **kwargs)

    with_network = click.option(
        "--network", default=DEFAULT_NETWORK, show_default=True,
        help="The node's network (lightningd's --network: regtest, testnet, signet, …); "
             "its files are in <lightning-dir>/<network>.")(resolved)
    return click.option(  # type: ignore[no-any-return]
        "--lightning-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
        help="lightningd's --lightning-dir [default: the current folder when it is the "
             "node's (or its <network> folder), else ~/.lightning when it has a <network> "
             "folder, else asked on a terminal].")(with_network)
