"""A scaffolded task package, installed as a site would install it (`pip install -e`),
runs from any directory in `fedcore simulate` and in a real federation over mutual TLS
with sample-level DP and secure aggregation; a site whose policy does not approve the
task's code declines the job, and the server records why."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cli_federation import fedcore, free_port, start_sites, wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "scaffold-check"
# Run in a fresh interpreter (the installed entry point is visible there).
ONNX_CHECK = f"""
import sys, numpy as np, onnxruntime, torch
from pathlib import Path
from fedcore.engine.run_store import SqliteRunStore
from fedcore.tasks import build_task
with SqliteRunStore(Path(sys.argv[1]), read_only=True) as store:
    arrays = store.model(store.last_round())
task = build_task("{NAME}")
x = task.test_data(seed=0, partitions=5).x
net = task._model_from(arrays).eval()
want = net(torch.as_tensor(x)).detach().numpy()
got = onnxruntime.InferenceSession(sys.argv[2]).run(None, {{"input": x}})[0]
np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
"""
FEDCORE = [sys.executable, "-m", "fedcore"]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("task") / "pkg"
    subprocess.run([*FEDCORE, "new-task", str(directory), "--name", NAME], check=True, capture_output=True)
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-e",
        str(directory),
    ]
    subprocess.run(install, check=True, capture_output=True)
    try:
        yield directory
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", NAME], capture_output=True)


def test_the_scaffold_runs_from_any_directory(package: Path, tmp_path: Path) -> None:
    listed = subprocess.run([*FEDCORE, "tasks"], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert NAME in listed.stdout and "entry point" in listed.stdout
    done = subprocess.run(
        [*FEDCORE, "simulate", "--task", NAME, "--rounds", "10", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["accuracy"] >= 0.9
    # Its model exports to ONNX, and onnxruntime predicts what PyTorch does.
    onnx_path = tmp_path / "model.onnx"
    exported = subprocess.run(
        [*FEDCORE, "models", "export", str(tmp_path / "run"), "--format", "onnx", "-o", str(onnx_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    check = subprocess.run(
        [sys.executable, "-c", ONNX_CHECK, str(tmp_path / "run"), str(onnx_path)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr[-2000:]
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        capture_output=True,
        text=True,
        cwd=package,
    )
    assert tests.returncode == 0, tests.stdout[-2000:]


def split_sample(package: Path, directory: Path, parts: int) -> list[Path]:
    """The package's sample cut into one CSV per site, as sites would hold their own files."""
    with (package / NAME.replace("-", "_") / "sample.csv").open() as f:
        header, *rows = list(csv.reader(f))
    paths = []
    for k in range(parts):
        path = directory / f"site-{k + 1}.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows[k::parts]])
        paths.append(path)
    return paths


def test_a_federation_runs_the_task_with_dp_and_secagg_and_records_a_declining_site(
    package: Path, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    sites = ("site-1", "site-2", "site-3", "site-4")  # three train (a secure sum needs 3), one declines
    for command in (
        ["pki", "init", pki, "--host", "localhost"],
        *(["pki", "add-site", pki, s] for s in sites),
    ):
        subprocess.run([*FEDCORE, *map(str, command)], check=True, capture_output=True)
    data = split_sample(package, tmp_path, 3)
    port, state = free_port(), tmp_path / "state"
    logs = {name: tmp_path / f"{name}.log" for name in ("server", *sites)}
    server = fedcore(
        "server", "--listen", f"127.0.0.1:{port}", "--pki", pki, "--task", NAME, "--rounds", 3,
        "--min-sites", 3, "--state", state, "--secure-aggregation", "--privacy", "sample",
        "--noise-multiplier", "1.0", log=logs["server"],
    )  # fmt: skip
    # site-4 approves only another version of the task: it must decline, and say why.
    strict = tmp_path / "strict.toml"
    strict.write_text(f'[policy]\ntasks = ["{NAME}==9.9.9"]\n')
    declining = fedcore(
        "client", "--config", strict, "--server", f"localhost:{port}", "--pki", pki / "sites" / "site-4",
        "--task", NAME, "--data", data[0], log=logs["site-4"],
    )  # fmt: skip
    assert wait(declining, logs["site-4"], 120) == 3, logs["site-4"].read_text()[-2000:]
    assert "declined the job" in logs["site-4"].read_text()
    deadline = time.monotonic() + 60
    while "site-4 declined the job" not in logs["server"].read_text():
        assert time.monotonic() < deadline, logs["server"].read_text()[-2000:]
        time.sleep(0.1)
    clients = start_sites(port, pki, sites[:3], logs, task=NAME, data=data)
    assert wait(server, logs["server"]) == 0, logs["server"].read_text()[-3000:]
    assert all(wait(c, logs[s]) == 0 for s, c in clients.items())
    records = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert "does not approve task" in records[0]["declined"]["site-4"]
    assert all(r["sites"] == 3 and r["epsilon"] is not None and r["secure_aggregation"] for r in records)
