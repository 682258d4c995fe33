"""The package's layers (README "Layout"): the import contract has teeth, the table is the tree.

``lint-imports`` checks the contracts of ``[tool.importlinter]`` in pyproject.toml. Here it
runs on this tree (kept) and on copies of the package with one forbidden import injected
(broken, naming the import), so a contract that checks nothing cannot pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers.readme_tables import table

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cldcb"
LAYERS = ("core", "transport", "node", "cli")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package in ``tree`` (its pyproject.toml's contracts)."""
    beside = Path(sys.executable).parent / "lint-imports"
    program = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert program, "lint-imports not found: pip install -e '.[test]' installs import-linter"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([program, "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_the_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


# (module, the import injected into it, the chain lint-imports must name)
FORBIDDEN = [
    # the core does no I/O
    ("cldcb.core.wire", "import sqlite3", "cldcb.core.wire -> sqlite3"),
    ("cldcb.core.ids", "import os", "cldcb.core.ids -> os"),
    # the core imports nothing of cldcb outside itself
    ("cldcb.core.session", "from cldcb.transport import proxy",
     "cldcb.core.session -> cldcb.transport.proxy"),
    # a lower layer never imports a higher one
    ("cldcb.node.rpc", "from cldcb.client import status", "cldcb.node.rpc -> cldcb.client.status"),
    ("cldcb.store.log", "from cldcb.cli import programs", "cldcb.store.log -> cldcb.cli.programs"),
    # siblings of one layer are independent
    ("cldcb.transport.proxy", "from cldcb.node import durable",
     "cldcb.transport.proxy -> cldcb.node.durable"),
    ("cldcb.server.stdio", "from cldcb.plugin import status",
     "cldcb.server.stdio -> cldcb.plugin.status"),
    # the exception tree is the bottom
    ("cldcb.errors", "from cldcb.core import wire", "cldcb.errors -> cldcb.core.wire"),
]


def test_each_forbidden_import_breaks_the_contract(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(PACKAGE, tree / "cldcb", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    for module, line, _ in FORBIDDEN:
        path = tree.joinpath(*module.split(".")).with_suffix(".py")
        path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    done = lint_imports(tree)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout + done.stderr
    missed = [shown for _, _, shown in FORBIDDEN if shown not in done.stdout]
    assert not missed, f"lint-imports let these through: {missed}\n{done.stdout}"


def test_the_readme_layout_table_is_the_tree() -> None:
    rows = table("Layout")
    listed = set()
    for module, package, why in rows:
        folder = PACKAGE.parent.joinpath(*package.strip("`").split("."))
        assert why, f"README Layout: {module} {package} says nowhere why"
        if module == "(all)":
            assert (folder / "__init__.py").is_file(), f"README Layout: no package {package}"
            continue
        path = folder / (module.strip("`") + ".py")
        assert path.is_file(), f"README Layout lists {module} in {package}: no {path}"
        listed.add(path)
    for layer in LAYERS:
        for path in sorted((PACKAGE / layer).glob("*.py")):
            if path.name != "__init__.py":
                assert path in listed, f"{path.relative_to(ROOT)} is not in README's Layout"
    top = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py"}
    assert top == {p.name for p in listed if p.parent == PACKAGE}, \
        "a module at the top of cldcb/ that README's Layout does not place"
