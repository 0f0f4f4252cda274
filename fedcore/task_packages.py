"""Task packages: `fedcore tasks` lists the installed tasks with the version and code hash a
site approves; `fedcore new-task DIR --name NAME` writes a pip-installable task package.

The package holds a PyTorch model, a CSV loader, a small sample data file inside the package
(scikit-learn's wine data: 13 features, 3 cultivars), a test and a README; the entry point
makes `fedcore simulate --task NAME` (on the sample) and `fedcore client --task NAME --data
PATH` work from any directory once it is installed with `pip install -e DIR`.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from fedcore.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*[A-Za-z0-9]$")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    listing = sub.add_parser("tasks", help="list the installed tasks with their version and code hash")
    listing.set_defaults(run=_list_tasks)
    new = sub.add_parser("new-task", help="write a pip-installable task package to start from")
    new.add_argument("dir", help="a new directory")
    new.add_argument("--name", required=True, help="the task's (and its distribution's) name")
    new.set_defaults(run=_new_task)


def _list_tasks(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedcore.tasks import installed_tasks, task_source

    table = Table(title="installed tasks")
    for column in ("task", "from", "package", "version"):
        table.add_column(column)
    table.add_column("code SHA-256", overflow="fold")
    for name in installed_tasks():
        s = task_source(name)
        table.add_row(s.name, s.origin, s.package, s.version, s.code_hash)
    Console().print(table)
    return 0


def _new_task(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    new_task(directory, args.name)
    print(
        f"wrote task package {args.name} in {directory}: pip install -e {directory}, then fedcore simulate --task {args.name}"
    )
    return 0


def module_name(name: str) -> str:
    return name.replace("-", "_").lower()


def new_task(directory: Path, name: str) -> list[Path]:
    """Write the package; ConfigError if the name is not a distribution name or DIR is not empty."""
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '-' and '_' (e.g. heart-task)")
    from importlib.util import find_spec

    from fedcore.tasks import installed_tasks

    if name in installed_tasks() or find_spec(module_name(name)) is not None:
        raise ConfigError(f"--name {name!r} is already a task or an importable module; choose another")
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} is not empty; give a new directory")
    import numpy as np
    from sklearn.datasets import load_wine

    wine = load_wine()
    features = [re.sub(r"\W+", "_", f).strip("_") for f in wine.feature_names]
    x, y = wine.data, wine.target
    package = module_name(name)
    files = {
        "pyproject.toml": _PYPROJECT.format(name=name, package=package),
        f"{package}/__init__.py": _TASK.format(
            name=name,
            features=features,
            classes=len(np.unique(y)),
        ),
        f"{package}/sample.csv": _csv(features, x, y),
        "tests/test_task.py": _TEST.format(name=name, package=package),
        "site.toml": _SITE.format(name=name),
        "README.md": _README.format(name=name, package=package),
    }
    written = []
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _csv(features: list[str], x: np.ndarray, y: np.ndarray) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*features, "label"])
    for row, label in zip(x, y, strict=True):
        writer.writerow([*(f"{v:g}" for v in row), int(label)])
    return out.getvalue()


_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "A fedcore task"
requires-python = ">=3.11"
dependencies = ["fedcore", "numpy", "torch"]

[project.entry-points."fedcore.tasks"]
{name} = "{package}:task"

[tool.setuptools]
packages = ["{package}"]

[tool.setuptools.package-data]
{package} = ["sample.csv"]
"""

