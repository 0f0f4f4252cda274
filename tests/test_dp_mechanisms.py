"""Differential privacy's mechanisms against references: noise of the configured size
(statistical tests with a fixed false-alarm rate), clipping that holds whatever the input,
accountants equal to Opacus's, budgets enforced across a restart, and the distributed-DP
sum under real SecAgg+ carrying the configured total noise."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from fedcore.aggregation import SiteStages
from fedcore.aggregation.plans import CentralNoisePlan, ClipPlan, SampleDPPlan
from fedcore.config import Accountant
from fedcore.errors import PrivacyBudgetError
from fedcore.privacy import book_keeping, distributed, dpsgd
from fedcore.privacy.accountant import Mechanism, epsilon, zcdp_epsilon
from fedcore.privacy.dpsgd import SampleDP
from fedcore.privacy.randomness import SecureRandom
from fedcore.privacy.site_policy import SitePolicy, SitePrivacy
from fedcore.privacy.user_level import update_noise_multiplier
from fedcore.secagg.common import RoundParams
from fedcore.secagg.local import run_round
from fedcore.secagg.quantize import signed
from fedcore.tasks import build_task
from fedcore.tensors import clip_l2
from tests.support.opacus_reference import gaussian_epsilon, opacus_epsilon, pld_epsilon

# Every statistical test below fails with probability 1e-6 when the code is right (two-sided);
# the seeds are fixed, so the outcome is reproducible.
ALPHA = 1e-6


def variance_within(samples: np.ndarray, variance: float) -> None:
    """Chi-square test that `samples` (mean 0 known) have `variance`."""
    n = samples.size
    statistic = float(np.square(samples.astype(np.float64)).sum() / variance)
    low, high = stats.chi2.ppf(ALPHA / 2, n), stats.chi2.ppf(1 - ALPHA / 2, n)
    assert low <= statistic <= high, (
        f"sample variance {statistic / n * variance:.6g}, configured {variance:.6g}"
    )


# Randomness -----------------------------------------------------------------------------
def test_secure_streams_are_unpredictable_and_seeded_ones_reproducible() -> None:
    assert not np.array_equal(SecureRandom().uniform(8), SecureRandom().uniform(8))
    assert np.array_equal(SecureRandom.seeded(3).uniform(8), SecureRandom.seeded(3).uniform(8))
    u = SecureRandom.seeded(0).uniform(200_000)
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > ALPHA


@pytest.mark.parametrize("std", [0.01, 1.0, 37.5])
def test_gaussian_noise_has_the_configured_std(std: float) -> None:
    draws = SecureRandom.seeded(1).gaussian(200_000, std)
    variance_within(draws, std**2)
    assert stats.normaltest(draws).pvalue > ALPHA  # Gaussian in shape, not only in variance


@pytest.mark.parametrize("sigma", [0.8, 2.5, 40.0])
def test_discrete_gaussian_matches_its_distribution(sigma: float) -> None:
    draws = SecureRandom.seeded(2).discrete_gaussian(100_000, sigma)
    assert draws.dtype == np.int64
    support = np.arange(-int(8 * sigma) - 2, int(8 * sigma) + 3)
    pmf = np.exp(-(support**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    observed = np.array([(draws == k).sum() for k in support])
    assert observed.sum() == draws.size  # no mass outside 8 sigma
    # Chi-square goodness of fit over bins with enough expected counts (tails pooled).
    expected = pmf * draws.size
    keep = expected >= 20
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(obs, exp).pvalue > ALPHA


ENGINES = {
    "book-keeping": SampleDP(1.7, 0.3),
    "opacus": SampleDP(1.7, 0.3, book_keeping=False),
    "ghost": SampleDP(1.7, 0.3, ghost_clipping=True),
}


@pytest.mark.parametrize(("q", "steps"), [(1.0, 1), (0.3, 4)])
@pytest.mark.parametrize("engine", ENGINES)
def test_dp_sgd_adds_noise_of_std_noise_multiplier_times_clip(engine: str, q: float, steps: int) -> None:
    """Whole DP-SGD rounds whose data gradients are exactly zero (no bias, zero inputs), with
    Poisson sampling (q < 1: some batches empty, still a noisy step) and without: the update
    is the noise alone, `steps` draws of std z x C over the public expected batch."""
    n = 50
    model = torch.nn.Linear(500, 200, bias=False)
    before = model.weight.detach().clone()
    x, y = torch.zeros(n, 500), torch.randint(0, 200, (n,))
    dp = dataclasses.replace(ENGINES[engine], sample_rate=q, local_steps=steps, expected_batch=40.0)
    dpsgd.train(model, x, y, dp=dp, random=SecureRandom.seeded(4), lr=1.0, weight_decay=0.0)
    noise = ((before - model.weight.detach()) * 40.0).numpy()
    variance_within(noise, steps * (1.7 * 0.3) ** 2)


CLASSIFIERS = {
    "logreg": (lambda: torch.nn.Sequential(torch.nn.Linear(30, 2)), (30,)),
    "mlp": (
        lambda: torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)),
        (30,),
    ),
    "cnn": (lambda: build_task("digits").build_model(), (1, 8, 8)),
    "linear over a sequence": (
        lambda: torch.nn.Sequential(
            torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(21, 2)
        ),
        (3, 5),
    ),
    "strided conv, frozen bias": (
        lambda: _frozen_bias(
            torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, stride=2, padding=(1, 0), dilation=(1, 2)),
                torch.nn.GELU(),
                torch.nn.Flatten(),
                torch.nn.Linear(32, 2),
            )
        ),
        (1, 8, 8),
    ),
}


def _frozen_bias(model: torch.nn.Sequential) -> torch.nn.Sequential:
    model[0].bias.requires_grad_(False)
    return model


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks, first layer
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_book_keeping_clips_exactly_as_opacus(name: str) -> None:
    """Opacus is the reference: the sum of clipped per-example gradients, and then a whole
    round from the same stream (same Poisson batches, same noise), equal Opacus's
    GradSampleModule + DPOptimizer's."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    build, shape = CLASSIFIERS[name]
    torch.manual_seed(0)
    model = build()
    assert book_keeping.supports(model)
    reference = copy.deepcopy(model)
    x, y = torch.randn(40, *shape) * 3, torch.randint(0, 2, (40,))  # * 3: most examples get clipped
    clipping = book_keeping.BookKeeping(model, max_grad_norm=0.2)
    clipping.clipped_sum(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
    clipping.close()
    module = GradSampleModule(reference, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(p for p in module.parameters() if p.requires_grad),
        noise_multiplier=0.0, max_grad_norm=0.2, expected_batch_size=1, loss_reduction="sum",
    )  # fmt: skip
    torch.nn.functional.cross_entropy(module(x), y, reduction="sum").backward()
    optimizer.pre_step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None
    module._close()

    trained = []
    for book in (True, False):
        torch.manual_seed(0)
        model = build()
        dpsgd.train(
            model, x, y, dp=SampleDP(1.0, 0.2, 0.2, 10, book_keeping=book), random=SecureRandom.seeded(5),
            lr=0.5, weight_decay=0.01,
        )  # fmt: skip
        trained.append(model.state_dict())
    for key, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][key], rtol=1e-4, atol=1e-6)


