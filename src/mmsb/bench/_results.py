"""Results documents: the environment, JSON save / load, baseline comparison."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._registry import CATEGORIES

__all__ = [
    "SCHEMA_VERSION",
    "Comparison",
    "compare_results",
    "environment",
    "find_repo_root",
    "load_results",
    "merge_baseline",
    "save_results",
]

SCHEMA_VERSION = 1
FASTER = 0.9
SLOWER = 1.1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(args: list[str], cwd: Path) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run(
            [git, *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    if module == "lmdb":
        return ".".join(str(x) for x in mod.version())
    return str(getattr(mod, "__version__", "unknown"))


def environment() -> dict[str, Any]:
    """Where and on what a run happened: Python, numpy, CPU, commit, date."""
    import sqlite3

    import numpy

    try:
        import mmsb

        mmsb_version = str(getattr(mmsb, "__version__", "unknown"))
        here = Path(mmsb.__file__).resolve().parent
    except ImportError:
        mmsb_version, here = "not importable", Path.cwd()
    commit = _git(["rev-parse", "HEAD"], here)
    dirty = None
    if commit is not None:
        status = _git(["status", "--porcelain", "--untracked-files=no"], here)
        dirty = bool(status) if status is not None else None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "numpy": numpy.__version__,
        "mmsb": mmsb_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "sqlite": sqlite3.sqlite_version,
        "lmdb": _version("lmdb"),
        "torch": _version("torch"),
    }
    return env


def save_results(doc: Mapping[str, Any], path: Path) -> None:
    """Write a results document as indented JSON (atomically: temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=float) + "\n", "utf-8")
    os.replace(tmp, path)


def load_results(path: Path) -> dict[str, Any]:
    """Read a results document; ``ValueError`` with the reason if it is not one."""
    try:
        doc = json.loads(Path(path).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read benchmark results from {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), dict):
        raise ValueError(f"{path} is not an MMSB benchmark results file (no 'cases' object)")
    return doc


def merge_baseline(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` with the cases of ``old`` that ``new`` did not run kept (same mode only).

    Lets a subset of categories refresh a baseline without rerunning everything.
    """
    merged = dict(new)
    if old is None or old.get("mode") != new.get("mode"):
        return merged
    ran = set(new.get("categories", ()))
    cases = {k: v for k, v in old.get("cases", {}).items() if v.get("category") not in ran}
    cases.update(new.get("cases", {}))
    merged["cases"] = cases
    union = set(old.get("categories", ())) | ran
    merged["categories"] = [c for c in CATEGORIES if c in union]
    return merged


def find_repo_root(start: Path | None = None) -> Path | None:
    """The MMSB checkout containing ``start`` (default: the working directory), if any."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        pyproject = d / "pyproject.toml"
        if pyproject.is_file() and (d / "benchmarks").is_dir():
            try:
                text = pyproject.read_text("utf-8")
            except OSError:
                continue
            if 'name = "mmsb"' in text:
                return d
    return None


@dataclass(frozen=True, slots=True)
class Comparison:
    """One case, this run against a baseline."""

    key: str
    baseline_ns: float | None
    current_ns: float | None
    ratio: float | None
    """current / baseline median: < 0.9 faster, > 1.1 slower."""
    verdict: str
    """``faster``, ``slower``, ``similar``, ``new``, ``gone`` or ``skipped``."""


def compare_results(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[Comparison]:
    """Per case: faster (< 0.9 x), slower (> 1.1 x) or similar, by median time."""
    cur, base = current.get("cases", {}), baseline.get("cases", {})
    rows: list[Comparison] = []
    for key, rec in cur.items():
        old = base.get(key)
        now = rec.get("median_ns") if rec.get("status") == "ok" else None
        then = old.get("median_ns") if old and old.get("status") == "ok" else None
        if now is None:
            rows.append(Comparison(key, then, None, None, "skipped"))
        elif old is None:
            rows.append(Comparison(key, None, now, None, "new"))
        elif then is None or then <= 0:
            rows.append(Comparison(key, then, now, None, "skipped"))
        else:
            ratio = now / then
            verdict = "faster" if ratio < FASTER else "slower" if ratio > SLOWER else "similar"
            rows.append(Comparison(key, then, now, ratio, verdict))
    ran = set(current.get("categories", ()))
    for key, old in base.items():
        if key not in cur and old.get("category") in ran:
            rows.append(Comparison(key, old.get("median_ns"), None, None, "gone"))
    return rows
