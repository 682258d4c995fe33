"""``cldcb-server systemd-unit`` and ``cldcb-server sshd-config``: the host's files, made
for this host.

systemd and sshd start the server from a command written in their configuration, so
that command must name the program by an absolute path (never what some session's PATH
finds first) and the data directory explicitly. Both commands print a file for the
program now running (:meth:`~cldcb.server.cli.ServerContext.command`: its absolute path
and ``--data-dir``) and the account that runs it (``--user``, default ``cldcb``):

- :func:`systemd_unit`: the standalone daemon (``serve --listen``) as a hardened
  service; ``ReadWritePaths`` is the data directory, ``StateDirectory`` when that is
  ``/var/lib/NAME``, ``ProtectHome=read-only`` instead of ``yes`` when the program or
  the data lives under a home directory;
- :func:`sshd_config`: the ``Subsystem cldcb`` line and a ``Match User`` block that
  gives that account's sessions the same data directory, plus, as comments, the
  ``authorized_keys`` lines that account takes.

``systemd/cldcb-server.service`` and ``ssh/sshd_config.d-cldcb.conf`` are these files
for the documented install (``/opt/cldcb/bin/cldcb-server``, ``/var/lib/cldcb``,
account ``cldcb``); ``tests/test_hostfiles.py`` keeps them equal.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import PurePosixPath

import click

from cldcb.cli.programs import running_server_command
from cldcb.errors import UsageError
from cldcb.server.cli import ServerContext, main, parse_host_port, pass_server

DEFAULT_USER = "cldcb"
DEFAULT_LISTEN = "0.0.0.0:29735"
_HOMES = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"))


def _under_home(path: str) -> bool:
    p = PurePosixPath(path)
    return any(p == h or h in p.parents for h in _HOMES)


def systemd_unit(command: str, data_dir: str, user: str, listen: str) -> str:
    """The unit file of the daemon run by ``command`` (program and ``--data-dir``)."""
    program = shlex.split(command)[0]
    protect_home = ("read-only" if _under_home(program) or _under_home(data_dir) else "yes")
    data = PurePosixPath(data_dir)
    state = (f"StateDirectory={data.name}\nStateDirectoryMode=0700\n"
             if data.parent == PurePosixPath("/var/lib") else "")
    return f"""\
# cldcb standalone daemon, as `cldcb-server systemd-unit` writes it for this host.
# Install (as root):
#   useradd --system --home-dir {data_dir} --create-home --shell /bin/sh {user}
#   runuser -u {user} -- {command} init --public-address HOST:PORT
#   {program} --data-dir {data_dir} systemd-unit \\
#       > /etc/systemd/system/cldcb-server.service
#   systemctl daemon-reload && systemctl enable --now cldcb-server
[Unit]
Description=cldcb backup server for Core Lightning nodes
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
Environment=CLDCB_SERVER_DIR={data_dir}
ExecStart={command} serve --listen {listen}
# SIGTERM: stop accepting, finish in-flight fsyncs, never ack anything unsynced
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=5

# What a flood can make it hold. The daemon also bounds connections itself
# (defaults shown; see cldcb/server/admission.py), well below LimitNOFILE:
#Environment=CLDCB_SERVER_MAX_CONNECTIONS=1000
#Environment=CLDCB_SERVER_MAX_UNAUTHENTICATED=100
#Environment=CLDCB_SERVER_MAX_PER_SOURCE=10
#Environment=CLDCB_SERVER_CHANNELS_PER_CONNECTION=1
#Environment=CLDCB_SERVER_IDLE_TIMEOUT=3600
#Environment=CLDCB_SERVER_ANONYMOUS_IDLE_TIMEOUT=60
LimitNOFILE=8192
MemoryHigh=384M
MemoryMax=512M
TasksMax=64

# hardening
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir}
{state}PrivateTmp=yes
PrivateDevices=yes
ProtectHome={protect_home}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=no
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def sshd_config(command: str, data_dir: str, user: str) -> str:
    """The sshd drop-in that serves the ``cldcb`` subsystem with ``command``."""
    program = shlex.split(command)[0]
    return f"""\
# cldcb behind OpenSSH sshd, as `cldcb-server sshd-config` writes it for this host.
# Install (as root):
#   useradd --system --home-dir {data_dir} --create-home --shell /bin/sh {user}
#   runuser -u {user} -- {command} init
#   install -d -m 0700 -o {user} -g {user} {data_dir}/.ssh
#   {program} --data-dir {data_dir} sshd-config > /etc/ssh/sshd_config.d/cldcb.conf
#   sshd -t && systemctl reload ssh
# then put the lines below into {data_dir}/.ssh/authorized_keys (mode 0600, owned by
# {user}); never a line without restrict,command="…" (it would give a shell as {user}):
#   a client:      the line `cldcb-client sshkey` prints (or `install --ssh` adds), i.e.
#                  restrict,command="{command} stdio --client c3…" ssh-ed25519 AAAA…
#   a setup key:   restrict,command="{command} forced --allow add" ssh-ed25519 AAAA… you@pc
#   recovery only: restrict,command="{command} stdio" ssh-ed25519 AAAA… you@pc
#
# sshd refuses a subsystem request it has no Subsystem line for, even for a
# forced-command key, so this line is always needed. It must be at top level
# (not inside Match).
Subsystem cldcb {command} stdio

Match User {user}
    # every entry point finds the same data
    SetEnv CLDCB_SERVER_DIR={data_dir}
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    PubkeyAuthentication yes
    AllowTcpForwarding no
    AllowStreamLocalForwarding no
    AllowAgentForwarding no
    X11Forwarding no
    PermitTTY no
    PermitTunnel no
    PermitUserRC no
    GatewayPorts no
    # detect dead clients (a plugin whose node vanished)
    ClientAliveInterval 30
    ClientAliveCountMax 4
"""


_USER = click.option("--user", default=DEFAULT_USER, show_default=True,
                     help="The account that runs the server (owns the data directory).")
_ACCOUNT = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _checked(server: ServerContext, user: str) -> tuple[str, str]:
    """(command, data dir) fit for a systemd or sshd file; a UsageError if not."""
    if not _ACCOUNT.match(user):
        raise UsageError(f"--user must be an account name like cldcb, got {user!r}")
    data_dir = os.path.abspath(server.data_dir)
    for part in [*running_server_command(), data_dir]:
        if any(c.isspace() or c in "\"'\\%$" for c in part):
            raise UsageError(f"{part!r} has spaces, quotes or other characters that systemd "
                             "and sshd read differently: install cldcb, and give --data-dir, "
                             "where the path has none")
    return server.command(), data_dir


@main.command("systemd-unit")
@_USER
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="What `serve` listens on.")
@pass_server
def systemd_unit_command(server: ServerContext, user: str, listen: str) -> None:
    """Print a systemd unit that runs this cldcb-server (absolute path) on its data dir."""
    parse_host_port(listen, "--listen")
    command, data_dir = _checked(server, user)
    click.echo(systemd_unit(command, data_dir, user, listen), nl=False)


@main.command("sshd-config")
@_USER
@pass_server
def sshd_config_command(server: ServerContext, user: str) -> None:
    """Print an sshd_config drop-in that serves this cldcb-server (absolute path)."""
    command, data_dir = _checked(server, user)
    click.echo(sshd_config(command, data_dir, user), nl=False)
