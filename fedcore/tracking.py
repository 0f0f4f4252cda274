"""Experiment tracking: `--track mlflow:URI` and `--track tensorboard:DIR` on `simulate` and
`server`. A tracker is an observer of the one place that records rounds (the run's round
store fan-out): it logs the experiment's settings at the start, every round's metrics
(step = round) as the round is stored, and the final model at the end. A resumed run
continues its MLflow run (found by the `fedcore.run_id` tag) and logs there the rounds that
were stored but not logged before the crash. A TensorBoard run directory gets a new event
file on resume, from the resumed round on.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedcore.config import Experiment
from fedcore.engine import RoundRecord, RunState
from fedcore.engine.records import save_model
from fedcore.errors import ConfigError
from fedcore.tensors import Arrays

RUN_TAG = "fedcore.run_id"
log = logging.getLogger(__name__)


class Tracker(abc.ABC):
    """A tracker's failure (a tracking server down, a full disk) is logged, never the run's."""

    def start(self, experiment: Experiment, run_id: str, history: Sequence[RoundRecord] = ()) -> None:
        """A run starts, or resumes after the rounds of `history` (already stored)."""
        self._safely("start", self._start, experiment, run_id, history)

    def record(self, record: RoundRecord, state: RunState | None) -> None:
        """A round was stored (the RoundStore interface)."""
        self._safely("log round", self._record, record)

    def finish(self, parameters: Arrays | None, *, completed: bool) -> None:
        """The run ended (or stopped): log the final model."""
        self._safely("finish", self._finish, parameters, completed)

    def _safely(self, what: str, action: Callable[..., None], *args: Any) -> None:
        try:
            action(*args)
        except Exception:
            log.exception("%s: could not %s; the run goes on", type(self).__name__, what)

    @abc.abstractmethod
    def _start(self, experiment: Experiment, run_id: str, history: Sequence[RoundRecord]) -> None: ...

    @abc.abstractmethod
    def _record(self, record: RoundRecord) -> None: ...

    @abc.abstractmethod
    def _finish(self, parameters: Arrays | None, completed: bool) -> None: ...


def build_tracker(spec: str) -> Tracker:
    """`mlflow:URI` (a tracking server, `sqlite:///mlflow.db`, or a local folder) or `tensorboard:DIR`."""
    kind, _, where = spec.partition(":")
    if kind == "mlflow" and where:
        return MlflowTracker(where)
    if kind == "tensorboard" and where:
        return TensorBoardTracker(Path(where))
    raise ConfigError(f"--track {spec!r}: give mlflow:URI or tensorboard:DIR")


def parameters_of(experiment: Experiment) -> dict[str, str]:
    """Every setting as `table.key`: value."""
    return {
        f"{table}.{key}": str(value)
        for table, values in experiment.to_dict().items()
        for key, value in values.items()
    }


def metrics_of(record: RoundRecord) -> dict[str, float]:
    """A round's numbers (finite ones): accuracy, loss, epsilon, sites, time, traffic, fit metrics."""
    values: dict[str, Any] = {
        "accuracy": record.accuracy,
        "loss": record.loss,
        "train_loss": record.train_loss,
        "epsilon": record.epsilon,
        "sites": record.sites,
        "examples": record.examples,
        "seconds": record.seconds,
        "bytes_sent": record.bytes_sent,
        "bytes_received": record.bytes_received,
        **{f"fit.{k}": v for k, v in record.fit_metrics.items()},
        **{f"eval.{k}": v for k, v in record.eval_metrics.items()},
    }
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}


class MlflowTracker(Tracker):
    def __init__(self, uri: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("--track mlflow needs MLflow: pip install 'fedcore[tracking]'") from None
        if "://" not in uri or uri.startswith("file:"):
            # A local folder: MLflow's file store, which it keeps in maintenance mode behind a flag.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = uri if uri.startswith("file:") else Path(uri).resolve().as_uri()
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run: str | None = None

    def _start(self, experiment: Experiment, run_id: str, history: Sequence[RoundRecord]) -> None:
        found = self.client.get_experiment_by_name("fedcore")
        experiment_id = found.experiment_id if found else self.client.create_experiment("fedcore")
        if not run_id.isalnum():  # it goes into a filter expression
            raise ValueError(f"run id {run_id!r} is not a plain name")
        existing = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'")
        if existing:  # a resumed run goes on logging into its MLflow run, from the last round it has
            self.run = existing[0].info.run_id
            logged = {m.step for m in self.client.get_metric_history(self.run, "sites")}
            for record in history:
                if record.round not in logged:  # stored, but the process died before it was logged
                    self._record(record)
            return
        self.run = self.client.create_run(experiment_id, run_name=run_id, tags={RUN_TAG: run_id}).info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.run, params=[Param(k, v) for k, v in parameters_of(experiment).items()])

    def _record(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        assert self.run is not None, "start() first"
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record.round) for k, v in metrics_of(record).items()]
        self.client.log_batch(self.run, metrics=metrics)

    def _finish(self, parameters: Arrays | None, completed: bool) -> None:
        if self.run is None:
            return
        if parameters is not None:
            with tempfile.TemporaryDirectory() as tmp:
                save_model(Path(tmp) / "model.safetensors", parameters)
                self.client.log_artifact(self.run, str(Path(tmp) / "model.safetensors"))
        self.client.set_terminated(self.run, "FINISHED" if completed else "KILLED")


class TensorBoardTracker(Tracker):
    """Event files in DIR/RUN_ID: scalars per round, the settings as text, the final model beside them."""

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--track tensorboard needs TensorBoard: pip install 'fedcore[tracking]'"
            ) from None
        self._writer_type = SummaryWriter
        self.directory = directory
        self.writer: Any = None

    def _start(self, experiment: Experiment, run_id: str, history: Sequence[RoundRecord]) -> None:
        if not run_id.isalnum():  # a directory name: nothing that could climb out of DIR
            raise ValueError(f"run id {run_id!r} is not a plain name")
        self.run_dir = self.directory / run_id
        self.writer = self._writer_type(log_dir=str(self.run_dir))
        table = "\n".join(f"| {k} | {v} |" for k, v in parameters_of(experiment).items())
        self.writer.add_text("experiment", "| setting | value |\n| --- | --- |\n" + table)

    def _record(self, record: RoundRecord) -> None:
        for key, value in metrics_of(record).items():
            self.writer.add_scalar(key, value, record.round)
        self.writer.flush()

    def _finish(self, parameters: Arrays | None, completed: bool) -> None:
        if self.writer is None:
            return
        if parameters is not None:
            save_model(self.run_dir / "model.safetensors", parameters)
        self.writer.close()
