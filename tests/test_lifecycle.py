"""A run's models after training: lineage for every round, and exports (ONNX checked in
onnxruntime against PyTorch, TorchScript, safetensors) read from the run store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.numpy import load_file

from fedcore import load_experiment, run_simulation
from fedcore.engine.run_state import RunState
from fedcore.engine.run_store import SqliteRunStore
from fedcore.engine.runs import stored_experiment
from fedcore.errors import ConfigError
from fedcore.lifecycle import ExportFormat, export, lineage
from fedcore.tasks import Task, build_task, task_for
from fedcore.tasks.tabular import Tabular
from tests.support.wine import write_wine_csv


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    wine = write_wine_csv(tmp_path_factory.mktemp("wine") / "wine.csv")
    for name, overrides in {
        "digits": {"task__name": "digits"},  # the CNN
        "mlp": {"task__name": "breast_cancer", "task__model": "mlp"},
        "tabular": {
            "task__name": "tabular",
            "task__model": "mlp",
            "task__data": str(wine),
            "task__label": "target",
        },
    }.items():
        directory = tmp_path_factory.mktemp(name)
        e = load_experiment().override(
            federation__rounds=3, simulation__workers=1, federation__keep_models=2, **overrides
        )
        run_simulation(e, directory)
        out[name] = directory
    return out


def pytorch_logits(task: Task, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    net = task._model_from(arrays).eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        return np.asarray(net(torch.as_tensor(x)).numpy())


def test_every_round_has_its_lineage(runs: dict[str, Path]) -> None:
    rows = lineage(runs["digits"])
    assert [r.round for r in rows] == [1, 2, 3]
    assert len({r.run_id for r in rows}) == 1 and all(r.sites == 5 and r.strategy == "fedavg" for r in rows)
    assert all(
        r.task == "digits" and r.task_package == "fedcore" and len(r.task_code_hash) == 64 for r in rows
    )
    assert rows[0].model_sha256 is None  # keep_models = 2 pruned it
    with SqliteRunStore(runs["digits"], read_only=True) as store:
        assert [s.model_sha256 for s in store.rounds()] == [r.model_sha256 for r in rows]
    printed = subprocess.run(
        [sys.executable, "-m", "fedcore", "models", "list", str(runs["digits"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "(pruned)" in printed and rows[-1].model_sha256[:12] in printed  # type: ignore[index]


@pytest.mark.parametrize("run", ["digits", "mlp", "tabular"])
def test_onnx_predictions_equal_pytorch(run: str, runs: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    chosen = export(runs[run], ExportFormat.ONNX, path, round_number=2)
    assert chosen.round == 2
    experiment, _ = stored_experiment(runs[run])
    task = task_for(experiment)
    with SqliteRunStore(runs[run], read_only=True) as store:
        arrays = store.model(2)
        saved = store.checkpoint()
    data = task.test_data(seed=0, partitions=5)
    assert data is not None and saved is not None
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    if isinstance(task, Tabular):  # raw rows, prepared as the metadata says
        task.use_statistics(np.array(RunState.from_bytes(saved[1]).statistics))
        about = json.loads(meta["fedcore.lineage"])["preprocessing"]
        raw = np.clip(data.x, *np.array([about["ranges"][c] for c in about["features"]]).T)
        data = task.prepared(data)
        np.testing.assert_allclose((raw - about["centre"]) / about["spread"], data.x, atol=1e-6)
    x = data.x[:37]  # a batch size never traced: the batch axis is dynamic
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, pytorch_logits(task, arrays, x), atol=1e-5, rtol=1e-5)
    lineage_ = json.loads(meta["fedcore.lineage"])
    assert lineage_["round"] == 2 and lineage_["model_sha256"] == chosen.model_sha256
    if run == "digits":
        assert "N x 1 x 8 x 8" in meta["input"] and "pixels / 16" in meta["input"]


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.load` is deprecated:DeprecationWarning"
)  # upstream: TorchScript's end
def test_torchscript_and_safetensors_exports(runs: dict[str, Path], tmp_path: Path) -> None:
    script, weights = tmp_path / "m.pt", tmp_path / "m.safetensors"
    export(runs["digits"], ExportFormat.TORCHSCRIPT, script)
    export(runs["digits"], ExportFormat.SAFETENSORS, weights)
    with SqliteRunStore(runs["digits"], read_only=True) as store:
        last = store.model(3)
    for name, value in load_file(str(weights)).items():
        np.testing.assert_array_equal(value, last[name])
    extra = {"fedcore.json": ""}
    loaded = torch.jit.load(str(script), _extra_files=extra)  # type: ignore[no-untyped-call]
    x = build_task("digits").test_data(seed=0, partitions=5).x[:5]  # type: ignore[union-attr]
    np.testing.assert_allclose(
        loaded(torch.as_tensor(x)).detach().numpy(), pytorch_logits(build_task("digits"), last, x), atol=1e-6
    )
    assert json.loads(extra["fedcore.json"])["round"] == 3


def test_exports_refuse_what_they_cannot_write(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pruned"):
        export(runs["digits"], ExportFormat.ONNX, tmp_path / "x.onnx", round_number=1)
    with pytest.raises(ConfigError, match="no round 9"):
        export(runs["digits"], ExportFormat.ONNX, tmp_path / "x.onnx", round_number=9)
    with pytest.raises(ConfigError, match="no run"):
        lineage(tmp_path)
    # A live run holds its directory's lock; reading its models does not need it.
    with SqliteRunStore(runs["mlp"]):
        assert [r.round for r in lineage(runs["mlp"])] == [1, 2, 3]
