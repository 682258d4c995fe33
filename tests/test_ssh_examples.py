"""The key lines shipped in ``ssh/*.example`` are each restricted to what they are for.

Every line is ``restrict`` with a forced ``cldcb-server`` command; through a
real private sshd, each line (with a fresh key in place of the example's) runs
the cldcb protocol or the setup command whatever the client asks for: ``cat``
of the server's key never runs.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from helpers.servers import PrivateSshd

from cldcb.transport.connection import Connection

SSH_DIR = Path(__file__).resolve().parent.parent / "ssh"
_LINE = re.compile(r'^(?P<options>(?:[^\s"]|"(?:[^"\\]|\\.)*")+)\s+'
                   r'(?P<keytype>ssh-ed25519|ssh-rsa|ecdsa-sha2-\S+|sk-\S+)\s+(?P<key>\S+)'
                   r'(?:\s+(?P<comment>.*))?$')


@dataclass(frozen=True)
class KeyLine:
    source: str
    options: list[str]
    command: list[str]
    comment: str


def _split_options(options: str) -> list[str]:
    return [o for o in re.findall(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+', options)]


def example_key_lines() -> list[KeyLine]:
    out = []
    for path in sorted(SSH_DIR.glob("*.example")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path.name}:{n}"
            m = _LINE.match(line.strip())
            assert m, f"{where}: a key line without options (no restrict): {line!r}"
            options = _split_options(m["options"])
            commands = [o[len('command="'):-1] for o in options if o.startswith('command="')]
            assert len(commands) == 1, f"{where}: no forced command"
            out.append(KeyLine(where, options, shlex.split(commands[0]), m["comment"] or ""))
    return out


def test_every_example_key_line_is_restricted_to_a_cldcb_command() -> None:
    lines = example_key_lines()
    assert lines, f"no key lines found in {SSH_DIR}/*.example"
    for kl in lines:
        assert "restrict" in kl.options, kl.source
        assert kl.command[0] == "cldcb-server", kl.source
        assert kl.command[1:2] in (["stdio"], ["forced"]), kl.source
    # the client (pinned), the setup key (add only) and the operator (the protocol only)
    assert sorted(" ".join(kl.command[1:3]) for kl in lines) == [
        "forced --allow", "stdio", "stdio --client"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    srv = PrivateSshd(tmp_path_factory.mktemp("sshd")).init().start()
    yield srv
    srv.stop()


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("kl", example_key_lines(), ids=lambda kl: kl.source)
def test_an_example_key_line_runs_no_shell(kl: KeyLine, sshd: PrivateSshd,
                                           tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "key"
    key.write_private_key(str(key_path))
    command = sshd.server_command() + " " + shlex.join(kl.command[1:])
    options = [o if not o.startswith('command="') else f'command="{command}"'
               for o in kl.options]
    sshd.authorize_line(",".join(options) + " " + key.export_public_key().decode())
    secret = (sshd.data_dir / "server_key").read_text()
    known = ([asyncssh.import_public_key(sshd.host_key)], [], [])

    async def attempt(cmd: str) -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect("127.0.0.1", sshd.port, username=sshd.user,
                                    client_keys=[key], agent_path=None,
                                    known_hosts=known) as conn:
            # input (then EOF) as a shell would read it; a cldcb session reads a bad frame
            return await conn.run(cmd, check=False, input=(cmd + "\n").encode(),
                                  encoding=None)

    for cmd in (f"cat {sshd.data_dir / 'server_key'}", "cat server_key", "id"):
        res = run(attempt(cmd))
        out = bytes(res.stdout or b"") + bytes(res.stderr or b"")
        assert secret.encode() not in out and b"uid=" not in out, (kl.source, cmd)
        for line in secret.splitlines():
            assert not line.strip() or line.encode() not in out, (kl.source, cmd)
    if kl.command[1:] == ["stdio"]:
        # what the operator's key is for: an anonymous cldcb session (recovery lists)
        async def anonymous() -> list[bytes]:
            conn = await Connection.open(sshd.spec(), None, operator_keys=[str(key_path)])
            try:
                return await conn.list_recognitions()
            finally:
                await conn.close()

        assert isinstance(run(anonymous()), list)
