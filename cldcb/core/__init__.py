"""The pure core: cldcb's rules and formats, with no I/O.

What belongs here: code that turns bytes and values into bytes and values.

- :mod:`~cldcb.core.ids`: node, client and server ids;
- :mod:`~cldcb.core.wire`: the wire codec; :mod:`~cldcb.core.session`: the sans-IO
  protocol sessions; :mod:`~cldcb.core.answermac`: the MAC of every acknowledgement;
- :mod:`~cldcb.core.dataversion`: the data_version rules;
- :mod:`~cldcb.core.seal`: sealing to the node key;
  :mod:`~cldcb.core.recognition`: recognition entries;
- :mod:`~cldcb.core.signmessage`: Lightning's signmessage;
  :mod:`~cldcb.core.hsm_secret`: the ``hsm_secret`` formats;
  :mod:`~cldcb.core.hsmd_wire`: the hsmd messages recovery needs;
- :mod:`~cldcb.core.addresses`: the grammar of a server address;
- :mod:`~cldcb.core.remote_text`: a remote party's text made safe to show.

No socket, file, process, clock or database here: the sessions and sealing take their
nonces, keys and times as parameters (only :func:`~cldcb.core.ids.new_privkey` draws
from :mod:`secrets`); the transports, the store and the programs feed the core.

May import: the standard library's pure parts, the crypto libraries (coincurve,
cryptography, PyNaCl), :mod:`cldcb.errors` and the core itself. Nothing else of cldcb
and no I/O library (``[tool.importlinter]`` in pyproject.toml checks it).
"""
