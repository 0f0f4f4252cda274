"""A run's per-round records and where they go (one place for every metric consumer)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import save_file

from fedcore.tensors import Arrays


@dataclass
class RoundRecord:
    round: int
    sites: int  # updates aggregated
    accuracy: float | None  # global model after the round, on the held-out split
    loss: float | None
    seconds: float
    sampled: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # site -> reason
    train_loss: float | None = None  # sites' mean local training loss, example-weighted
    fit_metrics: dict[str, float] = field(default_factory=dict)  # every numeric fit metric, example-weighted
    attempt: int = 1  # > 1 when earlier attempts at this round failed
    evaluation: str = "central"  # or "federated"
    examples: int = 0  # training examples behind the aggregated updates
    bytes_sent: int = 0  # model payload bytes sent to sites this round (all attempts)
    bytes_received: int = 0  # update payload bytes received from sites
    secure_aggregation: dict[str, Any] = field(default_factory=dict)  # per-stage counts and seconds
    epsilon: float | None = None  # the run's DP epsilon after this round (None: no DP)
    delta: float | None = None
    site_epsilon: dict[str, float] = field(default_factory=dict)  # sample-level: each reporting site's
    privacy: dict[str, Any] = field(default_factory=dict)  # mode, noise, clip norm, sites' noise in the sum

    def as_json(self) -> dict[str, Any]:
        """A JSON-safe dict: non-finite numbers (NaN, infinity) become null."""
        clean: dict[str, Any] = _finite(asdict(self))
        return clean


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class RoundStore(Protocol):
    """Records each completed round and the global model after it."""

    def record(self, record: RoundRecord, parameters: Arrays) -> None: ...


class DirectoryStore:
    """`metrics.jsonl` (one JSON object per round) and `model.safetensors` (latest global
    model, written atomically) in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = directory / "metrics.jsonl"
        self.model_path = directory / "model.safetensors"
        self.metrics_path.write_text("")

    def record(self, record: RoundRecord, parameters: Arrays) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record.as_json()) + "\n")
        save_model(self.model_path, parameters, metadata={"round": str(record.round)})


class MemoryStore:
    def __init__(self) -> None:
        self.records: list[RoundRecord] = []

    def record(self, record: RoundRecord, parameters: Arrays) -> None:
        self.records.append(record)


class FanOutStore:
    """Hands every round to several stores."""

    def __init__(self, stores: list[RoundStore]) -> None:
        self.stores = stores

    def record(self, record: RoundRecord, parameters: Arrays) -> None:
        for store in self.stores:
            store.record(record, parameters)


def save_model(path: Path, parameters: Arrays, metadata: dict[str, str] | None = None) -> None:
    """Write parameters as safetensors, atomically (never a torn file after a crash)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in parameters.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
