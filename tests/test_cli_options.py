"""An option several commands share is one option: the same name, type and help wherever
it appears (``--server``/``--server-id``/``--host-key`` of installplugin and recover,
``--passphrase-file`` of every command that opens an hsm_secret)."""

from __future__ import annotations

import click
import pytest

from cldcb.client.app import main

SERVERS = ("installplugin", "recover")
SHARED = [("--server", SERVERS), ("--server-id", SERVERS), ("--host-key", SERVERS),
          ("--passphrase-file", ("nodeid", "installplugin", "install", "recover", "verify"))]
"""Each shared option and the commands that take it (``install --server`` is another
option: the one address the plugin is to use)."""


def _options(name: str, commands: tuple[str, ...]) -> dict[str, click.Option]:
    assert isinstance(main, click.Group)
    found = {}
    for command_name in commands:
        for param in main.commands[command_name].params:
            if isinstance(param, click.Option) and name in param.opts:
                found[command_name] = param
    return found


@pytest.mark.parametrize(("name", "commands"), SHARED)
def test_a_shared_option_reads_the_same_everywhere(name: str, commands: tuple[str, ...]) -> None:
    found = _options(name, commands)
    assert sorted(found) == sorted(commands)
    shapes = {(p.help, p.metavar, p.multiple, repr(p.type), p.name) for p in found.values()}
    assert len(shapes) == 1, {c: p.help for c, p in found.items()}
