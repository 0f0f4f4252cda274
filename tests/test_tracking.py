"""`--track`: MLflow and TensorBoard get every round from the round store, read back here
through their own readers; a resumed run continues its MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedcore import load_experiment, run_simulation
from fedcore.engine import RoundRecord
from fedcore.tracking import MlflowTracker, TensorBoardTracker, build_tracker
from tests.test_resume import Crash, CrashAfter

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def test_mlflow_and_tensorboard_see_every_round_and_the_final_model(tmp_path: Path) -> None:
    e = load_experiment().override(federation__rounds=3, simulation__workers=1)
    mlflow_dir, tensorboard_dir = tmp_path / "mlruns", tmp_path / "tb"
    result, _ = run_simulation(
        e,
        tmp_path / "run",
        trackers=[build_tracker(f"mlflow:{mlflow_dir}"), build_tracker(f"tensorboard:{tensorboard_dir}")],
    )
    client = MlflowClient(mlflow_dir.resolve().as_uri())
    experiment = client.get_experiment_by_name("fedcore")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(r.round, r.accuracy) for r in result.records]
    assert run.data.params["federation.rounds"] == "3" and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.safetensors"]
    (events,) = [p.parent for p in tensorboard_dir.rglob("events.out.tfevents*")]
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [(s.step, round(s.value, 6)) for s in accumulator.Scalars("loss")] == [
        (r.round, round(r.loss, 6)) for r in result.records if r.loss is not None
    ]
    assert (events / "model.safetensors").is_file()


def test_a_resumed_run_goes_on_in_its_mlflow_run(tmp_path: Path) -> None:
    e = load_experiment().override(federation__rounds=3, simulation__workers=1)
    uri = tmp_path / "mlruns"
    with pytest.raises(Crash):
        run_simulation(e, tmp_path / "run", observers=[CrashAfter(2)], trackers=[MlflowTracker(str(uri))])
    run_simulation(e, tmp_path / "run", resume=True, trackers=[MlflowTracker(str(uri))])
    client = MlflowClient(uri.resolve().as_uri())
    experiment = client.get_experiment_by_name("fedcore")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [1, 2, 3]
    assert run.info.status == "FINISHED"


def test_a_bad_track_spec_is_one_clear_error() -> None:
    from fedcore.errors import ConfigError

    with pytest.raises(ConfigError, match="mlflow:URI or tensorboard:DIR"):
        build_tracker("wandb:project")
    assert isinstance(build_tracker("tensorboard:/tmp/x"), TensorBoardTracker)


def test_a_failing_tracker_is_logged_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from collections.abc import Sequence

    from fedcore.config import Experiment
    from fedcore.tensors import Arrays
    from fedcore.tracking import Tracker

    class Broken(Tracker):
        def _start(self, experiment: Experiment, run_id: str, history: Sequence[RoundRecord]) -> None:
            pass

        def _record(self, record: RoundRecord) -> None:
            raise ConnectionError("tracking server down")

        def _finish(self, parameters: Arrays | None, completed: bool) -> None:
            raise ConnectionError("tracking server down")

    e = load_experiment().override(federation__rounds=2, simulation__workers=1)
    result, _ = run_simulation(e, tmp_path, trackers=[Broken()])
    assert len(result.records) == 2 and "tracking server down" in caplog.text
