"""What every benchmark records beside its figures: package versions and the machine's state."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any

PACKAGES = ("fedcore", "flwr", "ray", "torch", "grpcio", "numpy")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """Versions and machine; the machine is shared, so the load shows what else competed."""
    return {
        "versions": {**{p: version(p) for p in PACKAGES}, "python": platform.python_version()},
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
    }


# Keep Ray and Flower offline and quiet: set in a child's environment, so that they hold
# before flwr/ray are imported and are inherited by Ray's processes.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # telemetry would try to reach the internet
    "RAY_USAGE_STATS_ENABLED": "0",  # same for Ray usage stats
    "RAY_DEDUP_LOGS": "0",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def quiet_flower() -> None:
    """In a Flower child process, before flwr/ray are imported: offline, quiet, and their
    import-time deprecation warnings (not ours to fix) silenced."""
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


def rounds_progress(console: Any) -> Any:
    """The progress display the benchmarks share: one bar per run, counted in rounds."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
    )


def run_json_child(script: str, args: list[str], *, what: str) -> dict[str, Any]:
    """Run `script` in a fresh interpreter (Ray and Flower keep process-global state, and
    peak memory then covers only that run) and return the last JSON line it prints."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **QUIET_ENV},
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); stdout tail:\n" + proc.stdout[-2000:])
    result: dict[str, Any] = json.loads(lines[-1])
    return result
