"""Shared fixtures: test data, real lightningd nodes; the e2e marker and its guard
(``helpers.markers``).

The folder of the Python running the tests (a virtual environment's ``bin``) comes
first on PATH, so the programs the tests start by name (``cldcb-*``, scripts that run
``#!/usr/bin/env python3``) are this environment's, not the system's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers.environment import DATA
from helpers.markers import GUARD, mark_e2e

_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture
def realcln(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Real lightningd nodes under this test's folder (see ``tests/helpers/realcln.py``); every
    process they started is ended at the end, and a failing test's report carries the
    tails of their logs."""
    from helpers.realcln import RealCln, require_lightningd

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


def pytest_configure(config: pytest.Config) -> None:
    GUARD.install()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_e2e(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    """A test not marked e2e may start no process (``helpers.markers``)."""
    with GUARD.watching(item):
        return (yield)
