"""``cldcb-client``: the command group with every command registered.

:mod:`cldcb.client.cli` defines the group and the key commands; each other
command lives in a module of its own that registers itself on that group when
imported. This module imports them all, so the console script (and
``python -m cldcb.client.app``) sees every command, and no command module
has to import another to exist.
"""

from __future__ import annotations

from cldcb.client import install, install_ssh, recover, status, verify  # noqa: F401
from cldcb.client.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
