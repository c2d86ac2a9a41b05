"""The code's own checks, run by the same command as every other test (so CI proves them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing_to_fix() -> None:
    """ruff (rules and their justified exceptions in pyproject.toml) passes on the package, tests and bench."""
    result = _run("ruff", "check", "relay", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_the_package() -> None:
    """mypy --strict (configured in pyproject.toml) passes on relay/."""
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
