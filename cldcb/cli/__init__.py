"""What cldcb's three programs (cldcb-server, cldcb-client, cldcb-plugin) share.

- :mod:`~cldcb.cli.common`: the click group, ``--debug``, ``--json`` and the shared
  options, errors printed as ``error: …``;
- :mod:`~cldcb.cli.programs`: where the programs are on this host, as absolute commands;
- :mod:`~cldcb.cli.malloc`: a process's freed heap kept for reuse.

May import: the core, node-side I/O, :mod:`cldcb.errors`, click and the standard
library. Only the programs (client, plugin, server) import it (``[tool.importlinter]``).
"""
