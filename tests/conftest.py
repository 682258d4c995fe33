"""Shared fixtures: test data, required external tools.

The folder of the Python running the tests (a virtual environment's ``bin``) comes
first on PATH, so the programs the tests start by name (``cldcb-*``, scripts that run
``#!/usr/bin/env python3``) are this environment's, not the system's.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])


def require_tool(name: str, package: str = "openssh-server sqlite3") -> str:
    """Return the path of program ``name``; skip without it, fail under CI=true."""
    path = shutil.which(name)
    if path is None and os.path.exists(f"/usr/sbin/{name}"):
        path = f"/usr/sbin/{name}"
    if path is None:
        msg = f"{name} is not installed (apt-get install -y {package})"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture
def realcln(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Real lightningd nodes under this test's folder (see ``tests/realcln.py``); every
    process they started is ended at the end, and a failing test's report carries the
    tails of their logs."""
    from realcln import RealCln, require_lightningd

    cln = RealCln(tmp_path / "cln", require_lightningd())
    request.node.realcln = cln
    try:
        yield cln
    finally:
        cln.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    cln = getattr(item, "realcln", None)
    if cln is not None and report.when == "call" and report.failed:
        report.sections.append(("real lightningd logs", cln.tails()))
    return report
