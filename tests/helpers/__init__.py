"""What the tests and the benches share: the parts they start and the data they use.

A package (``tests`` is on the import path: pytest's ``pythonpath`` setting, and a
program in ``tests/`` such as ``demo.py`` has its own folder there), imported as
``helpers.NAME``:

- :mod:`helpers.environment`: the test data folder, ``CI=true``, required programs;
- :mod:`helpers.servers`: ``cldcb-server serve`` and a private OpenSSH sshd, free ports;
- :mod:`helpers.simlightningd`, :mod:`helpers.simrpc`: the simulated lightningd;
- :mod:`helpers.plugin_harness`: a node, its keys and servers, what the servers hold;
- :mod:`helpers.realcln`: real Core Lightning nodes on a fake chain;
- :mod:`helpers.traces`: the recorded ``db_write`` traces and their expected dumps;
- :mod:`helpers.socks5`, :mod:`helpers.tornet`, :mod:`helpers.listener`,
  :mod:`helpers.faultproxy`: proxies, a private Tor network, a TCP fault injector;
- :mod:`helpers.installkit`, :mod:`helpers.entries`, :mod:`helpers.readme_tables`,
  :mod:`helpers.echo`;
- :mod:`helpers.markers`: the ``e2e`` marker and the guard of the unit tests.

The programs the tests start (``demo.py``, ``hsmd_double.py``, ``evil_server.py``, …)
stay in ``tests/``, each runnable as ``python tests/NAME.py``.
"""
