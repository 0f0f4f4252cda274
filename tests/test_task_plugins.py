"""Tasks from outside fedcore: a TaskDefinition found as `module:attr` or through an
installed package's entry point, listed with its version and code hash; the scaffold."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore import load_experiment, run_simulation
from fedcore.tasks import TaskDefinition, build_task, plugins, register_task, task_source
from fedcore.tasks.base import Dataset, TrainSettings

MODULE = "fedcore_test_task_module"


@pytest.fixture
def module_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A task module on sys.path, as a developer's working copy would be."""
    (tmp_path / f"{MODULE}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from torch import nn
            from fedcore.tasks import TaskDefinition

            def sample():
                rng = np.random.default_rng(0)
                x = rng.standard_normal((400, 4)).astype(np.float32)
                return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)

            task = TaskDefinition(
                name="two-features",
                model=lambda: nn.Sequential(nn.Linear(4, 2)),
                load=lambda path: sample(),
                sample=sample,
                defaults={"local_epochs": 2, "lr": 0.1},
            )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)  # each test imports its own copy
    return f"{MODULE}:task"


def test_a_module_task_trains_in_a_simulation_with_dp_and_secure_aggregation(module_task: str) -> None:
    task = build_task(module_task)
    assert task.name == "two-features" and task.supports_dp_sgd
    base = load_experiment().override(
        task__name=module_task, federation__rounds=5, simulation__sites=3, simulation__workers=1
    )
    plain, _ = run_simulation(base, None)
    assert plain.records[-1].accuracy >= 0.9
    private = base.override(
        privacy__mode="sample", privacy__noise_multiplier=0.5, secure_aggregation__enabled=True
    )
    result, _ = run_simulation(private, None)
    assert result.records[-1].epsilon is not None and result.records[-1].sites == 3
    source = task_source(module_task)
    assert (source.origin, source.package) == ("module", MODULE) and len(source.code_hash) == 64


def test_the_code_hash_changes_with_the_code(module_task: str, tmp_path: Path) -> None:
    import importlib

    before = task_source(module_task).code_hash
    path = tmp_path / f"{MODULE}.py"
    path.write_text(path.read_text() + "\n# a change\n")
    importlib.invalidate_caches()
    assert plugins.code_hash(importlib.import_module(MODULE)) != before


def test_the_code_hash_covers_a_packages_data_and_compiled_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task package's sample data and extension modules are part of what a site approves."""
    import importlib

    package = tmp_path / "hashed_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "sample.csv").write_text("x,label\n1,0\n")
    (package / "fast.so").write_bytes(b"\x7fELF")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("hashed_pkg")
    before = plugins.code_hash(module)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.pyc").write_bytes(b"cache")  # the interpreter's, not the code
    assert plugins.code_hash(module) == before
    (package / "sub" / "sample.csv").write_text("x,label\n1,1\n")
    assert plugins.code_hash(module) != before
    changed = plugins.code_hash(module)
    (package / "fast.so").write_bytes(b"\x7fELF\x02")
    assert plugins.code_hash(module) != changed


def test_a_task_with_its_own_training_cannot_run_dp_sgd() -> None:
    def fit(model: torch.nn.Module, data: Dataset, settings: TrainSettings) -> dict[str, float]:
        return {"custom": 1.0}

    definition = TaskDefinition(
        name="own-training",
        model=lambda: torch.nn.Linear(2, 2),
        load=lambda p: (np.zeros((4, 2)), np.zeros(4, np.int64)),
        fit=fit,
    )
    assert not definition.build().supports_dp_sgd
    with pytest.raises(ValueError, match="unknown defaults"):
        TaskDefinition(
            name="x", model=lambda: torch.nn.Linear(1, 1), load=lambda p: (None, None), defaults={"lr2": 1}
        )


def test_unknown_and_broken_task_names_say_what_is_installed() -> None:
    with pytest.raises(ValueError, match=r"installed tasks: .*breast_cancer"):
        build_task("no_such_task")
    with pytest.raises(ValueError, match="cannot load"):
        build_task("no_such_module_xyz:task")


def test_a_site_policy_approves_exact_task_code() -> None:
    from fedcore.client.task_policy import JobCode, parse_policy, refusal
    from fedcore.errors import ConfigError
    from fedcore.tasks.plugins import TaskSource

    local = TaskSource("heart", "entry point", "heart", "1.2.0", "ab" * 32)
    same_job = JobCode("heart", "1.2.0", "ab" * 32)
    assert refusal(None, local, same_job) is None
    assert refusal(parse_policy(["heart==1.2.0"]), local, same_job) is None
    assert refusal(parse_policy(["heart==1.2.0@" + "ab" * 16]), local, same_job) is None
    assert "does not approve" in str(refusal(parse_policy(["heart==1.2.0@" + "cd" * 16]), local, same_job))
    assert "does not approve" in str(refusal(parse_policy(["heart==1.1.0", "other==1.2.0"]), local, same_job))
    assert "does not approve" in str(refusal(parse_policy([]), local, same_job))
    other_code = JobCode("heart", "1.2.0", "ef" * 32)  # the server built the job with other code
    assert "the job was built with" in str(refusal(parse_policy(["heart==1.2.0"]), local, other_code))
    assert refusal(None, local, other_code) is None  # no policy: a warning only
    for bad in ("heart", "heart==", "heart==1.0@xyz", "heart==1.0@" + "ab" * 6, 3):
        with pytest.raises(ConfigError, match="NAME==VERSION"):
            parse_policy([bad])


def test_the_source_is_the_code_build_task_runs(module_task: str) -> None:
    """Resolved in build_task's order: a built-in with an argument is fedcore; a hosted
    Flower app and a registered factory are their own module's code, not fedcore's."""
    fedcore_code = task_source("digits")
    assert (fedcore_code.origin, fedcore_code.package) == ("built-in", "fedcore")
    assert task_source("synthetic:1,1").code_hash == fedcore_code.code_hash
    flower = task_source("flower:tests.support.stateful_flower_client:client_fn")
    assert (flower.origin, flower.package) == (
        "flower app",
        "tests",
    ) and flower.code_hash != fedcore_code.code_hash
    module = sys.modules.get(MODULE) or __import__(MODULE)
    register_task("registered-check", lambda arg, model: module.task.build(model))
    try:
        registered = task_source("registered-check")
        assert registered.origin == "registered" and registered.package == "tests"
    finally:
        from fedcore.tasks import _REGISTRY

        _REGISTRY.pop("registered-check")
