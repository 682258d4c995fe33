"""The admin's SSH login for the single-step setup, with paramiko (DESIGN section 2).

``cldcb-client install --ssh [USER@]HOST[:PORT]`` logs in the way ``ssh``
would and runs ``cldcb-server add CLIENT_ID --json`` there:

- the OpenSSH client config (``~/.ssh/config``, or ``--ssh-config``) is looked
  up for HOST: ``HostName``, ``User``, ``Port``, ``IdentityFile``,
  ``IdentitiesOnly``, ``ProxyCommand``, ``UserKnownHostsFile``;
- host keys come from known_hosts (``load_system_host_keys``: the user's file,
  the config's ``UserKnownHostsFile`` and ``/etc/ssh/ssh_known_hosts``). A known
  host with another key is refused. An unknown host is rejected
  (:class:`ConfirmUnknownHost` is a RejectPolicy) unless it is confirmed
  explicitly: by typing ``yes`` on a terminal after its SHA256 fingerprint was
  shown, or by ``--accept-host-key SHA256:…`` naming exactly that fingerprint.
  ``--yes`` is not enough: it answers questions about this node, not "is this
  the right server". A confirmed key is added to known_hosts, and said so;
  nothing is added silently;
- authentication: the config's identity files (their passphrase asked for on a
  terminal), the agent and the default ``~/.ssh/id_*`` keys (unless
  ``IdentitiesOnly``), then keyboard-interactive and password prompts (getpass)
  when stdin is a terminal;
- the socket is opened here with TCP_NODELAY; without a ``ProxyCommand``, it
  goes through the SOCKS5 proxy given (``install --proxy``, and always for an
  onion host: :mod:`cldcb.transport.proxy`), which resolves the host name.

Secrets typed here (passwords, key passphrases) go to paramiko only: never
to a command line, the environment or a log.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shlex
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import paramiko
from paramiko.auth_strategy import AuthStrategy
from paramiko.ssh_exception import PartialAuthentication

from cldcb.core.ids import parse_server_id
from cldcb.core.remote_text import escape_remote
from cldcb.errors import AuthError, CldcbError, TransportError, UsageError
from cldcb.transport.proxy import PROXIED, Proxy, route

DEFAULT_CONFIG = "~/.ssh/config"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
TIMEOUT = 20.0
logging.getLogger("paramiko").addHandler(logging.NullHandler())
"""paramiko logs what fails in its own thread (with the peer's texts, raw) and raises it
too: with no handler of the program's, Python would print those lines on stderr. The
exception is shown (escaped) instead."""
_TARGET = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|"
                     r"(?P<host>[^:@\s\[\]/]+))(?::(?P<port>\d{1,5}))?$")
Echo = Callable[[str], None]


@dataclass(frozen=True)
class SshTarget:
    """``[USER@]HOST[:PORT]`` as given to ``--ssh`` (HOST may be a config alias)."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> SshTarget:
        m = _TARGET.match(text.strip())
        port = int(m.group("port")) if m and m.group("port") else None
        if not m or (port is not None and not 0 < port < 65536):
            raise UsageError(f"--ssh {text!r} is not [USER@]HOST[:PORT]")
        return cls(m.group("v6") or m.group("host"), m.group("user"), port)


@dataclass
class ResolvedTarget:
    """The target after the OpenSSH client config was applied."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: list[str] = field(default_factory=list)
    identities_only: bool = False
    proxy_command: str | None = None
    known_hosts: list[str] = field(default_factory=list)

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this host (``[host]:port`` off port 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def resolve(target: SshTarget, config_path: Path | None = None) -> ResolvedTarget:
    """Apply the OpenSSH client config (``config_path``, default ~/.ssh/config)."""
    path = Path(os.path.expanduser(str(config_path or DEFAULT_CONFIG)))
    if config_path is not None and not path.is_file():
        raise UsageError(f"--ssh-config {config_path} does not exist")
    try:
        config = paramiko.SSHConfig.from_path(str(path)) if path.is_file() else None
    except (OSError, paramiko.ConfigParseError) as exc:
        raise UsageError(f"cannot read the SSH config {path}: {exc}") from None
    opts: dict[str, Any] = config.lookup(target.host) if config else {}
    if opts.get("proxyjump", "none").lower() != "none":
        raise UsageError(f"the SSH config sets ProxyJump for {target.host}, which cldcb does "
                         "not follow: use `ProxyCommand ssh -W %h:%p JUMPHOST` instead")
    proxy = opts.get("proxycommand")
    known = [os.path.expanduser(p) for p in
             str(opts.get("userknownhostsfile", DEFAULT_KNOWN_HOSTS)).split()]
    try:
        port = target.port or int(opts.get("port", 22))
    except ValueError:
        raise UsageError(f"the SSH config gives {target.host} an invalid Port") from None
    return ResolvedTarget(
        alias=target.host, hostname=str(opts.get("hostname", target.host)), port=port,
        user=target.user or str(opts.get("user") or getpass.getuser()),
        identity_files=[os.path.expanduser(p) for p in opts.get("identityfile", [])],
        identities_only=str(opts.get("identitiesonly", "no")).lower() == "yes",
        proxy_command=None if not proxy or proxy.lower() == "none" else str(proxy),
        known_hosts=known)


def host_key_line(key: paramiko.PKey) -> str:
    """``TYPE BASE64`` of a host key, as the wrapper records it."""
    return f"{key.get_name()} {key.get_base64()}"


def same_fingerprint(given: str, actual: str) -> bool:
    g = given.strip()
    if not g.upper().startswith("SHA256:"):
        g = "SHA256:" + g
    return g[7:].rstrip("=") == actual[7:] and bool(g[7:])


class ConfirmUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy, except for a host key the operator confirms explicitly."""

    def __init__(self, accept: str | None, interactive: bool, save_to: Path,
                 echo: Echo) -> None:
        self.accept = accept
        self.interactive = interactive
        self.save_to = save_to
        self.echo = echo

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        fp, kind = key.fingerprint, key.get_name()
        if self.accept is not None:
            if not same_fingerprint(self.accept, fp):
                raise AuthError(f"the SSH host key of {hostname} has the fingerprint {fp}, "
                                f"not {self.accept} as given to --accept-host-key: stopped, "
                                "nothing was changed (another host, or someone in the middle)")
        elif self.interactive:
            self.echo(f"The SSH host key of {hostname} is not in known_hosts.\n"
                      f"Its {kind} fingerprint is {fp}.\n"
                      "Compare it with the server's own (`ssh-keygen -lf "
                      "/etc/ssh/ssh_host_ed25519_key.pub` there).")
            answer = click.prompt("Type yes if it is the same, anything else to stop",
                                  default="", show_default=False, err=True)
            if answer.strip().lower() != "yes":
                raise AuthError(f"stopped: the host key of {hostname} was not confirmed; "
                                "nothing was changed")
        else:  # RejectPolicy's answer, with what to do about it
            raise AuthError(
                f"the SSH host key of {hostname} is unknown (not in known_hosts); its {kind} "
                f"fingerprint is {fp}. Check it against the server's own, then run again on "
                f"a terminal to confirm it, or give --accept-host-key {fp}. Nothing was "
                "changed")
        client.get_host_keys().add(hostname, kind, key)
        _append_known_host(self.save_to, hostname, key)
        self.echo(f"added the host key of {hostname} ({fp}) to {self.save_to}")


def _append_known_host(path: Path, hostname: str, key: paramiko.PKey) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="ascii") as f:
            f.write(f"{hostname} {host_key_line(key)}\n")
    except OSError as exc:
        raise TransportError(f"cannot add the host key to {path}: {exc.strerror or exc}") from None


