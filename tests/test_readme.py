"""The README's command lines, run (issue 14): so the README cannot drift from the programs.

The blocks are the fenced ``sh`` blocks right after a ``<!-- readme-test: NAME -->``
comment in README.md. Every ``cldcb-*`` command in them may only name options its
``--help`` lists; the set-up and recovery blocks run as written, with the placeholders
filled in (``backup.example:29735`` → a real ``cldcb-server serve`` on 127.0.0.1,
``53…``/``c3…`` → the ids those commands printed, ``~/.lightning`` → a simulated
lightningd's folder, ``cldcb@backup.example`` → a private sshd, ``PROGRAM`` → the hsmd
double): the server's, the node's by hand and through ``install --ssh``, then recovery
from ``hsm_secret`` and, in the node's folder, through ``--alt-hsmd``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo import dump
from helpers.servers import PrivateSshd, free_port, stop_pid, wait_port
from helpers.simrpc import SimRpcNode
from test_cli_keys import console_script
from test_install_ssh import new_ssh_key

from cldcb.plugin.wrapper import WRAPPER_NAME, read_wrapper

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- readme-test: ([a-z-]+) -->\n```sh\n(.*?)```", re.S)
PROGRAMS = ("cldcb-server", "cldcb-client", "cldcb-plugin")
DOUBLE = Path(__file__).resolve().parent / "hsmd_double.py"
EXPECTED = {"try", "tests", "production-install", "production-server", "server",
            "install-ssh", "node-by-hand", "recovery", "recovery-alt-hsmd"}


def readme_blocks(text: str | None = None) -> dict[str, list[str]]:
    """Each marked block's command lines (continuations joined, comment lines dropped)."""
    blocks = {}
    for name, body in BLOCK.findall(README.read_text() if text is None else text):
        lines = body.replace("\\\n", " ").splitlines()
        blocks[name] = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    return blocks


def commands(line: str, subs: dict[str, str] | None = None) -> list[list[str]]:
    """The commands of a line (split at ``&&``), placeholders filled in."""
    for placeholder, value in (subs or {}).items():
        line = line.replace(placeholder, value)
    out: list[list[str]] = [[]]
    for word in shlex.split(line, comments=True):
        if word == "&&":
            out.append([])
        else:
            out[-1].append(word)
    return out


# --- every option named exists --------------------------------------------------------

