"""The README holds the programs to their word: exit codes, commands and options,
and the troubleshooting table's messages, each checked against the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
from helpers.readme_tables import README, exit_codes, table

from cldcb.client.app import main as client_main
from cldcb.errors import ExitCode
from cldcb.server.admin import main as server_main

PACKAGE = Path(__file__).resolve().parent.parent / "cldcb"
PROGRAMS = {"cldcb-client": client_main, "cldcb-server": server_main}


def test_exit_code_table_is_the_code() -> None:
    assert exit_codes() == {c.name.lower().replace("_", "-"): int(c) for c in ExitCode}


def _commands() -> list[tuple[str, click.Command]]:
    out = []
    for program, group in PROGRAMS.items():
        assert isinstance(group, click.Group)
        out += [(f"{program} {name}", cmd) for name, cmd in group.commands.items()]
    return out


def test_every_command_is_in_the_readme_and_every_option_has_help() -> None:
    listed = {row[0].strip("`") for row in table("Commands")}
    assert listed == {name for name, _ in _commands()}
    for name, cmd in [*_commands(), *PROGRAMS.items()]:
        assert cmd.help, f"{name} has no --help text"
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts[0]} has no help"


def _literal_pieces() -> set[str]:
    """Every string literal of the package, f-strings split at their {fields}."""
    pieces: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.add(node.value)
    return pieces


_PLACEHOLDER = re.compile(r"\S*…\S*|\b[NM](?:\+1)?\b")
_COMMAND = re.compile(r"^cldcb-(client|server) [a-z-]+$")


def _quoted_messages() -> list[str]:
    quotes = []
    for row in table("Troubleshooting"):
        quotes += [q for q in re.findall(r"`([^`]+)`", row[0])
                   if " " in q and not _COMMAND.match(q)]
    return quotes


def _unprinted(quotes: list[str], pieces: set[str]) -> list[str]:
    """The parts of ``quotes`` (between placeholders and clauses) no literal holds."""
    missing = []
    for quote in quotes:
        text = re.sub(r"^(error: |cldcb: |cldcb-plugin: error: )", "", quote)
        for fragment in re.split(r"; ", _PLACEHOLDER.sub("…", text)):
            for part in fragment.split("…"):
                part = part.strip(" ,;:()")
                if len(part) >= 4 and not any(part in p for p in pieces):
                    missing.append(f"{part!r} (from {quote!r})")
    return missing


def test_troubleshooting_quotes_what_the_programs_print() -> None:
    pieces = _literal_pieces()
    quotes = _quoted_messages()
    assert len(quotes) >= 10, quotes
    # the check bites: a reworded message is caught
    assert _unprinted(["error: client … is not known on this server"], pieces)
    missing = _unprinted(quotes, pieces)
    assert not missing, "quoted in the README but printed by no program:\n" + "\n".join(missing)


def test_readme_exit_code_table_is_referenced_by_status_help() -> None:
    assert "exit codes" in (client_main.commands["status"].help or "").lower()
    assert "## Exit codes" in README.read_text(encoding="utf-8")
