"""One exception tree: every exception class of the package lives in ``cldcb/errors.py``,
derives from ``CldcbError`` and says in its docstring what a user reads; nothing raises
the bare base class (each failure has a class that names its kind)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from cldcb import errors

PACKAGE = Path(errors.__file__).resolve().parent


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(PACKAGE.rglob("*.py"))]


def test_no_exception_class_outside_errors_py() -> None:
    found = []
    for path, tree in _modules():
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in _error_names()
                       for b in bases):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert found == []


def _error_names() -> set[str]:
    return {name for name, obj in vars(errors).items()
            if inspect.isclass(obj) and issubclass(obj, BaseException)}


def test_every_error_derives_from_cldcb_error_and_says_what_it_means() -> None:
    classes = [obj for obj in vars(errors).values()
               if inspect.isclass(obj) and issubclass(obj, BaseException)]
    assert len(classes) > 20
    for cls in classes:
        assert issubclass(cls, errors.CldcbError), cls
        assert cls.__doc__ and len(cls.__doc__.split()) >= 5, cls


def test_nothing_raises_the_bare_base_class() -> None:
    bare = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and ast.unparse(node.exc.func) in ("CldcbError", "errors.CldcbError"):
                bare.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert bare == []
