"""fedcore.config: the experiment schema, TOML loading, validation and flag overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedcore.config import (
    DataConfig,
    Experiment,
    FederationConfig,
    SimulationConfig,
    StrategyConfig,
    StrategyName,
    TaskConfig,
    load_experiment,
)
from fedcore.errors import ConfigError, FedcoreError

FULL = """
[federation]
rounds = 7
min_sites = 3
sites_per_round = 4
round_timeout = 30
max_round_retries = 0

[task]
name = "digits"
model = "cnn"
local_epochs = 2
batch_size = 32
lr = 0.05
weight_decay = 1e-4

[strategy]
name = "FedAdam"
proximal_mu = 0.5
server_lr = 0.01
beta_1 = 0.8
beta_2 = 0.999
tau = 1e-9

[data]
partition = "shards:2"
seed = 42

[simulation]
sites = 6
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> Experiment:
    return load_experiment(write(tmp_path, text))


def test_defaults() -> None:
    e = load_experiment()
    assert e == Experiment()
    assert e.federation == FederationConfig(
        rounds=20, min_sites=2, sites_per_round=None, round_timeout=None, max_round_retries=3
    )
    assert e.task == TaskConfig(name="breast_cancer")
    assert e.task.model is e.task.local_epochs is e.task.lr is None
    assert e.strategy.name is StrategyName.FEDAVG
    assert (e.strategy.proximal_mu, e.strategy.server_lr, e.strategy.tau) == (0.0, 0.1, 1e-3)
    assert (e.strategy.beta_1, e.strategy.beta_2) == (0.9, 0.99)
    assert e.data == DataConfig(partition=None, seed=0)
    assert e.seed == 0
    assert e.simulation == SimulationConfig(sites=5)


def test_server_config_may_ask_for_more_sites_than_the_simulation_has(tmp_path: Path) -> None:
    # [simulation] sites concerns `fedcore simulate` only (which checks it against
    # min_sites itself); a server's experiment file is not refused for it.
    e = load_text(tmp_path, "[federation]\nmin_sites = 8\n")
    assert (e.federation.min_sites, e.simulation.sites) == (8, 5)


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == Experiment()


def test_full_file(tmp_path: Path) -> None:
    e = load_text(tmp_path, FULL)
    assert e.federation == FederationConfig(
        rounds=7, min_sites=3, sites_per_round=4, round_timeout=30.0, max_round_retries=0
    )
    assert isinstance(e.federation.round_timeout, float)  # an integer is accepted for a float
    assert e.task == TaskConfig(
        name="digits", model="cnn", local_epochs=2, batch_size=32, lr=0.05, weight_decay=1e-4
    )
    assert e.strategy == StrategyConfig(
        name=StrategyName.FEDADAM, proximal_mu=0.5, server_lr=0.01, beta_1=0.8, beta_2=0.999, tau=1e-9
    )
    assert e.strategy.name is StrategyName.FEDADAM
    assert e.data == DataConfig(partition="shards:2", seed=42)
    assert e.seed == 42
    assert e.simulation == SimulationConfig(sites=6)


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    e = load_text(tmp_path, "[federation]\nrounds = 3\n")
    assert e.federation.rounds == 3
    assert e.federation.min_sites == 2
    assert e.task == TaskConfig() and e.strategy == StrategyConfig()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[federation\nrounds = 3\n")


def test_config_error_is_a_fedcore_error() -> None:
    assert issubclass(ConfigError, FedcoreError)


def test_unknown_table_names_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "[federaton]\nrounds = 3\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown table [federaton]" in message
    for table in ("[federation]", "[task]", "[strategy]", "[data]", "[simulation]"):
        assert table in message


def test_unknown_key_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "[task]\nlearning_rate = 0.1\n")
    message = str(info.value)
    assert "unknown key 'learning_rate' in [task]" in message
    assert "known keys: name, model, local_epochs, batch_size, lr, weight_decay" in message


