"""The linters CI holds the code to: `ruff check` (rule set in pyproject's [tool.ruff]) and `mypy` (configured in
[tool.mypy]: the four packages' src/). Both come from the locked dev group, so CI and a developer's machine run
the same versions. mypy takes a minute on a cold cache, so it is marked slow (skipped by `-m "not slow"`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what CI lints: every package's sources and tests, the benchmarks and the repository tests
RUFF_PATHS = [*sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("packages/*/src")),
              *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("packages/*/tests")), "benchmarks", "tests"]


def run_tool(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    # `python -m` from this interpreter: the virtual environment's tool, whatever else is on PATH
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def test_ruff_check() -> None:
    p = run_tool("ruff", "check", "--no-cache", *RUFF_PATHS, timeout_s=120)
    assert p.returncode == 0, f"ruff check failed:\n{p.stdout}{p.stderr}"


@pytest.mark.slow
def test_mypy() -> None:
    p = run_tool("mypy", timeout_s=600)
    assert p.returncode == 0, f"mypy failed:\n{p.stdout}{p.stderr}"
