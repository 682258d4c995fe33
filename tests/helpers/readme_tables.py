"""The README's tables, parsed, so tests hold the programs to what the README says."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def table(heading: str) -> list[list[str]]:
    """The rows (cells stripped, header and rule left out) of the first table under the
    section ``## heading``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"## {heading}")
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif rows:
            break
    assert len(rows) > 2, f"no table under ## {heading} in {README}"
    return rows[2:]


def exit_codes() -> dict[str, int]:
    """``{"ok": 0, "failure": 1, …}`` from the README's table of exit codes."""
    return {row[1].strip("`"): int(row[0]) for row in table("Exit codes")}
