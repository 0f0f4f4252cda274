"""`tabular`: a site's own table (CSV or Parquet) and logistic regression or a small MLP.

The schema is part of the job (`[task] label`, `classes`, `columns`, `categories`,
`ranges`; see `table_files`). Numeric columns are standardised, and missing values imputed,
from statistics the federation agrees on before round 1: each site sends, per numeric
column, its count of present values, their sum and their sum of squares, and per
categorical column its count of each category (a vector `statistics()`), and the server
learns only the sums when secure aggregation is on (the engine's statistics exchange). With
public `ranges`, values are clipped to them first, so one record moves the vector by at most
sqrt(3 x numeric + categorical) in L2: what a site's DP noise is scaled to. With
`standardise = "ranges"` no statistics are exchanged: values are scaled to [-1, 1] by the
ranges alone.

`fedcore simulate --task tabular --data FILE --label COL` infers the schema from the file
(public bounds from its own values, which is only right for a simulation) and splits it: 20%
held out, stratified, for the server's accuracy; the rest across the virtual sites. A
deployed site holds out 20% of its own file (stratified, fixed seed) for federated evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from fedcore.config import Standardise
from fedcore.tasks.base import Dataset, Evaluation, FitOutcome, SiteData, TrainSettings
from fedcore.tasks.bundled import OwnDataTask
from fedcore.tasks.table_files import TableSchema, infer_schema, schema_from_job
from fedcore.tensors import Arrays

_TINY = 1e-12  # a spread below this is a constant column: it is centred, not scaled


class Tabular(OwnDataTask):
    name = "tabular"
    data_kind = "FILE"
    models = ("logreg", "mlp")
    input_description = (
        "N x F float32: numeric columns standardised with the run's statistics (missing: 0), "
        "each categorical column one-hot over the job's categories, in the job's column order"
    )
    defaults: ClassVar[dict[str, Any]] = {"local_epochs": 2, "batch_size": 16, "lr": 0.1, "weight_decay": 0.0}

    def __init__(self, model: str | None = None) -> None:
        super().__init__(model)
        self.schema: TableSchema | None = None
        self.standardise = Standardise.FEDERATED
        self.data: Path | None = None
        self.features: Sequence[str] | None = None  # the site's choice of its file's columns
        self.centre: np.ndarray | None = None  # per feature: subtracted, then divided by `spread`
        self.spread: np.ndarray | None = None
        self.fill: np.ndarray | None = None  # per feature: what a missing value becomes

    def configure(self, job: Mapping[str, Any]) -> None:
        if "data" in job:
            self.data = Path(str(job["data"]))
        if "features" in job:
            self.features = list(job["features"])
        self.standardise = Standardise(str(job.get("standardise", Standardise.FEDERATED.value)))
        schema = schema_from_job(job)
        if schema is None and self.data is not None:
            if "label" not in job:
                raise ValueError("task tabular needs the label column: --label COLUMN")
            schema = infer_schema(self.data, str(job["label"]))
        elif schema is not None and "label" in job:
            schema = TableSchema(
                str(job["label"]), schema.classes, schema.columns, schema.categories, schema.ranges
            )
        if schema is None:
            raise ValueError(
                "task tabular needs its schema: [task] label, classes and columns (or data to infer them)"
            )
        if self.standardise is Standardise.RANGES and not schema.bounded:
            raise ValueError("standardise = 'ranges' needs [task] ranges for every numeric column")
        self.schema = schema
        self.centre = self.spread = self.fill = None
        if self.standardise is Standardise.RANGES:
            self._from_ranges()
        self.__dict__.pop("_split", None)

    def job(self) -> dict[str, str]:
        """The schema as job settings (what `simulate` infers is what its sites are told)."""
        assert self.schema is not None
        return {**self.schema.to_job(), "standardise": self.standardise.value}

    @property
    def _schema(self) -> TableSchema:
        if self.schema is None:
            raise ValueError("task tabular is not configured: [task] label, classes and columns")
        return self.schema

    def build_model(self) -> nn.Module:
        width, classes = self._schema.width, len(self._schema.classes)
        if self.model == "logreg":
            return nn.Linear(width, classes)
        return nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, classes))

    def load_file(self, path: Path) -> Dataset:
        x, y = self._schema.read(path, features=self.features)
        return Dataset(x, y)

    # --- federated statistics -------------------------------------------------------------

    def statistics_size(self) -> int:
        if self.standardise is Standardise.RANGES:
            return 0
        s = self._schema
        return 3 * len(s.numeric) + sum(len(v) for v in s.categories.values())

    def statistics_sensitivity(self) -> float | None:
        s = self._schema
        return math.sqrt(3 * len(s.numeric) + len(s.categories)) if s.bounded else None

    def statistics(self, data: Dataset) -> np.ndarray:
        """Per numeric column [count, sum, sum of squares] of its present values (in units
        of its range when it has one: clipped, then (x - low) / (high - low)); per
        categorical column the count of each category."""
        parts: list[np.ndarray] = []
        for column, block in self._blocks(data.x):
            if column in self._schema.categories:
                parts.append(np.nansum(block, axis=0))
                continue
            values = self._unit(column, block[:, 0])
            present = values[~np.isnan(values)]
            parts.append(np.array([present.size, present.sum(), np.square(present).sum()]))
        return np.concatenate(parts).astype(np.float64)

    def use_statistics(self, total: np.ndarray) -> None:
        """Standardise with the federation's summed statistics (noisy ones are clamped to
        what a range allows: a mean within it, a spread within half its width)."""
        s = self._schema
        if total.shape != (self.statistics_size(),) or not np.isfinite(total).all():
            raise ValueError(f"the run's statistics must be {self.statistics_size()} finite numbers")
        centre, spread, fill = [], [], []
        at = 0
        for column in s.columns:
            if column in s.categories:
                counts = total[at : at + len(s.categories[column])]
                at += counts.size
                centre += [0.0] * counts.size
                spread += [1.0] * counts.size
                fill += list(np.eye(counts.size)[int(np.argmax(counts))])  # the most common category
                continue
            count, total_sum, squares = total[at : at + 3]
            at += 3
            low, width = self._range(column)
            n = max(count, 1.0)
            mean = total_sum / n
            variance = squares / n - mean * mean
            if column in s.ranges:
                mean, variance = min(max(mean, 0.0), 1.0), min(variance, 0.25)
            std = math.sqrt(variance) if variance > _TINY else 0.0
            centre.append(low + width * mean)
            spread.append(width * std if std > 0 else 1.0)
            fill.append(0.0)  # the mean, once standardised
        self.centre, self.spread, self.fill = np.array(centre), np.array(spread), np.array(fill)

    def _from_ranges(self) -> None:
        s = self._schema
        centre, spread = [], []
        for column in s.columns:
            if column in s.categories:
                centre += [0.0] * len(s.categories[column])
                spread += [1.0] * len(s.categories[column])
            else:
                low, width = self._range(column)
                centre.append(low + width / 2)
                spread.append(width / 2)
        self.centre, self.spread = np.array(centre), np.array(spread)
        self.fill = np.zeros(len(centre))

    def _range(self, column: str) -> tuple[float, float]:
        low, high = self._schema.ranges.get(column, (0.0, 1.0))
        return low, high - low

    def _unit(self, column: str, values: np.ndarray) -> np.ndarray:
        if column not in self._schema.ranges:
            return values
        low, width = self._range(column)
        unit: np.ndarray = (np.clip(values, low, low + width) - low) / width
        return unit

    def _blocks(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        widths = self._schema.widths()
        if x.ndim != 2 or x.shape[1] != sum(widths):
            raise ValueError(f"features of shape {x.shape}; the schema encodes {sum(widths)} per row")
        out, at = [], 0
        for column, size in zip(self._schema.columns, widths, strict=True):
            out.append((column, x[:, at : at + size]))
            at += size
        return out

    def prepared(self, data: Dataset) -> Dataset:
        """The model's input: clipped to the ranges, standardised, missing values filled."""
        if self.centre is None or self.spread is None or self.fill is None:
            raise ValueError(
                "task tabular has no standardisation yet: the run's statistics come before round 1"
            )
        x = np.concatenate(
            [
                self._unit(c, b[:, 0])[:, None] * self._range(c)[1] + self._range(c)[0]
                if c not in self._schema.categories
                else b
                for c, b in self._blocks(data.x)
            ],
            axis=1,
        )
        x = (x - self.centre) / self.spread
        x = np.where(np.isnan(x), self.fill, x)
        return Dataset(x.astype(np.float32), data.y)

    def preprocessing(self) -> dict[str, Any]:
        """The model's input from a raw row: each feature clipped to its column's range,
        minus `centre`, over `spread`; a missing one is `fill`."""
        s = self._schema
        if self.centre is None or self.spread is None or self.fill is None:
            return {}
        names = [f"{c}={v}" if v else c for c in s.columns for v in s.categories.get(c, ("",))]
        return {
            "features": names,
            "ranges": {c: list(r) for c, r in s.ranges.items()},
            "centre": self.centre.tolist(),
            "spread": self.spread.tolist(),
            "fill": self.fill.tolist(),
            "classes": list(s.classes),
        }

    def fit(self, parameters: Arrays, data: SiteData, settings: TrainSettings) -> FitOutcome:
        return super().fit(parameters, SiteData(self.prepared(data.train), data.test), settings)

    def evaluate(self, parameters: Arrays, data: Dataset) -> Evaluation:
        return super().evaluate(parameters, self.prepared(data))
