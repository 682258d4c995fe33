"""Node-side I/O: the node's keys, lightningd, the node's database, local files.

- :mod:`~cldcb.node.nodekey`: the node key however it is held (``hsm_secret``);
  :mod:`~cldcb.node.alt_hsmd`: held by an hsmd-like program;
- :mod:`~cldcb.node.keyfile`: client and server key files, passphrase files;
- :mod:`~cldcb.node.rpc`: lightningd's JSON-RPC; :mod:`~cldcb.node.jsonrpc`: its framing
  (the plugin's stdin/stdout too);
- :mod:`~cldcb.node.nodedb`: the node's database read-only (``vars.data_version``);
- :mod:`~cldcb.node.replay`: rebuild a Core Lightning database from a base and changes;
  :mod:`~cldcb.node.restore`: fetch a backup, verify all of it, rebuild the database;
- :mod:`~cldcb.node.durable`: replace a local file atomically, fsync a folder.

May import: the core, :mod:`cldcb.errors` and the standard library (files, sockets,
processes, sqlite3). Not the transport (a restore is handed its connection), the store
or the programs (``[tool.importlinter]``).
"""
