"""The model's life after training: every round's global model with its lineage, listed and
exported from a run's directory (a `simulate --out` or a server `--state`), read-only, so
while a run goes on too.

    fedcore models list DIR
    fedcore models export DIR [--round R] --format onnx|torchscript|safetensors -o PATH

Lineage: run id, round, sites aggregated, strategy, epsilon (and delta), the task's name,
package, version and code SHA-256, and the model's own SHA-256 (checked when read).
An exported model takes the task's preprocessed input with a dynamic batch axis and says
so in its metadata; an ONNX export is checked against PyTorch in onnxruntime before it is
written.
"""

from __future__ import annotations

import argparse
import enum
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import ConfigError

ONNX_TOLERANCE = 1e-5


class ExportFormat(enum.StrEnum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    SAFETENSORS = "safetensors"


@dataclass(frozen=True)
class Lineage:
    run_id: str
    round: int
    sites: int
    strategy: str
    epsilon: float | None
    delta: float | None
    accuracy: float | None
    task: str
    task_package: str
    task_version: str
    task_code_hash: str
    model_sha256: str | None  # None: pruned by [federation] keep_models


def lineage(directory: Path) -> list[Lineage]:
    """Every round of the run in `directory`, oldest first."""
    from fedcore.engine.run_store import SqliteRunStore

    with SqliteRunStore(directory, read_only=True) as store:
        info = store.run()
        if info is None:
            raise ConfigError(f"{directory} holds no run yet")
        task = info.experiment.get("task") or {"name": info.experiment["experiment"]["task"]["name"]}
        strategy = info.experiment["experiment"]["strategy"]["name"]
        return [
            Lineage(
                run_id=info.run_id,
                round=r.round,
                sites=int(r.record["sites"]),
                strategy=str(strategy),
                epsilon=r.record.get("epsilon"),
                delta=r.record.get("delta"),
                accuracy=r.record.get("accuracy"),
                task=task["name"],
                task_package=task.get("package", "?"),
                task_version=task.get("version", "?"),
                task_code_hash=task.get("code_hash", "?"),
                model_sha256=r.model_sha256,
            )
            for r in store.rounds()
        ]


def export(directory: Path, fmt: ExportFormat, out: Path, round_number: int | None = None) -> Lineage:
    """Write the global model of `round_number` (default: the last) as `fmt` to `out`."""
    from fedcore.config import Experiment
    from fedcore.engine.run_state import RunState
    from fedcore.engine.run_store import SqliteRunStore

    rounds = lineage(directory)
    if not rounds:
        raise ConfigError(f"{directory}: the run has no completed round yet")
    chosen = (
        rounds[-1] if round_number is None else next((r for r in rounds if r.round == round_number), None)
    )
    if chosen is None:
        raise ConfigError(f"{directory}: no round {round_number} (rounds 1..{rounds[-1].round})")
    if chosen.model_sha256 is None:
        raise ConfigError(
            f"{directory}: the model of round {chosen.round} was pruned ([federation] keep_models)"
        )
    with SqliteRunStore(directory, read_only=True) as store:
        info = store.run()
        assert info is not None
        experiment = Experiment.from_dict(info.experiment["experiment"], source=f"{directory}/run.db")
        arrays = store.model(chosen.round)  # SHA-256 checked
        saved = store.checkpoint()
    statistics = RunState.from_bytes(saved[1]).statistics if saved is not None else None
    about = {**asdict(chosen), "input": "", "format": fmt.value}
    if fmt is ExportFormat.SAFETENSORS:
        from fedcore.engine.records import save_model

        save_model(out, arrays, metadata={"fedcore": json.dumps(about)})
        return chosen
    model, example, task = _torch_model(experiment, arrays, statistics)
    about["input"] = task.input_description
    if preprocessing := task.preprocessing():  # what raw input needs first (e.g. standardisation)
        about["preprocessing"] = preprocessing
    if fmt is ExportFormat.TORCHSCRIPT:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is in maintenance: its deprecation notice
            traced = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
            torch.jit.save(traced, str(out), _extra_files={"fedcore.json": json.dumps(about)})
        return chosen
    _export_onnx(model, example, out, about)
    return chosen


def _torch_model(
    experiment: Any, arrays: dict[str, np.ndarray], statistics: list[float] | None
) -> tuple[Any, Any, Any]:
    """The task's torch model holding `arrays`, an example input batch, the task (given the
    run's federated statistics, if it had any)."""
    import torch

    from fedcore.tasks import installed_tasks, task_for
    from fedcore.tasks.torch_task import TorchClassifierTask

    # The task name comes from run.db: only built-in and installed tasks are built from it,
    # never an arbitrary `module:attr` (that would run whatever callable the file names).
    base = experiment.task.name.partition(":")[0]
    if base not in installed_tasks() or base == "flower":
        raise ConfigError(
            f"the run's task {experiment.task.name!r} is not a built-in or installed PyTorch task: export it as safetensors"
        )
    task = task_for(experiment)
    if not isinstance(task, TorchClassifierTask):
        raise ConfigError(f"task {task.name!r} is not a PyTorch model: export it as safetensors")
    task.device = torch.device("cpu")
    if statistics is not None:
        task.use_statistics(np.array(statistics))
    model = task._model_from(arrays).eval()
    data = task.test_data(seed=experiment.seed, partitions=experiment.simulation.sites)
    if data is None or len(data) < 2:
        raise ConfigError(
            f"task {task.name!r} has no sample input to trace the model with: export it as safetensors"
        )
    return model, torch.as_tensor(np.nan_to_num(data.x[:2]), dtype=torch.float32), task


def _export_onnx(model: Any, example: Any, out: Path, about: dict[str, Any]) -> None:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra: pip install 'fedcore[onnx]'") from None
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own notices
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    for key, value in {**{k: str(v) for k, v in about.items()}, "fedcore.lineage": json.dumps(about)}.items():
        proto.metadata_props.add(key=key, value=value)
    # Checked before it is written: onnxruntime's predictions against PyTorch's, on a batch
    # of another size than the one traced (the batch axis is dynamic).
    batch = torch.cat([example, example, example[:1]])
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": batch.numpy()})[0]
    with torch.no_grad():
        want = model(batch).numpy()
    if got.shape != want.shape or not np.allclose(got, want, atol=ONNX_TOLERANCE, rtol=ONNX_TOLERANCE):
        raise ConfigError(f"the ONNX export differs from PyTorch by {float(np.abs(got - want).max()):.2e}")
    onnx.save(proto, str(out))


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    models = sub.add_parser("models", help="list or export a run's global models, with their lineage")
    which = models.add_subparsers(dest="models_command", required=True)
    listing = which.add_parser("list", help="every round's model and its lineage")
    listing.add_argument("dir", help="a simulate --out or server --state directory")
    listing.set_defaults(run=_list)
    out = which.add_parser("export", help="write one round's model (default: the last)")
    out.add_argument("dir", help="a simulate --out or server --state directory")
    out.add_argument("--round", type=int, help="the round (default: the last)")
    out.add_argument("--format", type=str.lower, choices=[f.value for f in ExportFormat], required=True)
    out.add_argument("-o", "--output", required=True, help="the file to write")
    out.set_defaults(run=_export)


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = lineage(Path(args.dir))
    first = rows[0] if rows else None
    title = "no completed round yet"
    if first is not None:
        title = (
            f"run {first.run_id}: task {first.task} ({first.task_package} {first.task_version}, "
            f"code {first.task_code_hash[:16]}), {first.strategy}"
        )
    table = Table(title=title)
    for column in ("round", "sites", "accuracy", "epsilon", "model SHA-256"):
        table.add_column(column, justify="right" if column != "model SHA-256" else "left")
    for r in rows:
        table.add_row(
            str(r.round),
            str(r.sites),
            "-" if r.accuracy is None else f"{r.accuracy:.4f}",
            "-" if r.epsilon is None else f"{r.epsilon:.3f}",
            r.model_sha256 or "(pruned)",
        )
    Console().print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    chosen = export(Path(args.dir), ExportFormat(args.format), Path(args.output), args.round)
    print(f"wrote round {chosen.round} of run {chosen.run_id} ({args.format}) to {args.output}")
    return 0
