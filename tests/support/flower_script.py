"""Run a test file's Flower half in a fresh interpreter (Ray and Flower keep process-global
state) and read the JSON line it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def run_flower_script(script: str | Path, *args: str) -> dict[str, Any]:
    """`python SCRIPT ARGS...` with simulations/ importable; its last JSON line."""
    env = {
        **os.environ,
        **QUIET_ENV,
        "PYTHONPATH": os.pathsep.join([str(SIMULATIONS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"Flower simulation failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
    )
    result: dict[str, Any] = json.loads(lines[-1])
    return result
