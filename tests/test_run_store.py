"""SqliteRunStore: durable rounds, integrity checks, retention, views that survive crashes, the lock."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.engine.run_store import RunInfo, SqliteRunStore, StoreCorrupted
from fedcore.engine.state_files import StateInUse
from fedcore.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0  # bound on every wait for a subprocess (it imports fedcore, which takes a few seconds)


def model_for(round: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), float(round), dtype=np.float32), "b": np.arange(4, dtype=np.float64) * round}


def record_for(round: int) -> dict[str, Any]:
    return {
        "round": round,
        "sites": 2,
        "accuracy": 0.5 + round / 100,
        "loss": float("nan"),
        "sampled": ["a", "b"],
    }


def sites_for(round: int) -> list[dict[str, Any]]:
    return [
        {"round": round, "attempt": 1, "site": "a", "aggregated": True, "dropped": None},
        {"round": round, "attempt": 1, "site": "b", "aggregated": False, "dropped": "timeout"},
    ]


def commit(store: SqliteRunStore, round: int) -> None:
    store.commit_round(
        round=round,
        record=record_for(round),
        sites=sites_for(round),
        model=model_for(round),
        state=f"state {round}".encode(),
    )


def new_store(directory: Path, rounds: int, **kwargs: Any) -> SqliteRunStore:
    store = SqliteRunStore(directory, **kwargs)
    store.open_run(run_id="run-1", experiment={"rounds": rounds, "lr": 0.1})
    for r in range(1, rounds + 1):
        commit(store, r)
    return store


def child(code: str, directory: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(directory)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_round_trip_of_records_sites_models_and_checkpoint(tmp_path: Path) -> None:
    with SqliteRunStore(tmp_path) as store:
        assert store.run() is None and store.checkpoint() is None and store.last_round() == 0
        store.open_run(run_id="run-1", experiment={"rounds": 2})
        info = store.run()
        assert isinstance(info, RunInfo) and info.run_id == "run-1" and info.experiment == {"rounds": 2}
        assert not info.finished
        with pytest.raises(ConfigError, match="already holds run run-1"):
            store.open_run(run_id="run-2", experiment={})
        commit(store, 1)
        commit(store, 2)
        assert store.last_round() == 2
        assert store.checkpoint() == (2, b"state 2")
        stored = store.rounds()
        assert [s.round for s in stored] == [1, 2]
        assert stored[1].record == {**record_for(2), "loss": None}  # NaN is stored as null
        assert stored[1].sites == sites_for(2)
        assert all(isinstance(s.model_sha256, str) and len(s.model_sha256) == 64 for s in stored)
        for r in (1, 2):
            loaded = store.model(r)
            assert set(loaded) == {"w", "b"}
            for name, array in model_for(r).items():
                assert loaded[name].dtype == array.dtype
                np.testing.assert_array_equal(loaded[name], array)
        store.finish()
        assert store.run() == RunInfo("run-1", {"rounds": 2}, info.created, True)
        with pytest.raises(ValueError, match="no open run"):
            commit(store, 3)
        store.set_experiment({"rounds": 3})
        commit(store, 3)
        assert store.run() == RunInfo("run-1", {"rounds": 3}, info.created, False)


def test_sha256_catches_a_flipped_byte_in_the_stored_model(tmp_path: Path) -> None:
    new_store(tmp_path, 2).close()
    with sqlite3.connect(tmp_path / "run.db") as db:
        blob = bytearray(db.execute("SELECT data FROM models WHERE round = 2").fetchone()[0])
        blob[-1] ^= 0x01  # inside the tensor data: safetensors itself would load it without complaint
        db.execute("UPDATE models SET data = ? WHERE round = 2", (bytes(blob),))
    db.close()
    with SqliteRunStore(tmp_path) as store:
        np.testing.assert_array_equal(store.model(1)["w"], model_for(1)["w"])
        with pytest.raises(StoreCorrupted, match="round 2 fails its SHA-256 check"):
            store.model(2)
        with pytest.raises(StoreCorrupted):
            store.reconcile_views()  # never publishes a tampered model as model.safetensors


@pytest.mark.parametrize("keep", [1, 2])
def test_retention_keeps_exactly_the_latest_models(tmp_path: Path, keep: int) -> None:
    with new_store(tmp_path, 5, keep_models=keep) as store:
        kept = list(range(6 - keep, 6))
        assert [s.round for s in store.rounds()] == [1, 2, 3, 4, 5]
        assert [s.round for s in store.rounds() if s.model_sha256 is not None] == kept
        for r in range(1, 6 - keep):
            with pytest.raises(KeyError, match="pruned"):
                store.model(r)
        for r in kept:
            np.testing.assert_array_equal(store.model(r)["b"], model_for(r)["b"])
    with sqlite3.connect(tmp_path / "run.db") as db:
        assert [r for (r,) in db.execute("SELECT round FROM models ORDER BY round")] == kept
    db.close()
    with pytest.raises(ConfigError, match="keep_models"):
        SqliteRunStore(tmp_path / "other", keep_models=0)


def test_rounds_commit_in_order_from_one(tmp_path: Path) -> None:
    with SqliteRunStore(tmp_path) as store:
        store.open_run(run_id="r", experiment={})
        with pytest.raises(ValueError, match="round 2 cannot follow round 0"):
            commit(store, 2)
        with pytest.raises(ValueError, match="round 0 cannot follow round 0"):
            commit(store, 0)
        commit(store, 1)
        with pytest.raises(ValueError, match="round 1 cannot follow round 1"):
            commit(store, 1)
        with pytest.raises(ValueError, match="round 3 cannot follow round 1"):
            commit(store, 3)
        assert store.last_round() == 1 and store.checkpoint() == (1, b"state 1")
        assert [s.round for s in store.rounds()] == [1]
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_views_hold_one_line_per_round(tmp_path: Path) -> None:
    with new_store(tmp_path, 3):
        metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
        sites = (tmp_path / "sites.jsonl").read_text().splitlines()
        assert len(metrics) == 3 and len(sites) == 6
        assert '"loss": null' in metrics[0] and "NaN" not in metrics[0]
        from safetensors.numpy import load_file

        np.testing.assert_array_equal(load_file(tmp_path / "model.safetensors")["w"], model_for(3)["w"])


@pytest.mark.parametrize("damage", ["torn_line", "missing_last", "duplicated", "emptied", "deleted"])
def test_reconcile_views_after_a_crash_between_commit_and_view(tmp_path: Path, damage: str) -> None:
    new_store(tmp_path, 3).close()
    expected = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "sites.jsonl")}
    model_bytes = (tmp_path / "model.safetensors").read_bytes()
    for name, data in expected.items():
        lines = data.splitlines(keepends=True)
        damaged = {
            "torn_line": lines[0] + lines[1][: len(lines[1]) // 2],
            "missing_last": b"".join(lines[:-1]),
            "duplicated": data + lines[-1],
            "emptied": b"",
        }
        if damage == "deleted":
            (tmp_path / name).unlink()
        else:
            (tmp_path / name).write_bytes(damaged[damage])
    (tmp_path / "model.safetensors").write_bytes(model_bytes[: len(model_bytes) // 2])
    with SqliteRunStore(tmp_path) as store:
        store.reconcile_views()
        for name, data in expected.items():
            assert (tmp_path / name).read_bytes() == data
        assert (tmp_path / "model.safetensors").read_bytes() == model_bytes
        metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in metrics] == [1, 2, 3]
        commit(store, 4)  # and appending goes on from a clean file
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_first_commit_after_reopen_repairs_the_views_without_reconcile(tmp_path: Path) -> None:
    new_store(tmp_path, 2).close()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-10])
    with SqliteRunStore(tmp_path) as store:
        commit(store, 3)
    with SqliteRunStore(tmp_path) as store:
        assert [s.record for s in store.rounds()] == [{**record_for(r), "loss": None} for r in (1, 2, 3)]
    assert len(metrics.read_text().splitlines()) == 3


def test_reopening_keeps_everything_byte_for_byte(tmp_path: Path) -> None:
    new_store(tmp_path, 2).close()
    names = ("metrics.jsonl", "sites.jsonl", "model.safetensors")
    before = {name: ((tmp_path / name).read_bytes(), (tmp_path / name).stat().st_ino) for name in names}
    with SqliteRunStore(tmp_path) as store:
        assert {name: (tmp_path / name).read_bytes() for name in names} == {
            n: b for n, (b, _) in before.items()
        }
        store.reconcile_views()
        after = {name: ((tmp_path / name).read_bytes(), (tmp_path / name).stat().st_ino) for name in names}
        assert after == before  # same bytes and same files: nothing was rewritten
        assert [s.round for s in store.rounds()] == [1, 2] and store.checkpoint() == (2, b"state 2")
        info = store.run()
        assert info is not None and info.experiment == {"rounds": 2, "lr": 0.1}
        commit(store, 3)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    new_store(tmp_path, 1).close()
    db = sqlite3.connect(tmp_path / "run.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        SqliteRunStore(tmp_path)
    with pytest.raises(ConfigError, match="schema version 99"):  # not StateInUse: the lock was released
        SqliteRunStore(tmp_path)


def test_a_second_store_in_the_same_process_is_refused(tmp_path: Path) -> None:
    store = SqliteRunStore(tmp_path)
    try:
        with pytest.raises(StateInUse, match=rf"in use by another fedcore process \(pid {os.getpid()}\)"):
            SqliteRunStore(tmp_path)
    finally:
        store.close()
    SqliteRunStore(tmp_path).close()
    assert issubclass(StateInUse, ConfigError)


def test_a_killed_process_releases_the_lock(tmp_path: Path) -> None:
    proc = child(
        """
        import sys, time
        from pathlib import Path
        from fedcore.engine.run_store import SqliteRunStore
        store = SqliteRunStore(Path(sys.argv[1]))
        time.sleep(300)
        """,
        tmp_path,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        lock = tmp_path / "run.lock"
        while not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the subprocess never took the lock"
            time.sleep(0.05)
        for _ in range(3):
            with pytest.raises(StateInUse, match=rf"\(pid {proc.pid}\)"):
                SqliteRunStore(tmp_path)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL
        SqliteRunStore(tmp_path).close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_S)


def test_a_committed_round_survives_kill_9_right_after_commit(tmp_path: Path) -> None:
    proc = child(
        """
        import os, signal, sys
        from pathlib import Path
        import numpy as np
        from fedcore.engine.run_store import SqliteRunStore
        store = SqliteRunStore(Path(sys.argv[1]))
        store.open_run(run_id="killed", experiment={"rounds": 5})
        for r in (1, 2):
            store.commit_round(
                round=r, record={"round": r}, sites=[{"round": r, "site": "a"}],
                model={"w": np.full(3, r, dtype=np.float32)}, state=b"state %d" % r,
            )
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    try:
        assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_S)
    with SqliteRunStore(tmp_path) as store:
        assert store.last_round() == 2 and store.checkpoint() == (2, b"state 2")
        assert [(s.round, s.record, s.sites) for s in store.rounds()] == [
            (r, {"round": r}, [{"round": r, "site": "a"}]) for r in (1, 2)
        ]
        np.testing.assert_array_equal(store.model(2)["w"], np.full(3, 2, dtype=np.float32))
        store.reconcile_views()
        assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n{"round": 2}\n'


def test_a_missing_model_row_is_reported_as_damage(tmp_path: Path) -> None:
    new_store(tmp_path, 2).close()
    with sqlite3.connect(tmp_path / "run.db") as db:
        db.execute("DELETE FROM models WHERE round = 2")
    db.close()
    with (
        SqliteRunStore(tmp_path) as store,
        pytest.raises(StoreCorrupted, match="round 2 has no stored model"),
    ):
        store.reconcile_views()
