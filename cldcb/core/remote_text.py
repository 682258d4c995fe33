"""Text from a remote party, made safe to show: its control characters escaped.

A server (or any SSH peer) chooses the characters of its error texts, reasons,
disconnect messages and command output. Shown raw, ``ESC[8m`` hides what
follows, ``ESC[32m`` paints a fake "Recovered OK" green, ``\\r`` writes over a
line and U+202E turns it around. Every such text goes through
:func:`escape_remote` where it enters the program (the wire codec's text fields,
SSH exception reasons, output of a command run on the server host), so that no
later print, log line or status file can forget it.

Escaped: every character Python does not count as printable
(:meth:`str.isprintable`): C0 controls (newline, tab, CR and ESC included), DEL,
C1 controls, format characters (bidi overrides and isolates, zero-width
characters), separators other than the space, lone surrogates, private-use and
unassigned code points. Each becomes ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``;
everything else (backslashes too) is kept, so the function is idempotent. Pure.
"""

from __future__ import annotations


def _escaped(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_remote(text: str) -> str:
    """``text`` with every non-printable character as a visible escape (one line)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)