def test_top_level_key_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown table \[rounds\]"):
        load_text(tmp_path, "rounds = 3\n")
    with pytest.raises(ConfigError, match=r"\[federation\] must be a table"):
        load_text(tmp_path, "federation = 3\n")


def test_nested_table_is_an_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'extra' in"):
        load_text(tmp_path, "[federation.extra]\nx = 1\n")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[federation]\nrounds = "3"', r"\[federation\] rounds must be an integer, got '3'"),
        ("[federation]\nrounds = 3.0", "rounds must be an integer"),
        ("[federation]\nrounds = true", "rounds must be an integer"),
        ('[federation]\nround_timeout = "10s"', "round_timeout must be a finite number"),
        ("[federation]\nround_timeout = false", "round_timeout must be a finite number"),
        ("[task]\nname = 3", r"\[task\] name must be a string"),
        ('[task]\nmodel = ["mlp"]', "model must be a string"),
        ('[task]\nlr = "0.1"', "lr must be a finite number"),
        ("[strategy]\nname = 3", "is not a strategy"),
        ("[data]\nseed = 1.5", r"\[data\] seed must be an integer"),
        ("[data]\npartition = 2", "partition must be a string"),
        ('[simulation]\nsites = "many"', "sites must be an integer"),
    ],
)
def test_wrong_types(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, toml + "\n")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[federation]\nrounds = 0", r"rounds must be >= 1, got 0"),
        ("[federation]\nmin_sites = 0", "min_sites must be >= 1"),
        (
            "[federation]\nmin_sites = 3\nsites_per_round = 2",
            r"sites_per_round \(2\) must be >= min_sites \(3\)",
        ),
        ("[federation]\nround_timeout = 0", "round_timeout must be > 0"),
        ("[federation]\nround_timeout = -1.5", "round_timeout must be > 0"),
        ("[federation]\nmax_round_retries = -1", "max_round_retries must be >= 0"),
        ("[task]\nlocal_epochs = 0", "local_epochs must be >= 1"),
        ("[task]\nbatch_size = 0", "batch_size must be >= 1"),
        ("[task]\nlr = 0", "lr must be > 0"),
        ("[task]\nweight_decay = -0.1", "weight_decay must be >= 0"),
        ("[strategy]\nproximal_mu = -1", "proximal_mu must be >= 0"),
        ("[strategy]\nserver_lr = 0", "server_lr must be > 0"),
        ("[strategy]\nbeta_1 = 1.0", r"betas must be in \[0, 1\)"),
        ("[strategy]\nbeta_2 = -0.1", "betas must be in"),
        ("[strategy]\ntau = 0", "tau must be > 0"),
        ("[simulation]\nsites = 0", "sites must be >= 1"),
        ('[data]\npartition = "dirichlet:0"', r"\[data\] partition: bad partition"),
        ('[data]\npartition = "random"', r"\[data\] partition: unknown partition 'random'"),
        (
            '[strategy]\nname = "fedsgd"',
            "'fedsgd' is not a strategy; choose one of: fedavg, fedprox, fedadam",
        ),
    ],
)
def test_invalid_values(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "+inf"])
@pytest.mark.parametrize(
    "key",
    [
        "federation.round_timeout",
        "task.lr",
        "task.weight_decay",
        "strategy.proximal_mu",
        "strategy.server_lr",
        "strategy.beta_1",
        "strategy.tau",
    ],
)
def test_non_finite_numbers_are_refused(tmp_path: Path, key: str, literal: str) -> None:
    table, name = key.split(".")
    with pytest.raises(ConfigError, match=name):
        load_text(tmp_path, f"[{table}]\n{name} = {literal}\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fedavg", StrategyName.FEDAVG),
        ("FedProx", StrategyName.FEDPROX),
        ("FEDADAM", StrategyName.FEDADAM),
        ("fedYogi", StrategyName.FEDYOGI),
        ("fedadagrad", StrategyName.FEDADAGRAD),
    ],
)
def test_strategy_name_parsing(tmp_path: Path, text: str, expected: StrategyName) -> None:
    e = load_text(tmp_path, f'[strategy]\nname = "{text}"\n')
    assert e.strategy.name is expected
    assert Experiment().override(strategy__name=text).strategy.name is expected