class _Login(AuthStrategy):
    """Keys (config, agent, defaults), then keyboard-interactive and password prompts."""

    def __init__(self, target: ResolvedTarget, interactive: bool, echo: Echo) -> None:
        super().__init__(ssh_config=None)
        self.target = target
        self.interactive = interactive
        self.echo = echo
        self.tried: list[str] = []

    def _keys(self) -> Iterator[tuple[str, paramiko.PKey]]:
        for path in self.target.identity_files:
            key = self._load(path)
            if key is not None:
                yield path, key
        if self.target.identities_only:
            return
        agent = paramiko.Agent()
        try:
            for key in agent.get_keys():
                yield f"agent key {key.fingerprint}", key
        finally:
            agent.close()
        if not self.target.identity_files:
            for path in DEFAULT_KEYS:
                key = self._load(os.path.expanduser(path), quiet=True)
                if key is not None:
                    yield path, key

    def _load(self, path: str, quiet: bool = False) -> paramiko.PKey | None:
        if not os.path.isfile(path):
            if not quiet:
                self.echo(f"note: identity file {path} does not exist")
            return None
        try:
            return paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            if not self.interactive:
                self.echo(f"note: {path} is encrypted and stdin is not a terminal to ask "
                          "for its passphrase: skipped (an agent would hold it unlocked)")
                return None
            try:
                return paramiko.PKey.from_path(
                    path, getpass.getpass(f"Enter passphrase for key '{path}': "))
            except (paramiko.SSHException, ValueError):
                self.echo(f"note: wrong passphrase for {path}: skipped")
                return None
        except (OSError, ValueError, paramiko.SSHException) as exc:
            self.echo(f"note: cannot use identity file {path}: {exc}")
            return None

    def authenticate(self, transport: paramiko.Transport) -> list[Any]:
        user = self.target.user
        try:
            return list(transport.auth_none(user))
        except paramiko.BadAuthenticationType as exc:
            allowed = list(exc.allowed_types)
        if "publickey" in allowed:
            for label, key in self._keys():
                if not transport.is_active():
                    break
                try:
                    return list(transport.auth_publickey(user, key))
                except PartialAuthentication as partial:
                    allowed = list(partial.allowed_types)
                    break
                except paramiko.AuthenticationException:
                    self.tried.append(label)
        if self.interactive and transport.is_active():
            if "keyboard-interactive" in allowed:
                for _ in range(3):
                    try:
                        return list(transport.auth_interactive(user, self._kbdint))
                    except paramiko.AuthenticationException:
                        self.echo("Permission denied, please try again.")
                self.tried.append("keyboard-interactive")
            elif "password" in allowed:
                prompt = f"{user}@{self.target.hostname}'s password: "
                for _ in range(3):
                    try:
                        return list(transport.auth_password(user, getpass.getpass(prompt)))
                    except paramiko.AuthenticationException:
                        self.echo("Permission denied, please try again.")
                self.tried.append("password")
        tried = ", ".join(self.tried) or "no key was found"
        hint = ("" if self.interactive else "; password and keyboard-interactive logins "
                "need a terminal")
        allows = escape_remote(", ".join(allowed))
        raise AuthError(f"SSH login as {user} to {self.target.hostname}:{self.target.port} "
                        f"failed (server allows: {allows}; tried: {tried}){hint}")

    def _kbdint(self, title: str, instructions: str,
                prompts: list[tuple[str, bool]]) -> list[str]:
        for text in (title, instructions):
            if text:
                self.echo(escape_remote(text))
        return [input(escape_remote(p)) if echo else getpass.getpass(escape_remote(p))
                for p, echo in prompts]


