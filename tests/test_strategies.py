"""Strategies against Flower as the oracle: FedAvg equals `flwr.server.strategy.aggregate`,
FedAdagrad / FedAdam / FedYogi follow Flower's strategies of the same name round after round.

The fedcore side always goes the way the engine goes: each site's update is
`fedcore.engine.site.delta(site_params, global)`, the server folds the updates into
the plain pipeline (weighted mean leaf) with weight = number of examples, and the strategy applies the mean update.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore.aggregation import SiteReply, build_pipeline
from fedcore.config import StrategyConfig, StrategyName, load_experiment
from fedcore.engine.site import delta, train_settings
from fedcore.strategies import FedAdagrad, FedAdam, FedAvg, FedOpt, FedProx, FedYogi, build_strategy
from fedcore.tensors import Arrays, PayloadAssembler, chunks, encode
from tests.test_pipeline import aggregate as fedcore_aggregate

with warnings.catch_warnings():
    # flwr imports typer, which touches a deprecated click API at import time (not ours).
    warnings.simplefilter("ignore", DeprecationWarning)
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy as flwr_strategy
    from flwr.server.strategy.aggregate import aggregate

shapes = st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6), min_size=1, max_size=4)


def random_model(rng: np.random.Generator, layer_shapes: list[tuple[int, ...]], dtype: Any) -> Arrays:
    return {f"layer{i}.weight": rng.standard_normal(s).astype(dtype) for i, s in enumerate(layer_shapes)}


def over_the_wire(arrays: Arrays) -> Arrays:
    header, views = encode(arrays)
    assembler = PayloadAssembler(header)
    for piece in chunks(views, 37):
        assembler.add(piece)
    return assembler.arrays()


def fedcore_mean_update(global_: Arrays, sites: list[tuple[Arrays, int]], *, wire: bool = False) -> Arrays:
    replies = {}
    for k, (params, n) in enumerate(sites):
        update = delta(params, global_)
        replies[f"site-{k}"] = SiteReply(f"site-{k}", over_the_wire(update) if wire else update, float(n))
    aggregate_ = fedcore_aggregate(build_pipeline(load_experiment()), replies, global_)
    assert aggregate_.count == len(sites)
    assert aggregate_.weight == sum(n for _, n in sites)
    return aggregate_.mean


# --- FedAvg == flwr.server.strategy.aggregate.aggregate ----------------------------------


@settings(max_examples=80, deadline=None)
@given(
    layer_shapes=shapes,
    weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
    spread=st.sampled_from([1e-3, 1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
    wire=st.booleans(),
)
def test_fedavg_equals_flower_aggregate(
    layer_shapes: list[tuple[int, ...]], weights: list[int], spread: float, seed: int, wire: bool
) -> None:
    rng = np.random.default_rng(seed)
    global_ = random_model(rng, layer_shapes, np.float32)
    sites = [
        ({k: (v + spread * rng.standard_normal(v.shape)).astype(np.float32) for k, v in global_.items()}, n)
        for n in weights
    ]
    ours = FedAvg().apply(global_, fedcore_mean_update(global_, sites, wire=wire))
    oracle = aggregate([(list(params.values()), n) for params, n in sites])

    assert list(ours) == list(global_)
    for (name, got), want in zip(ours.items(), oracle, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape, name
        # Relative error 1e-6, relative to the size of the values being averaged (an
        # element-wise relative error is meaningless where the mean cancels to ~0).
        scale = np.max(np.abs([params[name] for params, _ in sites]), axis=0, initial=0.0)
        assert np.all(np.abs(got - want) <= 1e-6 * np.maximum(scale, np.abs(global_[name]))), name


def test_fedavg_of_one_site_is_that_site() -> None:
    rng = np.random.default_rng(1)
    global_ = random_model(rng, [(4, 3), (3,)], np.float32)
    site = {k: v + 0.5 for k, v in global_.items()}
    out = FedAvg().apply(global_, fedcore_mean_update(global_, [(site, 17)]))
    for k in global_:
        np.testing.assert_allclose(out[k], site[k], rtol=1e-6)


def test_fedavg_weights_by_examples_not_by_sites() -> None:
    global_ = {"w": np.zeros(2, np.float32)}
    sites = [({"w": np.array([1.0, 0.0], np.float32)}, 3), ({"w": np.array([0.0, 1.0], np.float32)}, 1)]
    out = FedAvg().apply(global_, fedcore_mean_update(global_, sites))
    np.testing.assert_array_equal(out["w"], np.array([0.75, 0.25], np.float32))


def test_fedavg_adds_tensors_of_any_memory_order_and_size() -> None:
    # Blockwise: a transposed (Fortran-order) tensor and one of several blocks come out exact.
    rng = np.random.default_rng(3)
    global_ = {"t": rng.standard_normal((300, 500)).astype(np.float32).T, "big": np.ones(200_001, np.float32)}
    mean = {"t": rng.standard_normal((500, 300)), "big": np.full(200_001, 0.25)}
    out = FedAvg().apply(global_, mean)
    for k, v in global_.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        np.testing.assert_array_equal(out[k], (v.astype(np.float64) + mean[k]).astype(np.float32))


def test_fedavg_keeps_each_tensors_dtype() -> None:
    global_ = {"w": np.ones(3, np.float32), "h": np.ones(3, np.float16), "d": np.ones(3, np.float64)}
    out = FedAvg().apply(global_, {k: np.full(3, 0.5) for k in global_})
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in global_.items()}
    for v in out.values():
        np.testing.assert_array_equal(v, 1.5)


# --- FedProx -----------------------------------------------------------------------------


@given(mu=st.floats(0, 100))
def test_fedprox_sends_mu_and_averages_like_fedavg(mu: float) -> None:
    prox = FedProx(proximal_mu=mu)
    assert prox.fit_config(1) == {"proximal_mu": mu}
    assert prox.fit_config(7) == {"proximal_mu": mu}
    # The site reads it back from the round's config.
    config = {"local_epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 3, **prox.fit_config(1)}
    assert train_settings(config).proximal_mu == mu
    rng = np.random.default_rng(0)
    global_ = random_model(rng, [(5, 2)], np.float32)
    mean = {k: rng.standard_normal(v.shape) for k, v in global_.items()}
    for k, v in prox.apply(global_, mean).items():
        np.testing.assert_array_equal(v, FedAvg().apply(global_, mean)[k])


def test_fedavg_sends_no_extra_config() -> None:
    assert FedAvg().fit_config(1) == {}
    assert train_settings({"local_epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 3}).proximal_mu == 0.0


# --- FedAdagrad / FedAdam / FedYogi against Flower's strategies --------------------------


def fit_res(params: Arrays, n: int) -> tuple[None, FitRes]:
    # Flower's aggregate_fit never touches the ClientProxy, so None stands in for it.
    res = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(list(params.values())),
        num_examples=n,
        metrics={},
    )
    return None, res


def make_pair(
    kind: str, initial: Arrays, *, eta: float, beta_1: float, beta_2: float, tau: float
) -> tuple[FedOpt, Any]:
    start = ndarrays_to_parameters(list(initial.values()))
    if kind == "adagrad":
        # Flower's FedAdagrad fixes beta_1 = 0 (no momentum); fedcore's takes it as an argument.
        return (
            FedAdagrad(server_lr=eta, beta_1=0.0, beta_2=beta_2, tau=tau),
            flwr_strategy.FedAdagrad(initial_parameters=start, eta=eta, tau=tau),
        )
    ours_cls, theirs_cls = {
        "adam": (FedAdam, flwr_strategy.FedAdam),
        "yogi": (FedYogi, flwr_strategy.FedYogi),
    }[kind]
    return (
        ours_cls(server_lr=eta, beta_1=beta_1, beta_2=beta_2, tau=tau),
        theirs_cls(initial_parameters=start, eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau),
    )


def flower_round(kind: str, step: int) -> int:
    """The `server_round` to hand Flower for fedcore's `step`-th step (1-based).

    FedAdam corrects the moments' bias with t = the number of steps taken so far, counting
    this one (1, 2, 3, ...), as Adam does. Flower's FedAdam uses t = server_round + 1, so
    step t of ours is Flower's server_round t - 1. FedAdagrad and FedYogi ignore the round.
    """
    return step - 1 if kind == "adam" else step


def run_rounds(
    kind: str,
    *,
    layer_shapes: list[tuple[int, ...]],
    weights_per_round: list[list[int]],
    dtype: Any,
    seed: int,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> list[tuple[Arrays, list[np.ndarray]]]:
    """Both strategies over the same rounds; (fedcore's, Flower's) global model after each."""
    rng = np.random.default_rng(seed)
    global_ = random_model(rng, layer_shapes, dtype)
    ours, theirs = make_pair(kind, global_, eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
    history = []
    for step, weights in enumerate(weights_per_round, start=1):
        sites = [
            ({k: (v + rng.standard_normal(v.shape)).astype(dtype) for k, v in global_.items()}, n)
            for n in weights
        ]
        global_ = ours.apply(global_, fedcore_mean_update(global_, sites))
        assert ours.steps == step
        parameters, _ = theirs.aggregate_fit(flower_round(kind, step), [fit_res(p, n) for p, n in sites], [])
        assert parameters is not None
        history.append((global_, parameters_to_ndarrays(parameters)))
    return history


KINDS = ["adagrad", "adam", "yogi"]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(
    layer_shapes=shapes,
    weights_per_round=st.lists(
        st.lists(st.integers(1, 5_000), min_size=1, max_size=5), min_size=1, max_size=5
    ),
    seed=st.integers(0, 2**32 - 1),
    eta=st.floats(1e-3, 1.0),
    beta_1=st.floats(0.0, 0.95),
    beta_2=st.floats(0.5, 0.999),
    tau=st.floats(1e-4, 0.1),
)
def test_fedopt_follows_flower_float64(
    kind: str,
    layer_shapes: list[tuple[int, ...]],
    weights_per_round: list[list[int]],
    seed: int,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> None:
    # In float64 both sides agree to ~1e-13, so a tight tolerance separates a real
    # difference (bias correction, moment update, sign) from rounding.
    history = run_rounds(
        kind,
        layer_shapes=layer_shapes,
        weights_per_round=weights_per_round,
        dtype=np.float64,
        seed=seed,
        eta=eta,
        beta_1=beta_1,
        beta_2=beta_2,
        tau=tau,
    )
    for ours, theirs in history:
        for got, want in zip(ours.values(), theirs, strict=True):
            assert got.dtype == np.float64 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * eta)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(5))
def test_fedopt_follows_flower_float32(kind: str, seed: int) -> None:
    # The models the tasks train are float32. fedcore keeps the global model in float32;
    # the pseudo-gradient is then known to float32 precision only, and eta * m / (sqrt(v) +
    # tau) magnifies that where the update is ~tau: agreement to a small fraction of eta.
    eta = 0.1
    history = run_rounds(
        kind,
        layer_shapes=[(8, 4), (4,), ()],
        weights_per_round=[[10, 200, 35], [7, 7], [500, 1, 60, 3], [42]],
        dtype=np.float32,
        seed=seed,
        eta=eta,
        beta_1=0.9,
        beta_2=0.99,
        tau=1e-3,
    )
    for ours, theirs in history:
        for got, want in zip(ours.values(), theirs, strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4 * eta)


@pytest.mark.parametrize("kind", KINDS)
def test_fedopt_moments_match_flower(kind: str) -> None:
    rng = np.random.default_rng(5)
    global_ = random_model(rng, [(3, 3), (2,)], np.float64)
    ours, theirs = make_pair(kind, global_, eta=0.3, beta_1=0.8, beta_2=0.95, tau=1e-2)
    for step in range(1, 4):
        sites = [({k: v + rng.standard_normal(v.shape) for k, v in global_.items()}, n) for n in (5, 9)]
        global_ = ours.apply(global_, fedcore_mean_update(global_, sites))
        theirs.aggregate_fit(flower_round(kind, step), [fit_res(p, n) for p, n in sites], [])
    state = ours.state_dict()
    assert int(state["steps"]["steps"][0]) == 3
    for name, m, v in zip(global_, theirs.m_t, theirs.v_t, strict=True):
        np.testing.assert_allclose(state["m"][name], m, rtol=1e-10)
        np.testing.assert_allclose(state["v"][name], v, rtol=1e-10)


def test_fedadam_bias_correction_is_one_based() -> None:
    # One step of Adam from zero moments moves each coordinate by eta * d / (|d| + tau):
    # with t = 1 the corrections sqrt(1 - b2) / (1 - b1) and m, v's (1 - b) factors cancel.
    adam = FedAdam(server_lr=0.5, beta_1=0.9, beta_2=0.99, tau=1e-12)
    out = adam.apply({"w": np.zeros(3)}, {"w": np.array([2.0, -0.25, 1e-3])})
    np.testing.assert_allclose(out["w"], [0.5, -0.5, 0.5], rtol=1e-7)


# --- build_strategy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (StrategyName.FEDAVG, FedAvg),
        (StrategyName.FEDPROX, FedProx),
        (StrategyName.FEDADAGRAD, FedAdagrad),
        (StrategyName.FEDADAM, FedAdam),
        (StrategyName.FEDYOGI, FedYogi),
    ],
)
def test_build_strategy(name: StrategyName, cls: type) -> None:
    config = StrategyConfig(name=name, proximal_mu=0.25, server_lr=0.03, beta_1=0.7, beta_2=0.9, tau=1e-4)
    strategy = build_strategy(config)
    assert type(strategy) is cls
    assert strategy.name == name.value
    if isinstance(strategy, FedProx):
        assert strategy.fit_config(1) == {"proximal_mu": 0.25}
    if isinstance(strategy, FedOpt):
        assert (strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau) == (0.03, 0.7, 0.9, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_a_restored_fedopt_continues_exactly(kind: str) -> None:
    """Save after two steps, load into a fresh strategy: the third step is bit-identical."""
    rng = np.random.default_rng(9)
    global_ = random_model(rng, [(4, 2), (3,)], np.float32)
    ours, _ = make_pair(kind, global_, eta=0.3, beta_1=0.8, beta_2=0.95, tau=1e-2)
    fresh, _ = make_pair(kind, global_, eta=0.3, beta_1=0.8, beta_2=0.95, tau=1e-2)
    updates = [{k: rng.standard_normal(v.shape) for k, v in global_.items()} for _ in range(3)]
    for u in updates[:2]:
        global_ = ours.apply(global_, u)
    fresh.load_state_dict(ours.state_dict())
    a, b = ours.apply(global_, updates[2]), fresh.apply(global_, updates[2])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_an_averaged_strategy_delivers_the_moving_average_and_resumes_from_the_iterate() -> None:
    """Sites train from the iterate; the run evaluates and stores the average; a checkpoint
    (the average as the run's model, the strategy's state) gives back the same iterate."""
    from fedcore.config import StrategyConfig
    from fedcore.strategies import build_strategy

    strategy = build_strategy(StrategyConfig(average=0.5))
    model = {"w": np.zeros(3)}
    iterates = []
    for step in (np.ones(3), 3 * np.ones(3)):
        model = strategy.apply(model, {"w": step})
        iterates.append(model["w"].copy())
    np.testing.assert_allclose(model["w"], 4 * np.ones(3))  # FedAvg: the iterate moves by the mean
    np.testing.assert_allclose(strategy.released(model)["w"], 0.5 * iterates[0] + 0.5 * iterates[1])
    resumed = build_strategy(StrategyConfig(average=0.5))
    resumed.load_state_dict(strategy.state_dict())
    stored = strategy.released(model)
    np.testing.assert_allclose(resumed.restored(stored)["w"], model["w"])
    np.testing.assert_allclose(resumed.released(model)["w"], stored["w"])
    plain = build_strategy(StrategyConfig())
    assert plain.released(model) is model and plain.restored(model) is model
