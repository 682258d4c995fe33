"""SSH transport: the client's way to a cldcb server.

- :mod:`~cldcb.transport.connection`: the client end of a connection (asyncssh,
  standalone daemon or OpenSSH sshd), driving a :mod:`cldcb.core.session`;
- :mod:`~cldcb.transport.keepalive`: SSH keepalives that cost nothing while data flows;
- :mod:`~cldcb.transport.proxy`: the route through a SOCKS5 proxy (Tor) and its patience;
- :mod:`~cldcb.transport.sshkeys`: SSH keys made from cldcb's secp256k1 keys.

May import: the core, :mod:`cldcb.errors`, asyncssh, python-socks and the standard
library. Not the store, node-side I/O or the programs (``[tool.importlinter]``).
"""