_TASK = '''\
"""{name}: a fedcore task. For your data: replace sample.csv, set FEATURES and CLASSES,
and change build_model (and `read`, for another file format).

Sites give their data as a CSV with a header: the FEATURES columns (any order) and a
`label` column holding the class index (0 .. CLASSES - 1).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from torch import nn

from fedcore.tasks import TaskDefinition

FEATURES = {features!r}
CLASSES = {classes}
SAMPLE = Path(__file__).with_name("sample.csv")  # replace it with a sample of your data


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(len(FEATURES), 32), nn.ReLU(), nn.Linear(32, CLASSES))


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw features (float32) and labels (int) from a CSV; ValueError says what is wrong."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{{path}}: empty file")
    header = [name.strip() for name in rows[0]]
    wanted = [*FEATURES, "label"]
    missing = [c for c in wanted if c not in header]
    extra = [c for c in header if c not in wanted]
    doubled = sorted({{c for c in header if header.count(c) > 1}})
    if missing or extra or doubled:
        raise ValueError(f"{{path}}: columns differ from the task's: missing {{missing}}, extra {{extra}}, twice {{doubled}}")
    columns = [header.index(c) for c in FEATURES]
    x, y = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{{path}}, line {{line}}: {{len(row)}} fields, the header has {{len(header)}}")
        try:
            x.append([float(row[i]) for i in columns])
            label = float(row[header.index("label")])
        except ValueError as err:
            raise ValueError(f"{{path}}, line {{line}}: not a number ({{err}})") from None
        if label != int(label) or not 0 <= label < CLASSES:
            raise ValueError(f"{{path}}, line {{line}}: label {{label:g}} is not a class 0 .. {{CLASSES - 1}}")
        y.append(int(label))
    if not y:
        raise ValueError(f"{{path}}: no data rows")
    return np.array(x, dtype=np.float32), np.array(y, dtype=np.int64)


# Standardisation every site applies: statistics the federation agrees on, here the shipped
# sample's (never a site's own: the model must see one feature scale).
_SAMPLE_X, _ = read(SAMPLE)
MEAN = _SAMPLE_X.mean(axis=0)
STD = np.where(_SAMPLE_X.std(axis=0) > 0, _SAMPLE_X.std(axis=0), 1.0).astype(np.float32)


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Standardised features and labels from a site's CSV."""
    x, y = read(path)
    return (x - MEAN) / STD, y


task = TaskDefinition(
    name="{name}",
    model=build_model,
    load=load,
    sample=lambda: load(SAMPLE),
    defaults={{"local_epochs": 2, "batch_size": 16, "lr": 0.05}},
)
'''

_TEST = '''\
"""The task loads its sample and trains to a useful model in a short simulation."""

from pathlib import Path

import pytest

from fedcore import load_experiment, run_simulation
from {package} import SAMPLE, load


def test_the_sample_loads() -> None:
    x, y = load(SAMPLE)
    assert len(x) == len(y) > 0


def test_a_bad_file_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("something,label\\n1,0\\n")
    with pytest.raises(ValueError, match="missing"):
        load(bad)


def test_five_rounds_of_three_sites_learn() -> None:
    experiment = load_experiment().override(
        task__name="{name}", federation__rounds=5, simulation__sites=3, simulation__workers=1
    )
    result, _ = run_simulation(experiment, None)
    assert result.records[-1].accuracy >= 0.8
'''

_SITE = """\
# A site's settings for `fedcore client --config site.toml`; flags override them.
[server]
address = "localhost:7443"

[identity]
kit = "kit"  # this site's folder from `fedcore pki add-site` (relative to this file)

[data]
task = "{name}"
uri = "data.csv"  # the site's own data: the task's columns and a label column

[policy]
# The task code this site runs: NAME==VERSION. A job of any other task or version is
# declined; add @SHA256 (the hash `fedcore tasks` prints) to approve exactly one code.
tasks = ["{name}==0.1.0"]
"""

_README = """\
# {name}

A fedcore task: a PyTorch model and a CSV loader (`{package}/__init__.py`), with a small
sample data set shipped in the package (`{package}/sample.csv`).

```bash
pip install -e .                       # registers the task with fedcore (entry point)
fedcore tasks                          # lists it, with its version and code hash
fedcore simulate --task {name}         # virtual sites on the sample
pytest tests                           # the task's own test
fedcore client --config site.toml       # a site: its server, kit, data, and the code it approves
```

`site.toml` approves this task's version 0.1.0 only (`[policy] tasks`); pin the exact code
with `{name}==0.1.0@SHA256`, the hash `fedcore tasks` prints.
"""
