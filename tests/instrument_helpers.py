"""Helpers for the instrumentation tests: modules written to a temporary directory and
imported (and edited and reloaded) for real."""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import mmsb
from mmsb._instrument import trampoline

_names = itertools.count(1)


class ModuleDir:
    """A directory on sys.path where tests write modules with fresh names."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self.made: list[str] = []

    def name(self) -> str:
        return f"{self.prefix}{next(_names)}"

    def write(self, name: str, source: str) -> Path:
        path = self.root / f"{name}.py"
        old = path.stat().st_mtime if path.exists() else time.time()
        path.write_text(textwrap.dedent(source))
        # A later mtime, so no cached bytecode of the old text is ever taken.
        os.utime(path, (old + 2, old + 2))
        importlib.invalidate_caches()
        if name not in self.made:
            self.made.append(name)
        return path

    def load(self, name: str) -> types.ModuleType:
        return importlib.import_module(name)

    def edit(self, module: types.ModuleType, old: str, new: str) -> types.ModuleType:
        path = self.root / f"{module.__name__}.py"
        text = path.read_text()
        assert old in text
        self.write(module.__name__, text.replace(old, new))
        return importlib.reload(module)


def make_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleDir]:
    """Fixture body: use ``pytest.fixture(name="modules")(make_modules)``."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    d = ModuleDir(tmp_path, "instr_mod_")
    yield d
    for name in d.made:
        sys.modules.pop(name, None)


def make_state() -> Iterator[mmsb.MMSBState]:
    """Fixture body: a started state, stopped after the test (no hook may be left)."""
    st = mmsb.mmsb_start()
    try:
        yield st
    finally:
        mmsb.mmsb_stop(st)
        assert sys.getprofile() is None
        assert trampoline.installed() == 0  # every function has its own code back


PIPELINE = """
def double(state, page):
    src = bytes(state.pages[page.id - 1].data)
    return bytes((b * 2) % 256 for b in src)


def negate(state, page):
    src = bytes(state.pages[page.id - 1].data)
    return bytes((256 - b) % 256 for b in src)


class Scaler:
    def scale(self, x):
        return x * 3

    @staticmethod
    def offset(x):
        return x + 1
"""
