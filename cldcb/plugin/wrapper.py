"""The ``cldcb-plugin-wrapper`` file: how lightningd starts the plugin, and its configuration.

lightningd runs ``<lightning-dir>/<network>/cldcb-plugin-wrapper``, a
``/bin/sh`` script of mode 0700 owned by the owner of that folder. It holds
the client's secret key, so it never goes anywhere else: no command line,
no environment. Grammar (DESIGN section 5)::

    #!/bin/sh
    # cldcb-plugin-wrapper, written by cldcb-client: it holds a secret key.
    # cid = c3…
    # cpk = <64 hex digits>
    # node = 02…
    # database = lightningd.sqlite3
    # server = 203.0.113.5:29735 52…
    # server = ssh://cldcb@backup.example:22 53… ssh-ed25519 AAAA…
    # server = abcd…xyz.onion:29735 52… proxy=socks5://127.0.0.1:9050
    # quorum = 1
    # outage-limit = 300
    # mirror = off
    exec '/absolute/path/to/cldcb-plugin' "$0"

Rules of :func:`parse`:

- the first line is ``#!/bin/sh``; the last non-blank line is the ``exec``
  line, whose first word after ``exec`` is the absolute path of
  ``cldcb-plugin`` (shell-quoted) and whose only argument is ``"$0"``;
- configuration lines are ``# key = value``; other comment lines and blank
  lines are ignored; an unknown key is an error (a typo must not silently
  weaken the backup);
- ``cid``, ``cpk``, ``node`` and at least one ``server`` are required; ``cid``
  must be the client id of ``cpk``; keys appear once, except ``server``;
- ``server = ADDRESS SERVER_ID [HOST_KEY]``: ``HOST:PORT`` for a standalone
  ``cldcb-server serve`` (no host key), ``ssh://[USER@]HOST[:PORT]`` for
  OpenSSH sshd, which needs the pinned host key (``ssh-ed25519 AAAA…``);
  a last word ``proxy=socks5://HOST:PORT`` routes it through that SOCKS5
  proxy (:mod:`cldcb.proxy`); an onion address goes through Tor's usual
  SOCKS port when no proxy is named (``install`` writes it out anyway);
- ``database`` defaults to ``lightningd.sqlite3``, relative to the plugin's
  working directory (``<lightning-dir>/<network>``) unless absolute;
- ``quorum`` defaults to the number of servers (all), 1 ≤ quorum ≤ servers;
- ``outage-limit`` (seconds, > 0) defaults to 300, or 900 when a server
  is reached through a proxy (Tor);
- ``mirror`` is ``on`` (the default: the plugin keeps a local mirror of the
  database, see :mod:`cldcb.plugin.mirror`) or ``off`` (snapshots are copied
  from lightningd's database inside a hook call); it is written only when off.

Errors are :class:`~cldcb.errors.PluginError` naming the line; they never
quote the secret key. :func:`format_wrapper` writes exactly this grammar,
:func:`write_wrapper` replaces the file atomically with mode 0700.

A wrapper can be the only copy of a client key (the README tells users to
shred the key file), so a wrapper is never lost: :func:`write_wrapper` keeps
one that holds another client (or that cldcb cannot read) under
``cldcb-plugin-wrapper.replaced-YYYYMMDDTHHMMSSZ`` (a hard link made before
the new file is renamed over the old: mode and owner kept, never a moment
without it) and returns that path; callers ask before (see
:func:`other_holder`) and say where it went. A wrapper of the same client
is rewritten in place.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from cldcb.addresses import ServerAddress
from cldcb.connection import ServerSpec
from cldcb.durable import fsync_dir, replace_file
from cldcb.errors import CldcbError, KeyFormatError, PluginError, UsageError
from cldcb.ids import (
    check_privkey,
    client_id_from_pubkey,
    parse_client_id,
    parse_node_id,
    parse_server_id,
    pubkey_of,
)
from cldcb.programs import find_program
from cldcb.proxy import PROXIED, Proxy

WRAPPER_NAME = "cldcb-plugin-wrapper"
PENDING_NAME = WRAPPER_NAME + ".pending"
"""The wrapper of a client added on a server by an install that has not finished (see
:mod:`cldcb.client.install_ssh`): same grammar and mode, not in lightningd's config."""
DEFAULT_DATABASE = "lightningd.sqlite3"
DEFAULT_OUTAGE_LIMIT = 300.0
HEADER = "# cldcb-plugin-wrapper, written by cldcb-client: it holds a secret key."
_KEYS = ("cid", "cpk", "node", "database", "server", "quorum", "outage-limit", "mirror")
_CONFIG_LINE = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*$")
PROXY_WORD = "proxy="
_HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                   "ecdsa-sha2-nistp521", "ssh-rsa")