def test_book_keeping_leaves_other_models_to_opacus() -> None:
    """Only models made of known per-example operations qualify; the rest still train."""
    shared = torch.nn.Linear(4, 4)
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    hooked = torch.nn.Sequential(torch.nn.Linear(4, 4))
    hooked[0].register_forward_hook(lambda module, inputs, output: output - output.mean(0))
    refused = {
        "layer norm": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)),
        "shared layer": torch.nn.Sequential(shared, torch.nn.ReLU(), shared),
        "tied weights": tied,
        "grouped conv": torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1, groups=2)),
        "custom forward": _Custom(),
        "subclass mixing the batch": _MixingSequential(torch.nn.Linear(4, 4)),
        "in-place activation": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True)),
        "forward hook": hooked,
    }
    for name, model in refused.items():
        assert not book_keeping.supports(model), name
    model = refused["layer norm"]
    before = [p.detach().clone() for p in model.parameters()]
    dpsgd.train(
        model, torch.randn(20, 4), torch.randint(0, 4, (20,)), dp=SampleDP(1.0, 1.0, 0.25, 4),
        random=SecureRandom.seeded(6), lr=0.1, weight_decay=0.0,
    )  # fmt: skip
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # plain again


class _MixingSequential(torch.nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - x.mean(0))