def test_strategy_names_are_the_five_known() -> None:
    assert {s.value for s in StrategyName} == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"}


# --- overrides ---------------------------------------------------------------------------


def test_override_takes_precedence_over_the_file(tmp_path: Path) -> None:
    e = load_text(tmp_path, FULL)
    o = e.override(federation__rounds=2, task__lr=0.5, strategy__name="fedyogi", data__seed=9)
    assert o.federation.rounds == 2
    assert o.task.lr == 0.5
    assert o.strategy.name is StrategyName.FEDYOGI
    assert o.seed == 9
    # Everything not overridden is the file's value, and the original is untouched.
    assert o.federation.min_sites == 3 and o.task.name == "digits" and o.strategy.tau == 1e-9
    assert o.simulation == e.simulation
    assert e.federation.rounds == 7 and e.task.lr == 0.05


def test_override_ignores_none(tmp_path: Path) -> None:
    e = load_text(tmp_path, FULL)
    assert e.override() == e
    assert e.override(federation__rounds=None, task__model=None, data__partition=None) == e
    o = e.override(federation__rounds=None, federation__min_sites=2)
    assert (o.federation.rounds, o.federation.min_sites) == (7, 2)


@given(
    rounds=st.none() | st.integers(1, 1000),
    seed=st.none() | st.integers(0, 2**31),
    lr=st.none() | st.floats(1e-6, 10),
    sites=st.none() | st.integers(3, 50),
)
def test_override_property(rounds: int | None, seed: int | None, lr: float | None, sites: int | None) -> None:
    base = Experiment(
        federation=FederationConfig(rounds=5, min_sites=3),
        task=TaskConfig(lr=0.25),
        data=DataConfig(seed=11),
        simulation=SimulationConfig(sites=4),
    )
    o = base.override(federation__rounds=rounds, data__seed=seed, task__lr=lr, simulation__sites=sites)
    assert o.federation.rounds == (5 if rounds is None else rounds)
    assert o.seed == (11 if seed is None else seed)
    assert o.task.lr == (0.25 if lr is None else lr)
    assert o.simulation.sites == (4 if sites is None else sites)
    assert o.federation.min_sites == 3
    assert o.strategy == base.strategy


def test_override_coerces_and_checks_like_the_file() -> None:
    o = Experiment().override(task__lr=1, federation__round_timeout=5)
    assert isinstance(o.task.lr, float) and isinstance(o.federation.round_timeout, float)
    with pytest.raises(ConfigError, match=r"^command line: \[federation\] rounds must be an integer"):
        Experiment().override(federation__rounds="3")
    with pytest.raises(ConfigError, match=r"^command line: \[federation\] rounds must be >= 1"):
        Experiment().override(federation__rounds=0)
    with pytest.raises(ConfigError, match=r"command line: .*min_sites must be >= 1"):
        Experiment().override(federation__min_sites=0)
    with pytest.raises(ConfigError, match=r"command line: .*partition"):
        Experiment().override(data__partition="shards:0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy__lr": 1.0}, r"unknown key 'lr' in \[strategy\]; known keys: name, proximal_mu"),
        ({"bogus__x": 1}, r"unknown table \[bogus\]; known tables: \[federation\]"),
        ({"rounds": 3}, r"unknown table \[rounds\]"),
    ],
)
def test_override_unknown_names_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Experiment().override(**kwargs)


def test_override_keeps_enum_values() -> None:
    e = Experiment().override(strategy__name=StrategyName.FEDPROX, strategy__proximal_mu=0.1)
    assert e.strategy.name is StrategyName.FEDPROX
    assert e.override(data__seed=1).strategy.name is StrategyName.FEDPROX
