"""scikit-learn's bundled wine data (178 rows, 13 numeric columns, 3 classes) as a site's CSV."""

from __future__ import annotations

from pathlib import Path

from sklearn.datasets import load_wine


def write_wine_csv(path: Path, label: str = "target") -> Path:
    data = load_wine()
    lines = [",".join([*data.feature_names, label])]
    lines += [
        ",".join([*map(repr, map(float, x)), str(int(y))])
        for x, y in zip(data.data, data.target, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
