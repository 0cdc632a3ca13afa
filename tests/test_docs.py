"""The documentation matches the code: every public name is documented, every
``mmsb`` subcommand is listed, the examples and the README's usage snippet run."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mmsb

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "API.md"
EXAMPLE_TIMEOUT_S = 120


def _api_text() -> str:
    return API_MD.read_text(encoding="utf-8")


def _documented_names(text: str) -> set[str]:
    """Names in backticks (`name`, `name(...)`, `mmsb.name`) or as a heading."""
    names: set[str] = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        m = re.match(r"(?:mmsb\.)?([A-Za-z_][A-Za-z0-9_]*)", span.strip())
        if m:
            names.add(m.group(1))
    for heading in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.MULTILINE):
        names.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", heading))
    return names


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_every_public_name_is_in_api_md() -> None:
    documented = _documented_names(_api_text())
    missing = [name for name in mmsb.__all__ if name not in documented]
    assert not missing, f"names of mmsb.__all__ missing from docs/API.md: {', '.join(missing)}"


def test_every_config_field_is_in_api_md() -> None:
    text = _api_text()
    missing = [f.name for f in dataclasses.fields(mmsb.MMSBConfig) if f"`{f.name}`" not in text]
    assert not missing, f"MMSBConfig fields missing from docs/API.md: {', '.join(missing)}"


@pytest.mark.parametrize("script", ["quickstart.py", "tutorial.py", "langgraph_agent.py",
                                    "processes.py", "replication.py"])
def test_example_runs(script: str, tmp_path: Path) -> None:
    path = ROOT / "examples" / script
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert proc.returncode == 0, (f"examples/{script} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    assert proc.stdout.strip(), f"examples/{script} printed nothing"


def _cli_commands() -> list[str]:
    proc = subprocess.run([sys.executable, "-c", "from mmsb.cli import main; main()", "--help"],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Commands:")
    commands = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        m = re.match(r"\s+([a-z][a-z0-9_-]*)(\s|$)", line)
        if m:
            commands.append(m.group(1))
    return commands


def test_every_cli_command_is_in_api_md() -> None:
    commands = _cli_commands()
    assert commands, "`mmsb --help` listed no commands"
    text = _api_text()
    missing = [c for c in commands if f"`mmsb {c}" not in text]
    assert not missing, f"`mmsb` commands missing from docs/API.md: {', '.join(missing)}"


def test_readme_usage_snippet_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert m, "README.md has no ```python block"
    proc = subprocess.run([sys.executable, "-c", m.group(1)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert proc.returncode == 0, (f"README's first python block failed ({proc.returncode}):\n"
                                  f"{proc.stderr[-3000:]}")