@dataclass(frozen=True)
class ServerEntry:
    """One ``server =`` line: where, which server id, (ssh://) the pinned host key, and
    the SOCKS5 proxy named for it."""

    address: str
    server_id: str
    host_key: str | None = None
    proxy: str | None = None

    @property
    def is_ssh(self) -> bool:
        return self.address.startswith("ssh://")

    def line_value(self) -> str:
        parts = [self.address, self.server_id]
        if self.host_key:
            parts.append(self.host_key)
        if self.proxy:
            parts.append(f"{PROXY_WORD}{self.proxy}")
        return " ".join(parts)

    @classmethod
    def of(cls, spec: ServerSpec) -> ServerEntry:
        """The line for ``spec``, with its route written out (an onion address's default
        proxy included, so that the plugin uses exactly the route that was checked)."""
        via = spec.route
        return cls(str(spec.address), spec.server_id, spec.host_key,
                   str(via) if via is not None else None)

    def route(self) -> Proxy | None:
        """The proxy the plugin connects through (None: direct)."""
        return self.spec().route

    def spec(self) -> ServerSpec:
        """The :class:`~cldcb.connection.ServerSpec` to connect with."""
        return ServerSpec(ServerAddress.parse(self.address), self.server_id, self.host_key,
                          Proxy.parse(self.proxy) if self.proxy else None)


@dataclass(frozen=True)
class WrapperConfig:
    """Everything the plugin needs, as written in the wrapper."""

    client_id: str
    client_priv: bytes = field(repr=False)
    node_id: str
    servers: tuple[ServerEntry, ...]
    database: str = DEFAULT_DATABASE
    quorum: int | None = None          # None: all servers
    outage_limit: float = DEFAULT_OUTAGE_LIMIT
    plugin_path: str = ""
    mirror: bool = True

    @property
    def effective_quorum(self) -> int:
        return self.quorum if self.quorum is not None else len(self.servers)

    def specs(self, proxy: Proxy | None = None) -> list[ServerSpec]:
        """The servers to connect to, each by its recorded route, or all through ``proxy``
        when one is given (``status --proxy``, ``verify --proxy``)."""
        specs = [s.spec() for s in self.servers]
        return specs if proxy is None else [replace(s, proxy=proxy) for s in specs]

    def database_path(self, cwd: Path) -> Path:
        p = Path(self.database)
        return p if p.is_absolute() else cwd / p

    def validate(self) -> WrapperConfig:
        """Check the values (the same checks :func:`parse` makes); return self."""
        try:
            parse_client_id(self.client_id)
        except KeyFormatError as exc:
            raise PluginError(f"wrapper: cid: {exc}") from None
        try:
            own = client_id_from_pubkey(pubkey_of(check_privkey(self.client_priv)))
        except KeyFormatError:
            raise PluginError("wrapper: cpk is not a valid secp256k1 private key") from None
        if own != self.client_id.lower():
            raise PluginError("wrapper: the cpk line is not the private key of the cid line; "
                              "write the wrapper again with `cldcb-client installplugin`")
        try:
            parse_node_id(self.node_id)
        except KeyFormatError as exc:
            raise PluginError(f"wrapper: node: {exc}") from None
        if not self.servers:
            raise PluginError("wrapper: no `server =` line; at least one server is needed")
        seen: set[str] = set()
        for s in self.servers:
            _check_server(s)
            if s.server_id.lower() in seen:
                raise PluginError(f"wrapper: server {s.server_id[:12]}… is listed twice")
            seen.add(s.server_id.lower())
        if self.quorum is not None and not 1 <= self.quorum <= len(self.servers):
            raise PluginError(f"wrapper: quorum {self.quorum} must be between 1 and the "
                              f"number of servers ({len(self.servers)})")
        if not self.outage_limit > 0:
            raise PluginError("wrapper: outage-limit must be a positive number of seconds")
        if not self.database or "\n" in self.database:
            raise PluginError("wrapper: database must be a file name")
        if self.plugin_path and not os.path.isabs(self.plugin_path):
            raise PluginError("wrapper: the exec line must name cldcb-plugin by an absolute path")
        return self