class _Custom(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x - x.mean(0))  # mixes the batch: no per-example gradients


# Clipping -------------------------------------------------------------------------------
finite = st.floats(-1e30, 1e30, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.integers(1, 50), elements=finite),
    arrays(
        np.float32,
        st.tuples(st.integers(1, 5), st.integers(1, 5)),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    st.floats(1e-6, 1e6),
)
# Found by hypothesis: float32 values this large, clipped to 1e-6, rounded to a norm of 1.000001e-6.
@example(np.zeros(1), np.full((2, 3), 2.08e35, np.float32), 1e-6)
def test_no_clipped_update_exceeds_the_bound(a: np.ndarray, b: np.ndarray, clip: float) -> None:
    clipped, within = clip_l2({"a": a, "b": b}, clip)
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in clipped.values()))
    assert norm <= clip  # after rounding to float32: no slack at all
    assert clipped["b"].dtype == np.float32
    if within:
        assert clipped["a"] is a


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 300), elements=finite), st.floats(1e-3, 1e3))
def test_distributed_encoding_never_exceeds_its_sensitivity(flat: np.ndarray, clip: float) -> None:
    noise = distributed.DistributedNoise.for_model(
        dimension=flat.size, clip_norm=clip, noise_multiplier=1.0, sites=4
    )
    silent = distributed.DistributedNoise(noise.clip_norm, noise.scale, 0.0)  # no noise: the signal alone
    encoded = distributed.encode(flat, silent, SecureRandom.seeded(5))
    assert encoded[-1] == 1
    bound = distributed.sensitivity_l2(flat.size, clip, noise.scale)
    assert float(np.linalg.norm(encoded[:-1].astype(np.float64))) <= bound


# Accountants ----------------------------------------------------------------------------
@pytest.mark.parametrize(("z", "rounds"), [(0.8, 1), (1.3, 30), (4.0, 200)])
def test_zcdp_conversion_equals_opacus_for_the_gaussian(z: float, rounds: int) -> None:
    """A Gaussian of multiplier z is (rounds / 2z^2)-zCDP: the same RDP curve as Opacus's q = 1."""
    assert zcdp_epsilon(rounds / (2 * z**2), 1e-5) == pytest.approx(
        opacus_epsilon([(z, 1.0, rounds)], 1e-5), rel=1e-6
    )


