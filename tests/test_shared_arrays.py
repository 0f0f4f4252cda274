"""The simulation's worker processes: large arrays cross through shared memory and leave no
file behind, the pipe is the fallback, and sites sent in one batch fail alone."""

from __future__ import annotations

import asyncio
import glob
import os

import numpy as np
import pytest

from fedcore import load_experiment, run_simulation
from fedcore.engine import Instruction, InstructionKind, Reply
from fedcore.simulation import shared_arrays
from fedcore.simulation.runners import LocalRunner

pytestmark = pytest.mark.skipif(not shared_arrays.available(), reason="no /dev/shm")


def our_files() -> list[str]:
    """Every file this process's publishers made."""
    return glob.glob(f"/dev/shm/fedcore-{os.getpid()}-*")


def test_an_array_sent_to_many_sites_is_written_once_and_removed_after_the_last() -> None:
    big = np.arange(300_000, dtype=np.float32)  # 1.2 MB
    small = np.arange(10, dtype=np.float32)
    publisher = shared_arrays.Publisher()
    used_first: list[int] = []
    used_second: list[int] = []
    first = publisher.dumps({"w": big, "b": small}, used_first)
    second = publisher.dumps({"w": big, "b": small}, used_second)
    assert len(first) < 10_000 and len(our_files()) == 1  # the big array is one file, shared
    received = shared_arrays.loads(second)
    np.testing.assert_array_equal(received["w"], big)
    np.testing.assert_array_equal(received["b"], small)
    with pytest.raises(ValueError, match="read-only"):  # no site can change the next one's model
        received["w"][0] = 1.0
    publisher.release(used_first)
    assert len(our_files()) == 1  # the second task still uses it
    publisher.release(used_second)
    assert our_files() == []
    np.testing.assert_array_equal(received["w"], big)  # a mapping outlives the file's name


def test_closing_one_publisher_leaves_another_s_files() -> None:
    first, second = shared_arrays.Publisher(), shared_arrays.Publisher()
    array = np.ones(1 << 17)
    used: list[int] = []
    second.dumps(array, used)
    first.dumps(np.zeros(1 << 17), [])
    first.close()
    assert len(our_files()) == 1  # the second simulation's model is still there
    second.release(used)
    second.close()
    assert our_files() == []


def test_a_reply_file_is_removed_as_soon_as_it_is_read() -> None:
    vector = np.arange(1 << 18, dtype=np.uint32)
    data = shared_arrays.dumps([vector], shared_arrays.reply_export(f"{os.getpid()}-test"))
    assert len(our_files()) == 1
    (received,) = shared_arrays.loads(data)
    assert our_files() == []
    np.testing.assert_array_equal(received, vector)
    received += 1  # the reader's copy is its own
    np.testing.assert_array_equal(received, vector + 1)


def test_without_room_in_shared_memory_arrays_go_in_the_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_arrays, "write", lambda array, path: False)
    big = np.ones(1 << 20, dtype=np.float64)
    used: list[int] = []
    data = shared_arrays.Publisher().dumps(big, used)
    assert len(data) > big.nbytes and used == [] and our_files() == []
    np.testing.assert_array_equal(shared_arrays.loads(data), big)


@pytest.mark.parametrize("secure", [False, True])
def test_worker_processes_give_the_model_of_one_worker_and_leave_no_file(secure: bool) -> None:
    """bench:300000 (1.2 MB) crosses through shared memory both ways; every bench site moves
    each weight by 0.01, so a wrong sum or a stale model would show."""
    experiment = load_experiment().override(
        task__name="bench:300000",
        simulation__sites=6,
        federation__min_sites=6,
        federation__rounds=2,
        secure_aggregation__enabled=secure,
        federation__max_examples_per_site=1,  # a bench site's count: weight 1, full precision
    )
    models = []
    for workers in (1, 2):
        result, _ = run_simulation(experiment.override(simulation__workers=workers), None)
        assert all(r.sites == 6 for r in result.records)
        models.append(result.parameters["w"])
    np.testing.assert_allclose(models[1], 0.02, atol=1e-5)
    if not secure:  # plain means are exact; secure sums round stochastically
        np.testing.assert_array_equal(models[0], models[1])
    assert our_files() == []


def test_a_site_that_fails_in_a_batch_fails_alone() -> None:
    experiment = load_experiment().override(task__name="bench:1000", simulation__sites=5)
    runner = LocalRunner(experiment, workers=2)
    runner.BATCHES_PER_WORKER = 1  # batches of sites 1-3 and 4-5
    runner.states[3] = ("not", "a site's state")  # site 3 cannot even be rebuilt
    instruction = Instruction(InstructionKind.EVALUATE, 1, {"w": np.zeros(1000, np.float32)})

    async def all_sites() -> list[object]:
        return await asyncio.gather(
            *(runner.run(k, instruction) for k in range(1, 6)), return_exceptions=True
        )

    try:
        outcomes = asyncio.run(all_sites())
    finally:
        runner.close()
    assert isinstance(outcomes[2], ValueError)
    replies = [o for o in outcomes if isinstance(o, Reply)]
    assert [r.site for r in replies] == ["site-1", "site-2", "site-4", "site-5"]


def test_a_batch_that_cannot_be_pickled_fails_its_sites_at_once() -> None:
    experiment = load_experiment().override(task__name="bench:1000", simulation__sites=5)
    runner = LocalRunner(experiment, workers=2)
    runner.BATCHES_PER_WORKER = 1  # batches of sites 1-3 and 4-5
    runner.states[2] = lambda: None  # a state no pickle can carry
    instruction = Instruction(InstructionKind.EVALUATE, 1, {"w": np.zeros(1 << 15, np.float32)})

    async def all_sites() -> list[object]:
        return await asyncio.gather(
            *(runner.run(k, instruction) for k in range(1, 6)), return_exceptions=True
        )

    try:
        outcomes = asyncio.run(asyncio.wait_for(all_sites(), timeout=60))
    finally:
        runner.close()
    assert all(isinstance(o, Exception) for o in outcomes[:3])
    assert [o.site for o in outcomes[3:] if isinstance(o, Reply)] == ["site-4", "site-5"]
    assert our_files() == []
