"""What every benchmark records beside its figures: package versions and the machine's state."""

from __future__ import annotations

import importlib.metadata
import os
import platform
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