@pytest.mark.parametrize(("sites", "z", "dimension"), [(5, 1.0, 31), (20, 3.0, 10_000), (100, 0.7, 1_000)])
def test_distributed_discrete_gaussian_epsilon_equals_the_gaussian_reference(
    sites: int, z: float, dimension: int
) -> None:
    """At fedcore's scales tau is negligible, so the sum of the sites' discrete Gaussians
    accounts exactly as a Gaussian of std z x Delta_2: Opacus's RDP accountant with q = 1."""
    noise = distributed.DistributedNoise.for_model(
        dimension=dimension, clip_norm=0.5, noise_multiplier=z, sites=sites
    )
    rho = distributed.round_rho(dimension=dimension, noise=noise, sites=sites)
    assert distributed.epsilon([rho] * 10, 1e-5) == pytest.approx(
        opacus_epsilon([(z, 1.0, 10)], 1e-5), rel=1e-6
    )
    # Fewer sites' noise in the sum (dropouts) costs more privacy, and is accounted so.
    fewer = distributed.round_rho(dimension=dimension, noise=noise, sites=max(1, sites // 2))
    assert fewer > rho


def test_distributed_noise_for_a_target_meets_it() -> None:
    z = distributed.noise_for(target_epsilon=2.0, delta=1e-5, rounds=30)
    assert distributed.epsilon([30 / (2 * z**2)], 1e-5) == pytest.approx(2.0, rel=1e-3)


def test_adaptive_clipping_keeps_the_total_noise_multiplier() -> None:
    z, sigma_b = 1.2, 2.0
    z_update = update_noise_multiplier(z, sigma_b)
    assert (z_update**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)


def test_a_dp_sgd_round_is_the_public_mechanism_whatever_the_sites_size() -> None:
    """The mechanism a round runs (and so the epsilon a site reports) is the job's public
    settings: two sites of 30 and 300 examples run, and report, the same one."""
    dp = SampleDP(1.1, 1.0, 0.2, 10)
    for n in (30, 300):
        model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        x, y = torch.randn(n, 4), torch.randint(0, 2, (n,))
        _, ran = dpsgd.train(model, x, y, dp=dp, random=SecureRandom.seeded(n), lr=0.1, weight_decay=0.0)
        assert ran == Mechanism(1.1, 0.2, 10) == dp.mechanism


# The site's budget ----------------------------------------------------------------------
SHAPE = {"sample_rate": 0.25, "local_steps": 4}
JOB = {
    "noise_multiplier": 2.0,
    "target_epsilon": None,
    "rounds": 1,
    "delta": 1e-5,
    "max_grad_norm": 1.0,
    "ghost_clipping": False,
    "run": "run-a",
}


def test_a_site_refuses_the_round_that_would_cross_its_budget_even_after_a_restart(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    policy = SitePolicy(max_epsilon=1.0, ledger=ledger)
    site = SitePrivacy(policy)
    taken = 0
    while True:
        try:
            plan = site.plan_dp_sgd(**JOB, **SHAPE)
        except PrivacyBudgetError as err:
            assert "privacy budget" in str(err)
            break
        site.spend(plan)
        taken += 1
        assert taken < 1000
    mechanism = Mechanism(2.0, 0.25, 4)
    assert epsilon([mechanism] * taken, 1e-5) <= 1.0 < epsilon([mechanism] * (taken + 1), 1e-5)
    restarted = SitePrivacy(policy)  # a new process reads the same ledger
    assert restarted.ledger.spent() == pytest.approx(epsilon([mechanism] * taken, 1e-5))
    with pytest.raises(PrivacyBudgetError):
        restarted.plan_dp_sgd(**JOB, **SHAPE)
    with pytest.raises(PrivacyBudgetError):  # a new run does not reset the total either
        restarted.plan_dp_sgd(**{**JOB, "run": "run-b"}, **SHAPE)


def test_the_server_cannot_lower_a_sites_noise_or_switch_dp_off() -> None:
    privacy = SitePrivacy(SitePolicy(min_noise_multiplier=3.0, require_dp=True))
    plan = privacy.plan_dp_sgd(**{**JOB, "noise_multiplier": 0.5}, **SHAPE)
    assert plan.dp == SampleDP(3.0, 1.0, 0.25, 4) and plan.mechanism.noise_multiplier == 3.0
    # Through the site part of the stages, as a fit instruction's plan arrives:
    stages = SiteStages("site-1", privacy)
    prepare = {"masked": False, "dimension": 10}
    for plan_items in [(), (ClipPlan(1.0, equal_weights=True), CentralNoisePlan(1e-5, "run-a"))]:
        with pytest.raises(PrivacyBudgetError, match="noise it adds"):
            stages.prepare(plan_items, **prepare)
    assert privacy.secure_rng(False) is True  # a real site never runs reproducible noise
    with pytest.raises(PrivacyBudgetError, match="delta"):  # refused before any training
        stages.prepare((SampleDPPlan(1.0, 1, 1.5, "run-a", noise_multiplier=1.0),), **prepare)


def test_distributed_dp_needs_masking_and_real_noise_and_costs_the_sites_own_budget(tmp_path: Path) -> None:
    d = 1000
    fair = distributed.DistributedNoise.for_model(dimension=d, clip_norm=1.0, noise_multiplier=2.0, sites=4)
    job = {"delta": 1e-5, "run": "run-d", "dimension": d}
    site = SitePrivacy(SitePolicy(min_noise_multiplier=1.5, max_epsilon=50.0, ledger=tmp_path / "l.json"))
    with pytest.raises(PrivacyBudgetError, match="secure aggregation"):  # unmasked: refused
        site.plan_distributed(fair, **job, participants=None)
    silent = distributed.DistributedNoise(fair.clip_norm, fair.scale, 1e-300)
    with pytest.raises(PrivacyBudgetError, match="floor"):  # a near-silent sigma: refused
        site.plan_distributed(silent, **job, participants=4)
    plan = site.plan_distributed(fair, **job, participants=4)
    assert plan.distributed == fair
    # What the site records is its own noise alone, 2 / sqrt(4) = 1 per site, for the ledger's
    # unit, one example, which can move the clipped update twice the clip norm: 0.5.
    assert plan.mechanism.noise_multiplier == pytest.approx(0.5) and plan.mechanism.sample_rate == 1.0
    spent = site.spend(plan)
    assert spent["epsilon"] == pytest.approx(pld_epsilon([(0.5, 1.0, 1)], 1e-5), rel=1e-6)


@pytest.mark.parametrize("accountant", list(Accountant))
def test_a_distributed_round_enters_the_ledger_at_the_example_level_sensitivity(
    accountant: Accountant,
) -> None:
    """The review's figure: one round at z = 1 (the site's own noise) is epsilon 4.73 per
    site but 10.73 per example by RDP (sensitivity 2 x clip: z = 0.5); by PLD, within its
    discretisation of the exact Gaussian curve at z = 0.5 (about 10.0)."""
    d = 100
    noise = distributed.DistributedNoise.for_model(dimension=d, clip_norm=1.0, noise_multiplier=1.0, sites=1)
    site = SitePrivacy(SitePolicy(accountant=accountant))
    spent = site.spend(site.plan_distributed(noise, delta=1e-5, run="r", dimension=d, participants=3))
    if accountant is Accountant.RDP:
        assert site.ledger.spent() == pytest.approx(opacus_epsilon([(0.5, 1.0, 1)], 1e-5), rel=1e-6)
        assert 10.6 < site.ledger.spent() < 10.9
    else:
        exact = gaussian_epsilon(0.5, 1, 1e-5)
        assert exact <= spent["epsilon"] <= exact + 0.02 and 9.9 < exact < 10.1


def test_processes_sharing_a_ledger_never_overspend_it(tmp_path: Path) -> None:
    policy = SitePolicy(max_epsilon=1.0, ledger=tmp_path / "shared.json")
    job = {**JOB, "noise_multiplier": 4.0}  # a round costs a fraction of the budget
    a, b = SitePrivacy(policy), SitePrivacy(policy)
    planned = a.plan_dp_sgd(**job, **SHAPE)  # a checks, then trains for a while ...
    while True:  # ... while b spends the whole budget
        try:
            plan = b.plan_dp_sgd(**job, **SHAPE)
        except PrivacyBudgetError:
            break
        b.spend(plan)
    with pytest.raises(PrivacyBudgetError):  # a's spend is checked again under the lock
        a.spend(planned)
    assert SitePrivacy(policy).ledger.spent() <= 1.0


def test_adaptive_clipping_counts_centred_bits() -> None:
    from fedcore.privacy.user_level import AdaptiveClip

    clip = AdaptiveClip(initial=1.0, target_quantile=0.5, learning_rate=0.2, count_stddev=1e-12)
    fraction = clip.update(unclipped=6, contributors=8, expected_sites=8.0, random=SecureRandom.seeded(0))
    assert fraction == pytest.approx(0.75)
    assert clip.clip_norm == pytest.approx(math.exp(-0.2 * 0.25))


# Distributed DP under real SecAgg+ -------------------------------------------------------
def test_the_distributed_sum_carries_the_configured_total_noise() -> None:
    """Ten sites run the real SecAgg+ stages on their encoded updates. The server decrypts the
    sum; what it holds minus the sum of the un-noised signals is noise of variance
    n sigma^2 (never zero: it never sees an un-noised sum), and its decoded mean is unbiased."""
    n, d = 10, 20_000
    sites = [f"site-{i}" for i in range(n)]
    params = RoundParams(1, tuple(sites), 9, 6, d + 1, 64)
    noise = distributed.DistributedNoise.for_model(dimension=d, clip_norm=1.0, noise_multiplier=1.0, sites=n)
    g = np.random.default_rng(0)
    updates = {s: g.normal(0, 0.003, d) for s in sites}  # norm ~0.42 < clip: nothing clipped
    inputs, signals = {}, {}
    for i, s in enumerate(sites):
        inputs[s] = distributed.encode(updates[s], noise, SecureRandom.seeded(100 + i)).view(np.uint64)
        silent = distributed.DistributedNoise(noise.clip_norm, noise.scale, 0.0)
        signals[s] = distributed.encode(updates[s], silent, SecureRandom.seeded(100 + i))  # same rounding
    total = run_round(params, inputs)
    assert isinstance(total, np.ndarray)
    held = signed(total)
    assert held[-1] == n
    signal = sum(signals.values())
    variance_within(held[:-1] - signal[:-1], n * noise.sigma**2)
    # The decoded sum estimates the true sum within the noise's few standard deviations.
    decoded, count = distributed.decode(held, noise, d)
    error = decoded - sum(updates.values())
    assert count == n and abs(error.mean()) < 6 * math.sqrt(n) * noise.sigma / noise.scale / math.sqrt(d)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_dp_sgd_step_is_divided_by_the_public_expected_batch_never_the_sites_count(engine: str) -> None:
    """Twice the same examples, twice the update: the noisy sum is divided by the job's
    `expected_batch`, so the site's count shapes nothing outside the accounting (dividing by
    n x q would make add-remove neighbours differ by more than one clipped gradient)."""
    updates = []
    for copies in (1, 2):
        model = torch.nn.Linear(3, 2, bias=False)
        torch.nn.init.zeros_(model.weight)
        x = torch.tensor([[0.3, -0.2, 0.1]] * (10 * copies))
        y = torch.zeros(10 * copies, dtype=torch.long)
        dp = dataclasses.replace(
            ENGINES[engine], noise_multiplier=1e-9, max_grad_norm=100.0, expected_batch=7.0
        )
        dpsgd.train(model, x, y, dp=dp, random=SecureRandom.seeded(1), lr=1.0, weight_decay=0.0)
        updates.append(model.weight.detach().clone())
    torch.testing.assert_close(updates[1], 2 * updates[0])
    # One example's gradient at zero weights: softmax (1/2, 1/2) against class 0, over 7.
    expected = torch.tensor([[0.3, -0.2, 0.1], [-0.3, 0.2, -0.1]]) * 0.5 * 10 / 7
    torch.testing.assert_close(updates[0], expected, rtol=1e-5, atol=1e-6)


def test_the_central_release_is_on_an_integer_grid_with_discrete_gaussian_noise() -> None:
    """No floating-point noise leaves the server: every released value is the grid step
    times an integer, the noise on that grid has the std the accounted multiplier needs
    (z x the floored sum's sensitivity in grid steps), and a zero sum releases noise alone."""
    from fedcore.privacy.user_level import GRID_RESOLUTION, grid_noised

    d, clip, z = 40_000, 0.5, 1.3
    total = np.random.default_rng(0).normal(0, 0.01, d)
    released, step = grid_noised(total, noise_multiplier=z, clip=clip, random=SecureRandom.seeded(3))
    assert step == pytest.approx(clip / (GRID_RESOLUTION * math.sqrt(d)))
    grid = np.rint(released / step)
    np.testing.assert_array_equal(released, grid * step)  # g x an integer, exactly
    noise = grid - np.rint(total / step)
    sensitivity = clip / step + math.sqrt(d)
    variance_within(noise, (z * sensitivity) ** 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_example_that_overflows_contributes_nothing_and_poisons_nothing(engine: str) -> None:
    """A server sends a finite weight that overflows the logits of examples whose first
    feature is large (an attacker review's proof of concept): their loss is not finite.
    They must add nothing (not a NaN that the noise cannot hide, which would tell the server
    whether such an example is there): the update equals the one trained without them."""
    updates = []
    for with_target in (True, False):
        model = torch.nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.5e38, 0.0], [0.0, 1.0]]))
            model.bias.zero_()
        x = torch.tensor([[1e-40, 0.5], [1e-40, -0.5], *([[3.0, 0.1]] if with_target else [])])
        y = torch.tensor([0, 1, *([1] if with_target else [])])
        dp = dataclasses.replace(ENGINES[engine], noise_multiplier=1e-9, max_grad_norm=1.0)
        dpsgd.train(model, x, y, dp=dp, random=SecureRandom.seeded(2), lr=0.1, weight_decay=0.0)
        updates.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key in updates[0]:
        assert torch.isfinite(updates[0][key]).all()
        torch.testing.assert_close(updates[0][key], updates[1][key], rtol=1e-5, atol=1e-6)


