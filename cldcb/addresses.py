"""A server's address: the one grammar of ``--server`` and of the wrapper's ``server =``
lines.

- ``HOST:PORT``: a standalone ``cldcb-server serve``; the port is required.
- ``ssh://[USER@]HOST[:PORT]``: OpenSSH sshd with the ``cldcb`` subsystem; the port is 22
  unless given; the user name holds no ``@``, ``/`` or white space.

HOST is a name or an IPv4 address, or an IPv6 address in brackets; a port is 1 to 65535,
at most five digits. Surrounding white space is ignored; control characters are refused
(and shown escaped). Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cldcb.errors import UsageError
from cldcb.remote_text import escape_remote

DEFAULT_PORT = 29735
"""The port of a standalone ``cldcb-server serve`` (suggested when none is given)."""

_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:/@\s\[\]]+))"
                       r"(?::(?P<port>\d{1,5}))?$")
_USER = re.compile(r"^[^@\s/]+$")


@dataclass(frozen=True)
class ServerAddress:
    """Where a server is: ``HOST:PORT`` (daemon) or ``ssh://[USER@]HOST[:PORT]`` (sshd)."""

    scheme: str          # "cldcb" or "ssh"
    host: str
    port: int
    user: str | None = None

    @classmethod
    def parse(cls, text: str) -> ServerAddress:
        raw = text.strip()
        if not raw.isprintable():
            raise UsageError(f"server address {escape_remote(text)} holds control "
                             "characters: give HOST:PORT or ssh://[USER@]HOST[:PORT]")
        scheme, rest, user = "cldcb", raw, None
        if raw.startswith("ssh://"):
            scheme, rest = "ssh", raw[len("ssh://"):].rstrip("/")
            if "@" in rest:
                user, rest = rest.rsplit("@", 1)
                if not user:
                    raise UsageError(f"server address {text!r} has an empty user name")
                if not _USER.match(user):
                    raise UsageError(f"server address {text!r}: the user name may not hold "
                                     "'@', '/' or spaces")
        m = _HOSTPORT.match(rest)
        if not m:
            raise UsageError(f"server address {text!r} is neither HOST:PORT nor "
                             "ssh://[USER@]HOST[:PORT]")
        host = m.group("v6") or m.group("host")
        port_s = m.group("port")
        if port_s is None:
            if scheme == "cldcb":
                raise UsageError(f"server address {text!r} needs a port (HOST:PORT), "
                                 f"e.g. {host}:{DEFAULT_PORT}")
            port = 22
        else:
            port = int(port_s)
        if not 0 < port < 65536:
            raise UsageError(f"server address {text!r} has an invalid port")
        return cls(scheme, host, port, user)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "ssh":
            who = f"{self.user}@" if self.user else ""
            return f"ssh://{who}{host}:{self.port}"
        return f"{host}:{self.port}"
