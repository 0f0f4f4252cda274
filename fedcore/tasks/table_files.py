"""Reading a site's table (CSV or Parquet) against the job's schema, with one clear line
for every way a file can fail to fit (rows counted from 1, after a CSV's header): a missing or extra column, a label outside the job's
classes, text in a numeric column.

A table is read into columns of Python values (str, float, int or None); `TableSchema`
turns it into a feature matrix: numeric columns as float64 (NaN where missing), each
categorical column one-hot over the job's categories (all zeros for a category the job does
not name, NaN across its block where missing, for the imputation to fill).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})  # empty cells, as text
PARQUET = (".parquet", ".pq")

Columns = dict[str, list[Any]]


def read_table(path: Path) -> Columns:
    """The file's columns by name (CSV by its header row; Parquet through pyarrow)."""
    if not path.is_file():
        raise ValueError(f"data {path} is not a file")
    if path.suffix.lower() in PARQUET:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{path}: reading Parquet needs pyarrow: pip install 'fedcore[parquet]'"
            ) from None
        try:
            columns: Columns = pq.read_table(path).to_pydict()
        except Exception as err:  # pyarrow's errors have no common base worth naming
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
        return columns
    with path.open(newline="", encoding="utf-8-sig") as f:
        try:
            rows = list(csv.reader(f))
        except (csv.Error, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise ValueError(f"{path}: empty file (a CSV needs a header row)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in the header")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    for line, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise ValueError(f"{path}: row {line} has {len(row)} fields, the header {len(header)}")
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING


def number(value: Any) -> float | None:
    """A cell as a finite float, NaN when missing, None when it is not a number."""
    if is_missing(value):
        return math.nan
    if isinstance(value, bool):
        return float(value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def label_text(value: Any) -> str:
    """A label cell as the class name it stands for (1.0 and "1" are both class "1")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass(frozen=True)
class TableSchema:
    """The job's table: the label column, the classes, the feature columns in order, the
    categories of the categorical ones and public bounds of numeric ones."""

    label: str
    classes: tuple[str, ...]
    columns: tuple[str, ...]
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError("task tabular needs at least 2 classes")
        if not self.columns or len(set(self.columns)) != len(self.columns):
            raise ValueError("task tabular needs distinct feature columns")
        if self.label in self.columns:
            raise ValueError(f"the label {self.label!r} is also a feature column")
        if unknown := sorted(set(self.categories) - set(self.columns)):
            raise ValueError(f"categories for columns {unknown} that are not features")
        for name, values in self.categories.items():
            names = [label_text(v) for v in values]
            if not names or len(set(names)) != len(names) or not all(names):
                raise ValueError(
                    f"the categories of {name!r} must be distinct, non-empty names, not {values}"
                )
        for name, bounds in self.ranges.items():
            if name not in self.numeric or len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"range of {name!r} must be [low, high] of a numeric feature, not {bounds}")

    @property
    def numeric(self) -> list[str]:
        return [c for c in self.columns if c not in self.categories]

    def widths(self) -> list[int]:
        """Features per column, in column order (what `read` encodes)."""
        return [len(self.categories[c]) if c in self.categories else 1 for c in self.columns]

    @property
    def width(self) -> int:
        """Features the model takes: one per numeric column, one per category."""
        return sum(self.widths())

    @property
    def bounded(self) -> bool:
        """Every numeric column has public bounds (a statistic's sensitivity is finite)."""
        return all(c in self.ranges for c in self.numeric)

    def to_job(self) -> dict[str, str]:
        return {
            "label": self.label,
            "classes": json.dumps(list(self.classes)),
            "columns": json.dumps(list(self.columns)),
            "categories": json.dumps({k: list(v) for k, v in self.categories.items()}),
            "ranges": json.dumps({k: list(v) for k, v in self.ranges.items()}),
        }

    def read(self, path: Path, *, features: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of a site's file; ValueError naming the first mismatch.
        `features`: the columns the site uses (others in its file are ignored)."""
        table = read_table(path)
        if self.label not in table:
            raise ValueError(f"{path}: no label column {self.label!r} (columns: {', '.join(table)})")
        used = set(features) if features is not None else set(table) - {self.label}
        if missing := [c for c in self.columns if c not in table or c not in used]:
            raise ValueError(f"{path}: missing columns {missing} of the job's schema")
        if extra := sorted(used - set(self.columns)):
            raise ValueError(
                f"{path}: extra columns {extra} not in the job's schema "
                "(name the ones to use with [data] features in site.toml)"
            )
        if not table[self.label]:
            raise ValueError(f"{path}: no rows")
        index = {name: i for i, name in enumerate(self.classes)}
        labels = []
        for row, value in enumerate(table[self.label], start=1):
            name = label_text(value)
            if is_missing(value) or name not in index:
                raise ValueError(
                    f"{path}: row {row}: label {name!r} is not one of the job's classes {list(self.classes)}"
                )
            labels.append(index[name])
        blocks = [self._encode(path, c, table[c]) for c in self.columns]
        x = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(labels), 0))
        return x, np.array(labels, dtype=np.int64)

    def _encode(self, path: Path, column: str, values: list[Any]) -> np.ndarray:
        if column in self.categories:
            names = {c: i for i, c in enumerate(self.categories[column])}
            block = np.zeros((len(values), len(names)))
            for r, value in enumerate(values):
                if is_missing(value):
                    block[r] = np.nan  # imputed from the federated statistics
                elif (i := names.get(label_text(value))) is not None:
                    block[r, i] = 1.0  # a category the job does not name stays all zeros
            return block
        out = np.empty((len(values), 1))
        for r, value in enumerate(values):
            parsed = number(value)
            if parsed is None:
                raise ValueError(f"{path}: column {column!r}, row {r + 1}: {value!r} is not a number")
            out[r, 0] = parsed
        return out


def schema_from_job(job: Mapping[str, Any]) -> TableSchema | None:
    """The schema the job states, or None when it names no columns."""
    if "columns" not in job:
        return None
    if "label" not in job or "classes" not in job:
        raise ValueError("task tabular needs [task] label and classes with its columns")
    ranges = json.loads(job.get("ranges", "{}"))
    return TableSchema(
        label=str(job["label"]),
        classes=tuple(json.loads(job["classes"])),
        columns=tuple(json.loads(job["columns"])),
        categories={k: tuple(v) for k, v in json.loads(job.get("categories", "{}")).items()},
        ranges={k: (float(v[0]), float(v[1])) for k, v in ranges.items()},
    )


def infer_schema(path: Path, label: str) -> TableSchema:
    """A file's schema (for simulate): every other column a feature, categorical when any
    cell is not a number; classes and categories sorted; ranges from the file's values."""
    table = read_table(path)
    if label not in table:
        raise ValueError(f"--label {label!r} names no column of {path} (columns: {', '.join(table)})")
    columns = tuple(c for c in table if c != label)
    categories: dict[str, tuple[str, ...]] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for c in columns:
        parsed = [number(v) for v in table[c]]
        if any(p is None for p in parsed):
            categories[c] = tuple(sorted({label_text(v) for v in table[c] if not is_missing(v)}))
        elif present := [p for p in parsed if p is not None and not math.isnan(p)]:
            low, high = min(present), max(present)
            ranges[c] = (low, high if high > low else low + 1.0)
    names = {label_text(v) for v in table[label] if not is_missing(v)}
    numeric = all(number(n) is not None for n in names)
    classes = tuple(sorted(names, key=lambda n: (float(n), n) if numeric else (0.0, n)))
    return TableSchema(label, classes, columns, categories, ranges)