def _check_server(s: ServerEntry) -> None:
    try:
        parse_server_id(s.server_id)
    except KeyFormatError as exc:
        raise PluginError(f"wrapper: server {s.address}: {exc}") from None
    if s.proxy is not None:
        try:
            Proxy.parse(s.proxy)
        except CldcbError as exc:
            raise PluginError(f"wrapper: server {s.address}: {exc}") from None
    try:
        address = ServerAddress.parse(s.address)
    except UsageError as exc:
        raise PluginError(f"wrapper: {exc}") from None
    if address.scheme == "ssh":
        if not s.host_key:
            raise PluginError(f"wrapper: server {s.address} needs the pinned sshd host key "
                              "after its id (e.g. `ssh-ed25519 AAAA…`)")
        words = s.host_key.split()
        if len(words) != 2 or words[0] not in _HOST_KEY_TYPES:
            raise PluginError(f"wrapper: the host key of {s.address} must be "
                              "`TYPE BASE64` (e.g. `ssh-ed25519 AAAA…`)")
    elif s.host_key:
        raise PluginError(f"wrapper: server {s.address} is a cldcb daemon, whose host key "
                          "is its server id: remove the extra words after the id")


def parse(text: str) -> WrapperConfig:
    """Parse a wrapper's text (see the module docstring); raise PluginError."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "#!/bin/sh":
        raise PluginError("wrapper: the first line must be #!/bin/sh; this is not a "
                          "cldcb-plugin-wrapper")
    values: dict[str, str] = {}
    servers: list[ServerEntry] = []
    exec_line = None
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = _CONFIG_LINE.match(line)
            if not m:
                continue
            key, value = m.group(1).lower(), m.group(2)
            if key not in _KEYS:
                raise PluginError(f"wrapper line {number}: unknown setting {key!r} "
                                  f"(known: {', '.join(_KEYS)})")
            if key == "server":
                words = value.split()
                if len(words) < 2:
                    raise PluginError(f"wrapper line {number}: `server =` needs an address "
                                      "and a server id")
                proxy = None
                if len(words) > 2 and words[-1].startswith(PROXY_WORD):
                    proxy = words.pop()[len(PROXY_WORD):]
                servers.append(ServerEntry(words[0], words[1].lower(),
                                           " ".join(words[2:]) or None, proxy))
            elif key in values:
                raise PluginError(f"wrapper line {number}: {key} is set twice")
            else:
                values[key] = value
            continue
        if exec_line is not None:
            raise PluginError(f"wrapper line {number}: nothing may follow the exec line")
        exec_line = (number, line)
    for key in ("cid", "cpk", "node"):
        if key not in values:
            raise PluginError(f"wrapper: the `# {key} = …` line is missing")
    cpk = values["cpk"]
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", cpk):
        raise PluginError("wrapper: cpk must be 64 hex digits (the client's private key)")
    plugin_path = _parse_exec(exec_line)
    try:
        quorum = int(values["quorum"]) if "quorum" in values else None
    except ValueError:
        raise PluginError("wrapper: quorum must be a whole number") from None
    try:
        outage = float(values.get("outage-limit", default_outage_limit(servers)))
    except ValueError:
        raise PluginError("wrapper: outage-limit must be a number of seconds") from None
    mirror = values.get("mirror", "on").lower()
    if mirror not in ("on", "off"):
        raise PluginError(f"wrapper: mirror must be `on` or `off`, not {mirror!r}")
    cfg = WrapperConfig(client_id=values["cid"].lower(), client_priv=bytes.fromhex(cpk),
                        node_id=values["node"].lower(), servers=tuple(servers),
                        database=values.get("database", DEFAULT_DATABASE), quorum=quorum,
                        outage_limit=outage, plugin_path=plugin_path, mirror=mirror == "on")
    return cfg.validate()


def default_outage_limit(servers: list[ServerEntry] | tuple[ServerEntry, ...]) -> float:
    """300 s, or the proxied default (Tor) when any server is reached through a proxy."""
    try:
        proxied = any(s.route() is not None for s in servers)
    except CldcbError:
        proxied = False                     # validate() names the bad proxy
    return PROXIED.outage_limit if proxied else DEFAULT_OUTAGE_LIMIT


def _parse_exec(exec_line: tuple[int, str] | None) -> str:
    if exec_line is None:
        raise PluginError("wrapper: the `exec '/path/to/cldcb-plugin' \"$0\"` line is missing")
    number, line = exec_line
    try:
        words = shlex.split(line, posix=True)
    except ValueError as exc:
        raise PluginError(f"wrapper line {number}: the exec line does not parse ({exc})") from None
    if len(words) != 3 or words[0] != "exec" or words[2] != "$0" or not line.endswith('"$0"'):
        raise PluginError(f"wrapper line {number}: expected exec '/path/to/cldcb-plugin' \"$0\"")
    if not os.path.isabs(words[1]):
        raise PluginError(f"wrapper line {number}: the exec line must name cldcb-plugin by an "
                          "absolute path")
    return words[1]


def format_wrapper(cfg: WrapperConfig) -> str:
    """The wrapper's text for ``cfg`` (validated first)."""
    cfg.validate()
    if not cfg.plugin_path:
        raise PluginError("wrapper: the path of cldcb-plugin is not known")
    lines = ["#!/bin/sh", HEADER,
             f"# cid = {cfg.client_id.lower()}",
             f"# cpk = {cfg.client_priv.hex()}",
             f"# node = {cfg.node_id.lower()}",
             f"# database = {cfg.database}"]
    lines += [f"# server = {s.line_value()}" for s in cfg.servers]
    if cfg.quorum is not None:
        lines.append(f"# quorum = {cfg.quorum}")
    limit = cfg.outage_limit
    lines.append(f"# outage-limit = {int(limit) if limit == int(limit) else limit}")
    if not cfg.mirror:
        lines.append("# mirror = off")
    lines.append(f"exec {shlex.quote(cfg.plugin_path)} \"$0\"")
    return "\n".join(lines) + "\n"