def _options(program: str, *sub: str) -> set[str]:
    done = subprocess.run([console_script(program), *sub, "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{program} {' '.join(sub)} --help: {done.stderr}"
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


def unknown_options(argv: list[str]) -> list[str]:
    """The ``--options`` of a cldcb command line that its --help does not list."""
    at = next((i for i, w in enumerate(argv) if Path(w).name in PROGRAMS), None)
    if at is None:
        return []
    program, rest = Path(argv[at]).name, argv[at + 1:]
    rest = rest[:rest.index(">")] if ">" in rest else rest
    known = _options(program)
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        i += 2 if rest[i] == "--data-dir" else 1
    if program != "cldcb-plugin" and i < len(rest):
        known |= _options(program, rest[i])
    return [w for w in rest if w.startswith("--") and w.split("=")[0] not in known]


def test_the_readme_marks_its_command_blocks() -> None:
    assert set(readme_blocks()) == EXPECTED


def test_every_readme_command_names_options_that_exist() -> None:
    found = {}
    for name, lines in readme_blocks().items():
        for line in lines:
            for argv in commands(line):
                found.update({f"{name}: {line}": bad for bad in [unknown_options(argv)]
                              if bad})
    assert found == {}


def test_an_option_that_does_not_exist_is_caught() -> None:
    (argv,) = commands("cldcb-client recover --lightning-dir ~/.lightning --no-such-option")
    assert unknown_options(argv) == ["--no-such-option"]
    (argv,) = commands("sudo -u cldcb /opt/x/cldcb-server --data-dir /d add c3… --quotaa 1")
    assert unknown_options(argv) == ["--quotaa"]


def test_ci_runs_the_readme_test_command() -> None:
    blocks = readme_blocks()
    ci = [x.strip() for x in (ROOT / ".ci" / "run").read_text().splitlines() if x.strip()]
    assert ci[-1] == blocks["tests"][0]
    (try_line,) = blocks["try"]
    venv, pip, _demo = (shlex.join(c) for c in commands(try_line))
    assert venv in ci and any(x.startswith(".venv/bin/pip install") and x.endswith(
        pip.split(" ", 2)[2]) for x in ci)


# --- the set-up and recovery blocks, run ---------------------------------------------

class Readme:
    """Runs README lines with placeholders filled in; servers it starts are stopped."""

    def __init__(self, root: Path) -> None:
        self.work = root / "work"
        self.work.mkdir()
        self.data = root / "server"
        self.env = {**os.environ, "CLDCB_SERVER_DIR": str(self.data), "HOME": str(root)}
        self.env.pop("SSH_AUTH_SOCK", None)
        self.port = free_port()
        self.subs = {"backup.example:29735": f"127.0.0.1:{self.port}",
                     "0.0.0.0:29735": f"127.0.0.1:{self.port}", "PROGRAM": str(DOUBLE)}
        self.daemons: list[subprocess.Popen[bytes]] = []

    def run(self, line: str) -> str:
        """Run ``line``; its stdout (a non-zero exit fails the test)."""
        cwd, out = self.work, ""
        for argv in commands(line, self.subs):
            if argv[0] == "cd":
                cwd = Path(argv[1])
                continue
            if argv[0] in PROGRAMS:
                argv = [console_script(argv[0]), *argv[1:]]
            if argv[1:2] == ["serve"]:
                self.daemons.append(subprocess.Popen(argv, env=self.env, cwd=cwd))
                wait_port(self.port, self.daemons[-1])
                continue
            done = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=300)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            out += done.stdout
        return out

    def close(self) -> None:
        for proc in self.daemons:
            stop_pid(proc)


@pytest.fixture
def readme(tmp_path: Path) -> Iterator[Readme]:
    r = Readme(tmp_path)
    try:
        yield r
    finally:
        r.close()


def start_server(readme: Readme) -> None:
    init, serve = readme_blocks()["server"]
    readme.subs["53…"] = readme.run(init).strip()
    readme.run(serve)


def lose_all_but_hsm_secret(ln: Path) -> None:
    for p in (ln / "bitcoin").iterdir():
        if p.name != "hsm_secret":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_the_readme_setup_by_hand_and_recovery(readme: Readme, tmp_path: Path) -> None:
    ln = tmp_path / "lightning"
    readme.subs["~/.lightning"] = str(ln)
    start_server(readme)
    blocks = readme_blocks()
    newclient, add, install, shred = blocks["node-by-hand"]
    with SimRpcNode(ln, network="bitcoin", preplay=40) as node:
        readme.subs["c3…"] = readme.run(newclient).strip()
        assert "added client" in readme.run(add)
        assert "the backup is running" in readme.run(install)
        readme.run(shred)
        assert not (readme.work / "client.key").exists()
        assert read_wrapper(node.network_dir / WRAPPER_NAME).client_id == readme.subs["c3…"]
        node.feed(30)       # every change answered `continue`: the server holds it
    original = dump(ln / "bitcoin" / "lightningd.sqlite3")

    lose_all_but_hsm_secret(ln)
    (recover,) = blocks["recovery"]
    assert "Recovered" in readme.run(recover)
    assert dump(ln / "bitcoin" / "lightningd.sqlite3") == original

    lose_all_but_hsm_secret(ln)
    (recover_in_folder,) = blocks["recovery-alt-hsmd"]
    assert recover_in_folder.startswith("cd ~/.lightning && ")
    assert "--lightning-dir" not in recover_in_folder
    assert "Recovered" in readme.run(recover_in_folder)
    assert dump(ln / "bitcoin" / "lightningd.sqlite3") == original


def test_the_readme_single_step_install(readme: Readme, tmp_path: Path) -> None:
    """``install --ssh cldcb@backup.example``: a setup key to the server host's account,
    whose forced command is ``cldcb-server forced --allow add`` (Production install)."""
    sshd = PrivateSshd(tmp_path / "sshd").init()
    start_server(readme)
    server = console_script("cldcb-server")
    public = new_ssh_key(tmp_path / ".ssh" / "id_ed25519")   # found as a default key
    sshd.start()
    try:
        # the operator checked the host key before (install asks otherwise)
        (tmp_path / ".ssh" / "known_hosts").write_text(
            f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n")
        sshd.authorize_line(f'restrict,command="{server} --data-dir {readme.data} forced '
                            f'--allow add" {public}')
        ln = tmp_path / "lightning"
        readme.subs.update({"~/.lightning": str(ln),
                            "cldcb@backup.example": f"{sshd.user}@127.0.0.1:{sshd.port}"})
        (install,) = readme_blocks()["install-ssh"]
        with SimRpcNode(ln, network="bitcoin", preplay=40) as node:
            out = readme.run(install)
            assert "the backup is running" in out, out
            cfg = read_wrapper(node.network_dir / WRAPPER_NAME)
            assert [s.address for s in cfg.servers] == [f"127.0.0.1:{readme.port}"]
            assert cfg.client_id in readme.run("cldcb-server list")
    finally:
        sshd.stop()
