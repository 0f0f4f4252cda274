"""Opening a run in a state directory: a new run, or the stored one resumed.

The directory's run store records the whole experiment (every setting, and the command
line and experiment file it came from; `experiment.json` is a view of it). A resume must
ask for the same experiment: a differing setting is refused with what differs, except a
larger number of rounds, which extends the run, and the settings that only say where
simulated sites run (workers, backend), which do not change the result.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.config import Experiment
from fedcore.engine.records import RoundRecord
from fedcore.engine.run_state import RunState
from fedcore.engine.run_store import SqliteRunStore
from fedcore.engine.state_files import atomic_write
from fedcore.errors import ConfigError
from fedcore.tasks import task_source

# Where virtual sites run, not what they compute: a resume may change these.
OPERATIONAL = frozenset({("simulation", "workers"), ("simulation", "backend"), ("simulation", "ray_address")})


@dataclass
class OpenedRun:
    store: SqliteRunStore  # held (locked) until closed
    run_id: str
    state: RunState | None  # None: no round completed yet
    history: list[RoundRecord]  # the completed rounds' records
    complete: bool  # the run is finished: nothing to do

    def close(self) -> None:
        self.store.close()


def open_run(
    directory: Path, experiment: Experiment, *, resume: bool, command: dict[str, Any] | None = None
) -> OpenedRun:
    """Take the state directory (StateInUse if another process holds it) and open its run:
    a new one in an empty directory, or with `resume` the stored one (ConfigError if the
    experiment differs). `command`: how the experiment was given (argv, file), recorded."""
    store = SqliteRunStore(directory, keep_models=experiment.federation.keep_models)
    try:
        return _open(store, experiment, resume=resume, command=command or {})
    except BaseException:
        store.close()
        raise


def _open(
    store: SqliteRunStore, experiment: Experiment, *, resume: bool, command: dict[str, Any]
) -> OpenedRun:
    directory = store.directory
    info = store.run()
    if info is None:
        run_id = uuid.uuid4().hex
        document = _document(run_id, experiment, command)
        store.open_run(run_id=run_id, experiment=document)
        atomic_write(directory / "experiment.json", json.dumps(document, indent=1).encode())
        return OpenedRun(store, run_id, None, [], complete=False)
    stored = _stored_experiment(info.experiment, directory)
    last = store.last_round()
    if not resume:
        raise ConfigError(
            f"{directory} holds run {info.run_id} ({last} of {stored.federation.rounds} rounds done); "
            f"continue it with --resume, or give an empty directory"
        )
    if differs := differences(stored, experiment):
        raise ConfigError(f"--resume: the experiment differs from the one stored in {directory}: {differs}")
    extended = experiment.federation.rounds > stored.federation.rounds
    if extended or (experiment != stored and not info.finished):  # set_experiment reopens the run
        document = _document(info.run_id, experiment, command)
        store.set_experiment(document)
        atomic_write(directory / "experiment.json", json.dumps(document, indent=1).encode())
    store.reconcile_views()  # a crash may have left them a round behind (or a line torn)
    checkpoint = store.checkpoint()
    state = None
    if checkpoint is not None:
        state = RunState.from_bytes(checkpoint[1])
        state.parameters = store.model(checkpoint[0])
        if state.run_id != info.run_id or state.round != last:
            raise ConfigError(f"{directory}: the saved state does not match the stored run")
    history = [RoundRecord.from_json(r.record) for r in store.rounds()]
    return OpenedRun(store, info.run_id, state, history, complete=info.finished and not extended)


def stored_experiment(directory: Path) -> tuple[Experiment, int]:
    """The experiment stored in a state directory, and its last completed round."""
    if not (directory / "run.db").is_file():
        raise ConfigError(f"--resume {directory}: no run there (run.db missing)")
    with SqliteRunStore(directory) as store:
        info = store.run()
        if info is None:
            raise ConfigError(f"--resume {directory}: no run there")
        return _stored_experiment(info.experiment, directory), store.last_round()


def differences(stored: Experiment, given: Experiment) -> str:
    """What differs between the stored experiment and the one given for a resume, in words
    (empty when it may resume: only more rounds, or where simulated sites run)."""
    a, b = stored.to_dict(), given.to_dict()
    out = []
    for section, values in a.items():
        for key, value in values.items():
            other = b[section][key]
            if value == other or (section, key) in OPERATIONAL:
                continue
            if (section, key) == ("federation", "rounds") and other > value:
                if stored.privacy.target_epsilon is None:
                    continue  # extends the run
                out.append(
                    f"[federation] rounds is {other!r}, the run has {value!r}: a run with a target epsilon "
                    "cannot be extended (its noise was calibrated for its rounds)"
                )
                continue
            out.append(f"[{section}] {key} is {other!r}, the run has {value!r}")
    return "; ".join(out)


def _document(run_id: str, experiment: Experiment, command: dict[str, Any]) -> dict[str, Any]:
    """What run.db records of the run: the experiment, how it was given, and the task's code
    (package, version, SHA-256: the models' lineage)."""
    code = task_source(experiment.task.name)
    task = {
        "name": experiment.task.name,
        "package": code.package,
        "version": code.version,
        "code_hash": code.code_hash,
    }
    return {"run_id": run_id, "experiment": experiment.to_dict(), "command": command, "task": task}


def _stored_experiment(document: dict[str, Any], directory: Path) -> Experiment:
    return Experiment.from_dict(document["experiment"], source=f"{directory}/run.db")
