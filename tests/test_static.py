"""The conventions the team holds itself to: ruff clean, mypy strict on fedcore/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_lint_and_format() -> None:
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
    for args in (
        ["check", "fedcore", "tests", "simulations", "proto"],
        ["format", "--check", "fedcore", "tests"],
    ):
        done = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "fedcore"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
