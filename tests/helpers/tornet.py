"""A private Tor network on 127.0.0.1 (Debian's ``tor``, ``TestingTorNetwork 1``).

Modelled on Tor's own chutney (its ``hs-v3-min`` network and torrc
templates): three directory authorities (keys made with ``tor-gencert``),
three more relays, an onion service forwarding ``VIRTUAL_PORT`` to a
loopback port, and a client with a SOCKS port. Every tor is a subprocess of
the test (``RunAsDaemon 0``), on free ports of 127.0.0.1, its DataDirectory
under the test's folder, stopped by pid. Nothing reaches outside: the
authorities are the only directory servers any of them know.

:meth:`PrivateTorNetwork.start` returns once the client reached the onion
service through Tor (a SOCKS5 CONNECT that succeeds), within ``timeout``;
otherwise it raises :class:`TorNetworkError` with the tails of the logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from python_socks import ProxyError, ProxyTimeoutError, ProxyType
from python_socks.sync import Proxy

from helpers.environment import require_tool
from helpers.servers import free_port, stop_pid

VIRTUAL_PORT = 29735
AUTHORITIES = 3
RELAYS = 3
_PASSPHRASE = b"cldcb-test-authority\n"

COMMON = """TestingTorNetwork 1
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit *
TestingDirAuthVoteHSDir *
TestingDirAuthVoteGuard *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
DataDirectory {dir}
RunAsDaemon 0
Nickname {nick}
ShutdownWaitLength 0
Sandbox 0
SafeLogging 1
Log notice file {dir}/notice.log
ControlPort 0
ClientUseIPv6 0
{authorities}
"""
RELAY = """SocksPort 0
OrPort 127.0.0.1:{orport}
Address 127.0.0.1
DirPort 127.0.0.1:{dirport}
AssumeReachable 1
ExitRelay 0
ContactInfo {nick}@test.test
ServerDNSResolvConfFile /dev/null
"""
AUTHORITY = """AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
TestingV3AuthInitialVotingInterval 20
TestingV3AuthInitialVoteDelay 4
TestingV3AuthInitialDistDelay 4
V3AuthVotingInterval 20
V3AuthVoteDelay 4
V3AuthDistDelay 4
"""
CLIENT = "SocksPort 127.0.0.1:{socksport}\n"
SERVICE = """SocksPort 0
HiddenServiceDir {dir}/hidden_service
HiddenServicePort {virtual} 127.0.0.1:{target}
"""


class TorNetworkError(RuntimeError):
    pass


@dataclass
class TorNode:
    nick: str
    dir: Path
    orport: int = 0
    dirport: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = (self.dir / "notice.log").read_text(errors="replace").splitlines()
        except OSError:
            return f"{self.nick}: no log"
        return "\n".join(f"{self.nick}: {line}" for line in text[-lines:])


@dataclass
class PrivateTorNetwork:
    """See the module docstring. ``target_port``: the loopback port the onion service
    forwards to."""

    folder: Path
    target_port: int
    nodes: list[TorNode] = field(default_factory=list)
    socks_port: int = 0
    onion: str = ""

    def __post_init__(self) -> None:
        self.tor = require_tool("tor", "tor")
        self.gencert = require_tool("tor-gencert", "tor")

    @property
    def socks_url(self) -> str:
        return f"socks5://127.0.0.1:{self.socks_port}"

    @property
    def address(self) -> str:
        return f"{self.onion}:{VIRTUAL_PORT}"

    def _node(self, nick: str, relay: bool) -> TorNode:
        d = self.folder / nick
        d.mkdir(parents=True, mode=0o700)
        node = TorNode(nick, d, free_port() if relay else 0, free_port() if relay else 0)
        self.nodes.append(node)
        return node

    def _fingerprint(self, node: TorNode) -> str:
        out = subprocess.run([self.tor, "--ignore-missing-torrc", "-f", os.devnull,
                              "--orport", "1", "--datadirectory", str(node.dir),
                              "--list-fingerprint"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        words = out.strip().splitlines()[-1].split()
        fingerprint = "".join(words[1:])
        if not re.fullmatch(r"[0-9A-F]{40}", fingerprint):
            raise TorNetworkError(f"no fingerprint from tor --list-fingerprint: {out!r}")
        return fingerprint

    def _authority_line(self, node: TorNode) -> str:
        keys = node.dir / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        subprocess.run([self.gencert, "--create-identity-key", "--passphrase-fd", "0",
                        "-i", str(keys / "authority_identity_key"),
                        "-s", str(keys / "authority_signing_key"),
                        "-c", str(keys / "authority_certificate"),
                        "-m", "12", "-a", f"127.0.0.1:{node.dirport}"],
                       input=_PASSPHRASE, capture_output=True, timeout=120, check=True)
        cert = (keys / "authority_certificate").read_text()
        v3ident = re.search(r"^fingerprint (\S+)", cert, re.M)
        assert v3ident is not None
        return (f"DirAuthority {node.nick} orport={node.orport} no-v2 "
                f"v3ident={v3ident.group(1)} 127.0.0.1:{node.dirport} "
                f"{self._fingerprint(node)}")

    def _launch(self, node: TorNode, torrc: str) -> None:
        path = node.dir / "torrc"
        path.write_text(torrc)
        with open(node.dir / "stdout.log", "ab") as out:
            node.proc = subprocess.Popen([self.tor, "-f", str(path)], stdout=out, stderr=out)

    def start(self, timeout: float = 150.0) -> PrivateTorNetwork:
        deadline = time.monotonic() + timeout
        try:
            auths = [self._node(f"auth{i}", True) for i in range(AUTHORITIES)]
            relays = [self._node(f"relay{i}", True) for i in range(RELAYS)]
            client = self._node("client", False)
            service = self._node("service", False)
            authorities = "\n".join(self._authority_line(a) for a in auths)
            for n in auths + relays:
                if n in relays:
                    self._fingerprint(n)            # makes its keys
                extra = AUTHORITY if n in auths else ""
                self._launch(n, COMMON.format(dir=n.dir, nick=n.nick, authorities=authorities)
                             + RELAY.format(orport=n.orport, dirport=n.dirport, nick=n.nick)
                             + extra)
            self.socks_port = free_port()
            self._launch(client, COMMON.format(dir=client.dir, nick=client.nick,
                                               authorities=authorities)
                         + CLIENT.format(socksport=self.socks_port))
            self._launch(service, COMMON.format(dir=service.dir, nick=service.nick,
                                                authorities=authorities)
                         + SERVICE.format(dir=service.dir, virtual=VIRTUAL_PORT,
                                          target=self.target_port))
            self.onion = self._wait_hostname(service, deadline)
            self._wait_reachable(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_alive(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is not None:
                raise TorNetworkError(f"tor {n.nick} exited with {n.proc.returncode}:\n"
                                      + n.log_tail())

    def _wait_hostname(self, service: TorNode, deadline: float) -> str:
        path = service.dir / "hidden_service" / "hostname"
        while time.monotonic() < deadline:
            self._check_alive()
            if path.is_file() and path.read_text().strip():
                return path.read_text().strip()
            time.sleep(0.2)
        raise TorNetworkError("the onion service wrote no hostname\n" + self.log_tails())

    def _wait_reachable(self, deadline: float) -> None:
        """Until a SOCKS5 CONNECT to the onion service through the client succeeds (the
        network has a consensus, the service's descriptor is published)."""
        proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", self.socks_port, rdns=True)
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                sock = proxy.connect(self.onion, VIRTUAL_PORT,
                                     timeout=max(1.0, min(20.0, deadline - time.monotonic())))
                sock.close()
                return
            except (ProxyError, ProxyTimeoutError, OSError) as exc:
                last = str(exc)
            time.sleep(1.0)
        raise TorNetworkError(f"the onion service was not reachable in time ({last})\n"
                              + self.log_tails())

    def log_tails(self) -> str:
        return "\n".join(n.log_tail() for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None:
                stop_pid(n.proc)

    def __enter__(self) -> PrivateTorNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