@dataclass(frozen=True)
class Added:
    """What ``cldcb-server add CLIENT_ID --json`` answered."""

    client_id: str
    server_id: str
    public_address: str | None
    #: the command that runs cldcb-server on that host, as it reported it (absolute
    #: paths); None from an older server or one that reported something unusable
    server_command: str | None = None


class SetupConnection:
    """The admin's SSH session to the server host (a context manager)."""

    def __init__(self, target: ResolvedTarget, *, accept_host_key: str | None,
                 interactive: bool, echo: Echo, proxy: Proxy | None = None) -> None:
        self.target = target
        self.proxy = proxy
        self.interactive = interactive
        self.echo = echo
        self.accept_host_key = accept_host_key
        self.client = paramiko.SSHClient()
        self.host_key: str = ""

    def __enter__(self) -> SetupConnection:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def _socket(self) -> Any:
        t = self.target
        if t.proxy_command:
            return paramiko.ProxyCommand(t.proxy_command)
        via = route(t.hostname, self.proxy)
        if via is not None:
            sock = via.connect_sync(t.hostname, t.port, PROXIED.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        try:
            sock = socket.create_connection((t.hostname, t.port), timeout=TIMEOUT)
        except OSError as exc:
            raise TransportError(f"cannot connect to {t.hostname}:{t.port}: "
                                 f"{exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def connect(self) -> None:
        t = self.target
        self.client.load_system_host_keys()
        for path in [*t.known_hosts, GLOBAL_KNOWN_HOSTS]:
            if os.path.isfile(path):
                self.client.load_system_host_keys(path)
        save_to = Path(t.known_hosts[0] if t.known_hosts else
                       os.path.expanduser(DEFAULT_KNOWN_HOSTS))
        self.client.set_missing_host_key_policy(
            ConfirmUnknownHost(self.accept_host_key, self.interactive, save_to, self.echo))
        sock = self._socket()
        try:
            wait = TIMEOUT if route(t.hostname, self.proxy) is None else PROXIED.connect_timeout
            self.client.connect(t.hostname, t.port, username=t.user, sock=sock,
                                timeout=wait, banner_timeout=wait, auth_timeout=wait,
                                auth_strategy=_Login(t, self.interactive, self.echo))
        except CldcbError:
            self.client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            self.client.close()
            raise AuthError(
                f"the SSH host key of {t.known_hosts_name} is NOT the one in known_hosts "
                f"(it shows {exc.key.fingerprint}): stopped, nothing was changed. This is "
                "another host or someone in the middle; if its key really changed, remove "
                f"the old line (ssh-keygen -R '{t.known_hosts_name}') and try again") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.client.close()
            raise TransportError(f"SSH to {t.hostname}:{t.port} failed: "
                                 f"{escape_remote(str(exc))}") from None
        transport = self.client.get_transport()
        assert transport is not None
        self.host_key = host_key_line(transport.get_remote_server_key())

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, str, str]:
        """Run ``command`` on the host: (exit status, stdout, stderr)."""
        try:
            stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            stdin.close()
            out = stdout.read().decode("utf-8", "replace")
            err = stderr.read().decode("utf-8", "replace")
            return stdout.channel.recv_exit_status(), out, err
        except (OSError, paramiko.SSHException) as exc:
            raise TransportError(f"running a command on {self.target.hostname} failed: "
                                 f"{escape_remote(str(exc))}") from None

    def add_client(self, client_id: str, server_command: str) -> Added:
        """``cldcb-server add CLIENT_ID --json`` on the host (also through a forced
        ``cldcb-server forced --allow add`` key)."""
        status, out, err = self.run(f"{server_command} add {client_id} --json")
        if status != 0:
            raise TransportError(f"`cldcb-server add` failed on {self.target.hostname} "
                                 f"(exit {status}): {_last_line(err or out)}")
        for line in reversed(out.splitlines()):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("client_id") == client_id:
                server_id = escape_remote(str(data.get("server_id", "")))
                parse_server_id(server_id)
                public = data.get("public_address")
                return Added(client_id, server_id.lower(),
                             public if isinstance(public, str) and public else None,
                             _forced_command(data.get("server_command")))
        raise TransportError(f"`cldcb-server add --json` on {self.target.hostname} did not "
                             "print the expected JSON: is cldcb-server up to date there?")

    def authorize(self, line: str) -> str | None:
        """Append ``line`` (once) to the account's authorized_keys file where sshd reads it
        (:data:`_AUTHORIZE`), if the account has a shell; returns where, in words, or None
        if it cannot (e.g. a forced-command key)."""
        status, out, _ = self.run(f"sh -c {shlex.quote(_AUTHORIZE)} sh {shlex.quote(line)}")
        for row in reversed(out.splitlines()):
            words = row.split(" ", 2)
            if status == 0 and len(words) == 3 and words[0] == "cldcb-authorized":
                how = {"sshd": "as `sshd -T` names it", "config":
                       "as AuthorizedKeysFile in sshd_config names it"}.get(
                           words[1], "sshd's default; its config could not be read")
                return f"{escape_remote(words[2])} ({how})"
        return None


_AUTHORIZE = r"""umask 077; line=$1; cfg=/etc/ssh/sshd_config; bin=sshd; p=$$
while [ "${p:-1}" -gt 1 ] 2>/dev/null; do
  set -- $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)
  [ "$1" = sshd: ] && shift
  case "$1" in */sshd|sshd) bin=$1
    while [ $# -gt 1 ]; do [ "$1" = -f ] && cfg=$2; shift; done; break;; esac
  p=$(awk '{print $4}' /proc/$p/stat 2>/dev/null)
done
me=$(id -un); how=sshd
files=$("$bin" -T -f "$cfg" -C "user=$me,host=localhost,addr=127.0.0.1" 2>/dev/null |
  awk 'tolower($1)=="authorizedkeysfile"{$1="";print;exit}')
if [ -z "$files" ]; then how=config
  files=$(awk 'tolower($1)=="match"{exit} tolower($1)=="authorizedkeysfile"{$1="";print;exit}' \
    "$cfg" 2>/dev/null); fi
if [ -z "$files" ]; then how=default; files=.ssh/authorized_keys; fi
set -- $files; [ "$1" = none ] && exit 3
for a in "$@"; do
  f=$(printf '%s' "$a" | sed "s|%h|$HOME|g; s|%u|$me|g; s|%U|$(id -u)|g; s|%%|%|g")
  case "$f" in /*) ;; *) f=$HOME/$f;; esac
  d=$(dirname "$f")
  if [ -e "$f" ] && [ ! -w "$f" ]; then continue; fi
  mkdir -p "$d" 2>/dev/null && [ -w "$d" ] || [ -w "$f" ] || continue
  touch "$f" && { grep -qxF "$line" "$f" || printf '%s\n' "$line" >> "$f"; } &&
    echo "cldcb-authorized $how $f" && exit 0
done
exit 4
"""
"""Add the line to the first file of sshd's ``AuthorizedKeysFile`` for this account that
it may write:
from ``sshd -T`` (exact, with Match blocks, when the account may run it), else the
top of the config file of the sshd serving this session (its ``-f``, found through
/proc: the listener shows itself as ``sshd: /usr/sbin/sshd -f FILE …``), else
``~/.ssh/authorized_keys``. Prints ``cldcb-authorized HOW FILE``."""


def _forced_command(value: object) -> str | None:
    """A reported server command fit for an ``authorized_keys`` ``command="…"``: an
    absolute path first, nothing that could end the quoted string or the line."""
    if not isinstance(value, str) or not value.startswith("/"):
        return None
    if any(c in value for c in '"\\') or escape_remote(value) != value:
        return None
    return value


def _last_line(text: str) -> str:
    """The last line of a command's output on the server host, to show: escaped, and cut
    at newlines only (a carriage return in it is shown, not obeyed)."""
    lines = [x.removesuffix("\r") for x in text.split("\n") if x.strip()]
    return escape_remote(lines[-1]) if lines else "no message"
