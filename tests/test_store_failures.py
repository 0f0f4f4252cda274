"""A round whose write fails on I/O (EMFILE, a full disk) never ends the run: the write is
tried again after a pause, alerted in the log, and every store gets every round once, as an
undisturbed run's. The review's case: 21,000 idle connections exhausted the server's file
descriptors, a metrics write failed with EMFILE, and the uncaught error ended the run."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fedcore import load_experiment, run_simulation
from fedcore.engine import records, run_store
from fedcore.engine.records import RoundRecord
from fedcore.engine.run_state import RunState


class FlakyStore:
    """Fails with EMFILE the first `failures` times it is handed round `round`."""

    def __init__(self, round: int, failures: int) -> None:
        self.round, self.failures = round, failures
        self.got: list[int] = []

    def record(self, record: RoundRecord, state: RunState) -> None:
        if record.round == self.round and self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        self.got.append(record.round)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "STORE_RETRY_SECONDS", (0.01,))


def experiment(**overrides: object):  # type: ignore[no-untyped-def]
    return load_experiment().override(
        federation__rounds=3, simulation__sites=4, simulation__workers=1, **overrides
    )


@pytest.mark.parametrize("private", [False, True])
def test_a_store_that_fails_on_io_pauses_the_run_and_every_store_gets_every_round_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, private: bool
) -> None:
    e = experiment(**({"privacy__mode": "user-central", "privacy__noise_multiplier": 1.0} if private else {}))
    e = e.override(privacy__secure_rng=False) if private else e
    undisturbed, _ = run_simulation(e, None)
    flaky, audit = FlakyStore(round=2, failures=3), FlakyStore(round=0, failures=0)
    with caplog.at_level(logging.ERROR):
        result, summary = run_simulation(e, tmp_path, observers=[audit, flaky])
    assert summary["rounds"] == 3 and flaky.got == audit.got == [1, 2, 3]
    for name, value in result.parameters.items():
        np.testing.assert_array_equal(value, undisturbed.parameters[name])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]  # the run store took round 2 once, not 4 times
    failures = [r for r in caplog.records if "round 2 could not be stored" in r.getMessage()]
    assert len(failures) == 3 and "Too many open files" in failures[0].getMessage()


def test_a_run_store_whose_views_fail_after_the_commit_repairs_them_when_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction commits, then appending to metrics.jsonl fails: the round is the
    run's already; the write tried again repairs the views instead of committing twice."""
    real, failed = run_store.append_lines, []

    def append_lines(path: Path, lines: list[str]) -> None:
        if not failed and path.name == "metrics.jsonl" and '"round": 2' in lines[0]:
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, lines)

    monkeypatch.setattr(run_store, "append_lines", append_lines)
    _, summary = run_simulation(experiment(), tmp_path)
    assert failed and summary["rounds"] == 3
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert len((tmp_path / "sites.jsonl").read_text().splitlines()) == 12


def test_an_error_that_is_not_io_still_ends_the_run(tmp_path: Path) -> None:
    class Broken:
        def record(self, record: RoundRecord, state: RunState) -> None:
            raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_simulation(experiment(), tmp_path, observers=[Broken()])


def test_a_run_asked_to_stop_gives_up_a_write_that_keeps_failing() -> None:
    """SIGTERM must not wait for a disk that never comes back: once `stop` is set the write's
    last I/O error is raised instead of tried again (the review's server ran on after two
    SIGTERMs)."""
    import threading

    from fedcore.engine.records import record_durably

    stop, failures = threading.Event(), []
    store = FlakyStore(round=1, failures=10**9)
    record = RoundRecord(round=1, sites=1, accuracy=None, loss=None, seconds=0.0)
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(OSError):
        record_durably(store, record, RunState.__new__(RunState), on_failure=failures.append, stop=stop)
    assert failures and store.got == []
