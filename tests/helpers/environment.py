"""Where the test data is, whether this is CI, and the outside programs a test needs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(msg: str) -> NoReturn:
    """Something a test needs is not here: skip it, but fail under CI=true."""
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def require_tool(name: str, package: str = "openssh-server sqlite3") -> str:
    """Return the path of program ``name``; skip without it, fail under CI=true."""
    path = shutil.which(name)
    if path is None and os.path.exists(f"/usr/sbin/{name}"):
        path = f"/usr/sbin/{name}"
    if path is None:
        missing(f"{name} is not installed (apt-get install -y {package})")
    return path
