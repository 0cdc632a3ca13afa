"""SPEC core rule 8: nothing loaded from a file or another process is unpickled or
evaluated. Checked on the source of every module of the package with ``ast``: no import
of pickle-family modules (also not by a literal name through ``__import__`` or
``importlib.import_module``), no call of eval/exec, no ``numpy.load(allow_pickle=True)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mmsb

PACKAGE = Path(mmsb.__file__).resolve().parent
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal",
                     "shelve", "joblib", "jsonpickle"}
FORBIDDEN_CALLS = {"eval", "exec"}
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _top(name: str | None) -> str:
    return (name or "").split(".")[0]


def _problems(path: Path, base: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(base)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) in FORBIDDEN_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if _top(node.module) in FORBIDDEN_MODULES:
                found.append(f"{where}: from {node.module} import …")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in ("__import__", "import_module") and node.args and \
                    isinstance(node.args[0], ast.Constant) and \
                    _top(str(node.args[0].value)) in FORBIDDEN_MODULES:
                found.append(f"{where}: {name}({node.args[0].value!r})")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant)
                                                     and kw.value.value is False):
                    found.append(f"{where}: allow_pickle={ast.unparse(kw.value)}")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_CALLS and \
                isinstance(node.ctx, ast.Load):
            found.append(f"{where}: use of {node.id}")  # a call, or an alias of it
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS and \
                isinstance(node.value, ast.Name) and node.value.id == "builtins":
            found.append(f"{where}: use of builtins.{node.attr}")
    return found


def test_the_package_sources_are_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"codec.py", "checkpoint.py", "wal.py", "bus.py", "_api.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_pickle_marshal_eval_or_exec(path: Path) -> None:
    assert _problems(path) == []


def test_the_checker_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom marshal import loads\nimport shelve as s\n"
                   "import dill.source\nx = eval('1')\nexec('y = 2')\n"
                   "import importlib\nimportlib.import_module('pickle')\n__import__('marshal')\n"
                   "import numpy as np\nnp.load('f', allow_pickle=True)\nf = eval\n"
                   "import builtins\nbuiltins.exec('z = 3')\n")
    problems = _problems(bad, tmp_path)
    # 4 imports, 4 uses of eval/exec, 2 imports by a literal name, 1 allow_pickle=True
    assert len(problems) == 11, problems


def test_loaded_modules_do_not_include_pickle_through_mmsb() -> None:
    """Importing the whole public API and the durable bus pulls in no pickle-family
    module of the package's own making (the standard library may import pickle for its
    own reasons; what matters is that no mmsb module references it)."""
    import mmsb._storage.bus
    import mmsb._storage.checkpoint
    import mmsb._storage.codec
    import mmsb._storage.wal  # noqa: F401

    for mod in (mmsb._storage.codec, mmsb._storage.checkpoint, mmsb._storage.wal, mmsb._storage.bus):
        for name in FORBIDDEN_MODULES:
            assert name not in vars(mod), f"{mod.__name__} binds {name}"