def default_plugin_path() -> str:
    """The absolute path of the installed ``cldcb-plugin`` program."""
    found = find_program("cldcb-plugin")
    if found is None:
        raise PluginError("cannot find the cldcb-plugin program: install cldcb so that it is "
                          "on PATH, or beside the Python that runs cldcb-client")
    return found


def other_holder(path: Path, client_id: str) -> str | None:
    """What the wrapper at ``path`` holds when it is not ``client_id``'s (``client c3…``,
    or ``a file cldcb cannot read``); None when there is none or it is that client's."""
    if not os.path.lexists(path):
        return None
    try:
        old = read_wrapper(path).client_id
    except CldcbError:
        return "a file cldcb cannot read (perhaps a client key)"
    return None if old == client_id.lower() else f"client {old}"


def _keep_aside(path: Path) -> Path:
    """Hard-link the wrapper at ``path`` to a free ``.replaced-<UTC time>`` name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(100):
        aside = path.with_name(f"{path.name}.replaced-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.link(path, aside)
        except FileExistsError:
            continue
        fsync_dir(path.parent)
        return aside
    raise PluginError(f"cannot find a free name to keep {path} under: move the "
                      f"{path.name}.replaced-* files away and run again")


def write_wrapper(path: Path, cfg: WrapperConfig) -> Path | None:
    """Replace ``path`` atomically with the wrapper of ``cfg``: mode 0700, owned by the
    owner of its folder, fsynced (file and folder). A wrapper there that holds another
    client is kept aside first; returns where (None when there was nothing to keep)."""
    text = format_wrapper(cfg)
    folder = path.parent
    st = folder.stat()
    owner = (st.st_uid, st.st_gid) if (st.st_uid, st.st_gid) != (0, 0) else None
    kept = _keep_aside(path) if other_holder(path, cfg.client_id) else None
    replace_file(path, text, mode=0o700, owner=owner)
    return kept


def read_wrapper(path: Path) -> WrapperConfig:
    """Read and parse the wrapper at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise PluginError(f"cannot read the wrapper {path}: {reason}") from None
    try:
        return parse(text)
    except PluginError as exc:
        raise PluginError(f"{path}: {exc}") from None
    except CldcbError as exc:  # pragma: no cover - every check is wrapped above
        raise PluginError(f"{path}: {exc}") from None


def exposed(path: Path) -> bool:
    """True when the wrapper (which holds a secret key) is readable by group or others."""
    try:
        return bool(Path(path).stat().st_mode & 0o077)
    except OSError:
        return False