def test_under_sample_dp_a_masked_weight_is_one_whatever_the_plan_says() -> None:
    """An attacker review's finding: with secure aggregation the masked vector carried the
    weight min(n, max_examples) / max_examples, exact, in every sum the server decrypts. A
    site under DP encodes weight 1 even when a server's plan asks for count weights."""
    from fedcore.aggregation.plans import QuantizePlan

    stages = SiteStages("site-1", SitePrivacy())
    step = 2.0**-20
    plan = (
        SampleDPPlan(1.0, 3, 1e-5, "run-w", noise_multiplier=1.0),
        QuantizePlan(clip_range=1.0, step=step, max_examples=1000, bits=32, equal_weights=False),
    )
    prepared = stages.prepare(plan, masked=True, dimension=4)
    template = {"w": np.zeros(4, np.float32)}
    encoded = stages.encode(
        prepared,
        key="k",
        update={"w": np.zeros(4, np.float32)},
        examples=500,
        metrics={},
        template=template,
        seed=1,
    )
    assert encoded.integers is not None
    assert int(encoded.integers[-1]) in (round(1 / step) - 1, round(1 / step), round(1 / step) + 1)
    assert encoded.weight == 1


def test_a_site_under_dp_answers_no_evaluation_even_on_a_held_out_split() -> None:
    """Another finding: a site with a held-out split answered EVALUATE under DP with exact
    loss, accuracy and count. A private site refuses every per-site evaluation."""
    from fedcore.engine.messages import Instruction, InstructionKind
    from fedcore.engine.site import Site
    from fedcore.tasks import SiteData, build_task

    task = build_task("breast_cancer")
    loaded = task.site_data("builtin:1/2", partition="iid", seed=0, partitions=2)
    data = SiteData(train=loaded.train, test=loaded.train)  # a held-out split (its content does not matter)
    stages = SiteStages("site-1", SitePrivacy(SitePolicy(require_dp=True)))
    site = Site(name="site-1", task=task, data=data, stages=stages)
    instruction = Instruction(InstructionKind.EVALUATE, 1, task.initial_parameters(0), {})
    reply = site.handle(instruction)
    assert reply.refusal is not None and "no per-site evaluation" in reply.refusal
    assert reply.metrics == {} and reply.num_examples == 0
