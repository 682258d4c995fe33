"""What every cldcb command-line program shares.

- :func:`cldcb_group`: a click group with ``--version`` and a ``--debug``
  option accepted anywhere on the command line (before ``--``), whose
  commands report any :class:`~cldcb.errors.CldcbError` as
  ``error: <message>`` on stderr and exit with ``err.exit_code``; the
  traceback is printed only with ``--debug``.
- :func:`json_option`: ``--json`` for a command that reports state: its result is one
  JSON object on stdout, and so is an error (``{"ok": false, "error": …,
  "exit_code": N}``, the ``error: …`` line still on stderr); no human text on stdout.
- Exit codes: :class:`~cldcb.errors.ExitCode` (the README's table).
- :func:`get_passphrase`: a passphrase from ``--passphrase-file``, else a
  hidden prompt when one is needed and stdin is a terminal, else a
  :class:`~cldcb.errors.UsageError` naming ``--passphrase-file``.
- :func:`local_node_key`: the node key from ``--hsm-secret`` /
  ``--passphrase-file`` with the above.
- :func:`require_protocol_pipes`: a program that speaks a protocol on
  stdin/stdout (``cldcb-server stdio``, ``cldcb-plugin``) refuses, with a
  :class:`~cldcb.errors.UsageError` saying what starts it, to run when either
  is not a pipe or a socket (a terminal, /dev/null, a file): run by hand it
  would otherwise wait forever or fail inside the event loop.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cldcb import __version__
from cldcb.core.hsm_secret import needs_passphrase
from cldcb.errors import CldcbError, HsmSecretError, UsageError
from cldcb.node.keyfile import read_passphrase_file
from cldcb.node.nodekey import LocalNodeKey, read_hsm_secret_file, with_path

_DEBUG_KEY = "cldcb.debug"
_JSON_KEY = "cldcb.json"
F = TypeVar("F", bound=Callable[..., Any])


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG_KEY] = True


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """True if ``--debug`` was given to the program."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_DEBUG_KEY))


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_JSON_KEY] = True
    return value


def json_option(help_text: str = "Print one JSON object on stdout (an error too).",
                ) -> Callable[[F], F]:
    """``--json`` (as ``as_json``); an error then also reaches stdout as JSON."""
    return click.option("--json", "as_json", is_flag=True, is_eager=True, callback=_set_json,
                        help=help_text)


def json_enabled(ctx: click.Context | None = None) -> bool:
    """True if ``--json`` was given to the command running."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_JSON_KEY))


def echo_json(data: object) -> None:
    """The one JSON object of a ``--json`` command, on stdout."""
    click.echo(json.dumps(data, indent=1, default=str))


def report_error(err: CldcbError, debug: bool, as_json: bool = False) -> None:
    """Print ``error: <message>`` (and the traceback with ``debug``) to stderr; with
    ``as_json`` also ``{"ok": false, "error": …, "exit_code": N}`` on stdout."""
    if debug:
        traceback.print_exception(err)
    if as_json:
        echo_json({"ok": False, "error": str(err), "exit_code": int(err.exit_code)})
    click.echo(f"error: {err}", err=True)


class CldcbGroup(click.Group):
    """A click group that turns :class:`CldcbError` into ``error: …`` and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CldcbError as err:
            report_error(err, debug_enabled(ctx), json_enabled(ctx))
            ctx.exit(err.exit_code)

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = hoist_debug(sys.argv[1:] if args is None else list(args))
        # Errors raised before a command runs (while options are parsed).
        try:
            return super().main(argv, *rest, **kwargs)
        except CldcbError as err:
            report_error(err, "--debug" in argv, "--json" in argv)
            sys.exit(err.exit_code)


def hoist_debug(argv: list[str]) -> list[str]:
    """``argv`` with every ``--debug`` before ``--`` moved to the front (the group's option),
    so ``--debug`` works anywhere on the line."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug", *[a for a in argv[:end] if a != "--debug"], *argv[end:]]


def cldcb_group(program: str, **attrs: Any) -> Callable[[F], CldcbGroup]:
    """``@cldcb_group("cldcb-x")``: like ``@click.group()``, with ``--debug``, ``--version``
    (``cldcb-x 0.1.0``) and error reporting."""

    def decorator(func: F) -> CldcbGroup:
        func = click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                            callback=_set_debug,
                            help="Show a traceback when a command fails (anywhere on the "
                                 "line).")(func)
        func = click.version_option(__version__, "--version", prog_name=program,
                                    message="%(prog)s %(version)s",
                                    help="Print the version and exit.")(func)
        attrs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        return click.group(cls=CldcbGroup, **attrs)(func)

    return decorator


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def get_passphrase(passphrase_file: Path | None, *, needed: bool,
                   what: str = "the hsm_secret") -> str | None:
    """The passphrase to use, or None when none is needed and none was given.

    A ``passphrase_file`` is always read (so a passphrase given for a secret
    that has none is reported, not silently ignored). Otherwise a hidden
    prompt appears only if ``needed`` and stdin is a terminal.
    """
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    if not needed:
        return None
    if not stdin_is_terminal():
        raise UsageError(f"{what} is protected by a passphrase and stdin is not a "
                         "terminal to ask for it: give it with --passphrase-file FILE")
    return str(click.prompt(f"Passphrase for {what}", hide_input=True, err=True))


def local_node_key(hsm_secret: Path, passphrase_file: Path | None) -> LocalNodeKey:
    """The node key of the ``hsm_secret`` file, asking for its passphrase if needed."""
    file_bytes = read_hsm_secret_file(hsm_secret)
    try:
        needed = needs_passphrase(file_bytes)
        passphrase = get_passphrase(passphrase_file, needed=needed,
                                    what=f"hsm_secret {hsm_secret}")
        return LocalNodeKey.from_hsm_secret_bytes(file_bytes, passphrase)
    except HsmSecretError as err:
        raise with_path(err, hsm_secret) from None


def ask(value: str | None, flag: str, question: str) -> str:
    """``value``, else an answer typed on the terminal, else a UsageError naming ``flag``."""
    if value:
        return value
    if not stdin_is_terminal():
        raise UsageError(f"missing {flag}: give it on the command line (stdin is not a "
                         "terminal to ask for it)")
    return str(click.prompt(question, err=True)).strip()


def _stream_kind(fd: int) -> str | None:
    """None for a pipe or a socket; else what the stream is, in words."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return None
    if os.isatty(fd):
        return "a terminal"
    if stat.S_ISCHR(mode):
        return "a character device (such as /dev/null)"
    if stat.S_ISREG(mode):
        return "a file"
    return "not a pipe"


def require_protocol_pipes(program: str, started_by: str) -> None:
    """Refuse to speak a protocol on a stdin/stdout that is not a pipe or a socket."""
    for name, fd in (("stdin", 0), ("stdout", 1)):
        kind = _stream_kind(fd)
        if kind is not None:
            raise UsageError(f"{program} speaks the cldcb protocol on stdin/stdout and is "
                             f"started by {started_by}, not by hand: {name} is {kind}")
