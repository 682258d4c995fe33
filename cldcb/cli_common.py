"""What every cldcb command-line program shares.

- :func:`cldcb_group`: a click group with a global ``--debug`` option whose
  commands report any :class:`~cldcb.errors.CldcbError` as
  ``error: <message>`` on stderr and exit with ``err.exit_code``; the
  traceback is printed only with ``--debug``.
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

import os
import stat
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cldcb.errors import CldcbError, HsmSecretError, UsageError
from cldcb.hsm_secret import needs_passphrase
from cldcb.keyfile import read_passphrase_file
from cldcb.nodekey import LocalNodeKey, read_hsm_secret_file, with_path

_DEBUG_KEY = "cldcb.debug"
F = TypeVar("F", bound=Callable[..., Any])


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG_KEY] = True


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """True if ``--debug`` was given to the program."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_DEBUG_KEY))


def report_error(err: CldcbError, debug: bool) -> None:
    """Print ``error: <message>`` (and the traceback with ``debug``) to stderr."""
    if debug:
        traceback.print_exception(err)
    click.echo(f"error: {err}", err=True)


class CldcbGroup(click.Group):
    """A click group that turns :class:`CldcbError` into ``error: …`` and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CldcbError as err:
            report_error(err, debug_enabled(ctx))
            ctx.exit(err.exit_code)

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        # Errors raised before a command runs (while options are parsed).
        try:
            return super().main(args, *rest, **kwargs)
        except CldcbError as err:
            argv = sys.argv[1:] if args is None else list(args)
            report_error(err, "--debug" in argv)
            sys.exit(err.exit_code)


def cldcb_group(**attrs: Any) -> Callable[[F], CldcbGroup]:
    """``@cldcb_group()``: like ``@click.group()``, with ``--debug`` and error reporting."""

    def decorator(func: F) -> CldcbGroup:
        func = click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                            callback=_set_debug,
                            help="Show a traceback when a command fails.")(func)
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
