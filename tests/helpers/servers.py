"""Real servers for tests: the cldcb daemon and a private OpenSSH sshd, on 127.0.0.1.

Each is a real subprocess, started and stopped (by pid) by the test that uses
it. Bounded waits everywhere.

- :class:`CldcbServer`: a data dir made with ``cldcb-server init``, and
  ``cldcb-server serve --listen 127.0.0.1:0`` (the port it printed).
- :class:`PrivateSshd`: ``sshd -D`` with its own config, host key,
  ``authorized_keys`` and a ``cldcb`` Subsystem running ``cldcb-server
  stdio`` on the same kind of data dir. Logins are as the current user (root
  in CI) with keys from that ``authorized_keys`` only.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519

from cldcb.transport.connection import ServerAddress, ServerSpec
from cldcb.transport.sshkeys import authorized_keys_line, derived_public_line
from helpers.environment import require_tool

SERVER_CMD = [sys.executable, "-m", "cldcb.server.admin"]
CHECKOUT = Path(__file__).resolve().parents[2]
"""This checkout: sshd passes no environment on, so its sessions are told to import cldcb
from here (not from wherever the package is installed)."""


def run_server_cmd(data_dir: Path, *args: str, check: bool = True,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVER_CMD, "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, check=check, timeout=60,
                          env=env)


def init_data_dir(data_dir: Path) -> str:
    """``cldcb-server init``; returns the server id."""
    return run_server_cmd(data_dir, "init").stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None,
              timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 15.0) -> int:
    """Signal the process by pid and wait (SIGKILL after ``timeout``)."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@dataclass
class CldcbServer:
    """``cldcb-server serve`` on 127.0.0.1 with its own data dir."""

    data_dir: Path
    server_id: str = ""
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    #: the program run as ``cldcb-server`` (a test may run a malicious variant of it)
    command: list[str] = field(default_factory=lambda: list(SERVER_CMD))
    #: the server process's limit on open files (soft and hard), if given
    max_files: int | None = None
    #: more options for ``serve``
    serve_args: list[str] = field(default_factory=list)

    def init(self) -> CldcbServer:
        self.server_id = init_data_dir(self.data_dir)
        return self

    def add(self, client_id: str, *args: str) -> None:
        run_server_cmd(self.data_dir, "add", client_id, *args)

    def start(self, port: int | None = None) -> CldcbServer:
        self.port = port or self.port or free_port()
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        env = dict(os.environ, **self.extra_env)
        limit = self.max_files

        def limit_files() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "--data-dir", str(self.data_dir), "serve", "--listen",
                 f"127.0.0.1:{self.port}", *self.serve_args], stdout=log, stderr=log,
                env=env, preexec_fn=limit_files if limit is not None else None)
        wait_port(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop_pid(self.proc, sig)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def spec(self) -> ServerSpec:
        return ServerSpec(ServerAddress.parse(self.address), self.server_id)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def _write_key(path: Path) -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                       ser.NoEncryption()))
    path.chmod(0o600)
    return key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                         ser.PublicFormat.OpenSSH).decode()


@dataclass
class PrivateSshd:
    """A private OpenSSH sshd on 127.0.0.1 offering the ``cldcb`` subsystem."""

    root: Path
    data_dir: Path = field(init=False)
    server_id: str = ""
    port: int = 0
    host_key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    user: str = field(default_factory=lambda: os.environ.get("USER") or "root")
    #: also accept passwords (never for root: PermitRootLogin stays prohibit-password)
    password_auth: bool = False
    #: also read each account's own ~/.ssh/authorized_keys, as a stock sshd does
    user_authorized_keys: bool = False
    #: offer the ``cldcb`` Subsystem (False: an sshd that was not set up for cldcb)
    subsystem: bool = True
    #: AuthorizedKeysFile instead of this sshd's own file (e.g. ``/etc/keys/%u``)
    authorized_keys_file: str | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root / "data"
        self.config = self.root / "sshd_config"
        self.authorized_keys = self.root / "authorized_keys"
        self.log_path = self.root / "sshd.log"

    def init(self) -> PrivateSshd:
        self.server_id = init_data_dir(self.data_dir)
        self.host_key = _write_key(self.root / "ssh_host_ed25519_key")
        self.authorized_keys.write_text("")
        return self

    def server_command(self) -> str:
        return f"{sys.executable} -m cldcb.server.admin --data-dir {self.data_dir}"

    def authorize_client(self, client_priv: bytes, client_id: str, forced: bool) -> None:
        """Add the client's derived Ed25519 key (pinned with a forced command, or not)."""
        if forced:
            line = authorized_keys_line(client_priv, client_id, self.server_command())
        else:
            line = derived_public_line(client_priv, "cldcb-subsystem")
        with open(self.authorized_keys, "a") as f:
            f.write(line + "\n")

    def authorize_line(self, line: str) -> None:
        with open(self.authorized_keys, "a") as f:
            f.write(line.rstrip("\n") + "\n")

    def start(self) -> PrivateSshd:
        sshd = require_tool("sshd")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.port = self.port or free_port()
        own_keys = " .ssh/authorized_keys" if self.user_authorized_keys else ""
        self.config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.root / 'ssh_host_ed25519_key'}
PidFile {self.root / 'sshd.pid'}
AuthorizedKeysFile {self.authorized_keys_file or str(self.authorized_keys) + own_keys}
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication {'yes' if self.password_auth else 'no'}
KbdInteractiveAuthentication no
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
PermitUserEnvironment no
ClientAliveInterval 30
LogLevel VERBOSE
SetEnv CLDCB_SERVER_DIR={self.data_dir} PYTHONPATH={CHECKOUT}
""" + (f"Subsystem cldcb {self.server_command()} stdio\n" if self.subsystem else ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.config)],
                                         stdout=log, stderr=log)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> int:
        assert self.proc is not None
        return stop_pid(self.proc)

    def address(self, user: str | None = None) -> str:
        return f"ssh://{user or self.user}@127.0.0.1:{self.port}"

    def spec(self, user: str | None = None) -> ServerSpec:
        return ServerSpec(ServerAddress.parse(self.address(user)), self.server_id,
                          self.host_key)

    def add(self, client_id: str, *args: str) -> None:
        run_server_cmd(self.data_dir, "add", client_id, *args)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


