"""`breast_cancer`: scikit-learn's bundled Wisconsin diagnostic data (569 patients, 30
features, malignant = 0 / benign = 1), as if split across hospitals."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.datasets import load_breast_cancer
from torch import nn

from fedcore.tasks.base import Dataset
from fedcore.tasks.bundled import BundledTask

FEATURES = 30


class BreastCancer(BundledTask):
    name = "breast_cancer"
    models = ("logreg", "mlp")
    input_description = "N x 30 float32: the 30 features, standardised with the bundled data's mean and std"
    defaults: ClassVar[dict[str, Any]] = {
        "local_epochs": 5,
        "batch_size": 16,
        "lr": 0.2,
        "weight_decay": 0.01,
    }

    @cached_property
    def _scaling(self) -> tuple[np.ndarray, np.ndarray]:
        # Published reference statistics of the bundled data, shared by every site so that
        # the model sees one feature scale (a CSV site is scaled the same way).
        x = load_breast_cancer().data
        return x.mean(axis=0), x.std(axis=0)

    def _scale(self, x: np.ndarray) -> np.ndarray:
        mean, std = self._scaling
        return np.asarray((x - mean) / std, dtype=np.float32)

    def load_bundled(self) -> Dataset:
        bunch = load_breast_cancer()
        return Dataset(self._scale(bunch.data), bunch.target.astype(np.int64))

    def load_file(self, path: Path) -> Dataset:
        """A CSV of 30 feature columns then the label (0 malignant, 1 benign); a header row
        is skipped when its first field is not a number."""
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        with path.open() as f:
            first = f.readline().split(",")[0].strip()
        try:
            float(first)
            skip = 0
        except ValueError:
            skip = 1
        table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        if table.shape[1] != FEATURES + 1:
            raise ValueError(
                f"{path}: expected {FEATURES + 1} columns (30 features, label), got {table.shape[1]}"
            )
        labels = table[:, -1]
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{path}: the last column must be 0 (malignant) or 1 (benign)")
        if not np.isfinite(table).all():  # loadtxt reads "nan" and "inf" as numbers
            raise ValueError(f"{path}: the features must be finite numbers (found nan or inf)")
        return Dataset(self._scale(table[:, :-1]), labels.astype(np.int64))

    def build_model(self) -> nn.Module:
        if self.model == "mlp":
            return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))
        return nn.Sequential(nn.Linear(FEATURES, 2))
