"""Which tests are end to end, and the guard that keeps the fast loop free of processes.

A test is ``e2e`` when it starts a process: a server (``cldcb-server serve``, sshd), the
plugin under a simulated or real lightningd, Tor, a SOCKS5 proxy, ``cldcb-client``, any
program but :data:`QUICK_PROGRAMS`. The unit tests start none: they run the code in this
process on real files, and ``pytest -m "not e2e and not realcln"`` runs just them (the
fast loop).

Every test module is classified: those named in :data:`E2E_MODULES` are ``e2e``, every
other one holds unit tests only (but the few tests named in :data:`E2E_TESTS`). A test
not marked ``e2e`` runs under a guard: starting a process (``subprocess.Popen``, which
``subprocess.run`` and asyncio's subprocesses use) fails it, naming these lists. So the
classification cannot drift: a unit module whose test starts a server fails in every
run, the full suite's included.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

E2E_MODULES = frozenset({
    "test_ack_relay", "test_alt_hsmd_recover", "test_cli_keys", "test_fault_injection",
    "test_hostfiles", "test_hsmd", "test_install", "test_install_litter",
    "test_install_ssh", "test_keepalive", "test_layout", "test_mirror", "test_node_dir",
    "test_plugin_acks", "test_plugin_e2e", "test_plugin_faults",
    "test_plugin_sim", "test_programs", "test_proxy", "test_readme", "test_realcln",
    "test_recognition", "test_recognition_entries", "test_recognition_listing",
    "test_recover_demo", "test_recover_e2e", "test_recover_failures",
    "test_recover_fallback", "test_recover_replaced", "test_remote_text",
    "test_server_daemon", "test_server_fair", "test_server_fetch", "test_server_flood",
    "test_server_ops", "test_server_settings", "test_ssh_examples", "test_status_verify",
    "test_stdio_misuse", "test_store_crash", "test_tor", "test_transports",
    "test_wrapper_keep",
})
"""The test modules whose tests start processes (see above)."""

E2E_TESTS = frozenset({
    "test_plugin_units.py::test_the_wrapper_runs_the_plugin_with_its_own_path",
    "test_recover_core.py::test_modules_import_first_without_cycles",
    "test_recover_core.py::test_stale_scratch_files_of_killed_runs_are_removed",
    "test_recover_core.py::test_isolated_rebuild_gives_the_same_database",
    "test_recover_core.py::test_isolated_replay_fails_as_the_replayer_does",
    "test_recover_core.py::test_a_replay_process_that_dies_fails_the_rebuild",
    "test_recover_core.py::test_a_replay_process_that_cannot_start_is_a_clear_error",
    "test_recover_core.py::test_the_replay_process_ignores_a_cldcb_in_the_working_folder",
    "test_rpc.py::test_simulated_node_rpc_surface",
    "test_seal_format.py::test_a_backup_sealed_in_format_1_still_verifies_and_recovers",
})
"""Single tests (file::function, every parametrization) of unit modules that start one."""

QUICK_PROGRAMS = frozenset({"sqlite3"})
"""Programs a unit test may run: they exit on their own in well under a second and
listen on nothing (``sqlite3 DB .dump``, how the tests compare two databases)."""

LONGEST_FIRST = (
    "test_recover_e2e", "test_plugin_faults", "test_mirror", "test_plugin_e2e",
    "test_realcln", "test_tor", "test_readme", "test_install", "test_install_ssh",
    "test_recover_demo", "test_fault_injection", "test_status_verify", "test_wire",
    "test_server_hot_path",
)
"""The modules that take longest (a full run's durations), run first: with the modules
shared out to parallel workers (``--dist loadfile``), one of them started last would be
the run's tail."""

E2E = pytest.mark.e2e


class _Guard:
    """Fails a unit test that starts a process (installed once, for the whole run)."""

    def __init__(self) -> None:
        self.test: str | None = None          # the unit test running now, if one is
        self._lock = threading.Lock()
        self._popen_init = subprocess.Popen.__init__

    def install(self) -> None:
        guard, real = self, self._popen_init

        def init(popen: subprocess.Popen[Any], args: Any, *more: Any, **kw: Any) -> None:
            guard.check(args)
            real(popen, args, *more, **kw)

        subprocess.Popen.__init__ = init  # type: ignore[method-assign]

    def check(self, args: Any) -> None:
        single = isinstance(args, str | bytes | os.PathLike)
        program = args if single else next(iter(args), "")
        if Path(os.fsdecode(program)).name in QUICK_PROGRAMS:
            return
        with self._lock:
            test = self.test
        if test is not None:
            pytest.fail(f"{test} is not marked e2e but starts a process ({str(args)[:200]}): "
                        "add its module to E2E_MODULES (or the test to E2E_TESTS) in "
                        "tests/helpers/markers.py")

    @contextmanager
    def watching(self, item: pytest.Item) -> Iterator[None]:
        """Around one test (its set-up and tear-down too)."""
        unit = item.get_closest_marker("e2e") is None
        with self._lock:
            self.test = item.nodeid if unit else None
        try:
            yield
        finally:
            with self._lock:
                self.test = None


GUARD = _Guard()


def mark_e2e(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` the tests of :data:`E2E_MODULES` and :data:`E2E_TESTS`; the modules of
    :data:`LONGEST_FIRST` first (in place, otherwise in the order collected)."""
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.stem, len(first)))
    for item in items:
        test = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if item.path.stem in E2E_MODULES or test in E2E_TESTS:
            item.add_marker(E2E)
