"""Differential privacy through the real round engine (`fedcore simulate`'s path): every
mode with and without secure aggregation, every epsilon in the records equal to the
accountant's, target epsilons met, nonsense combinations refused with a clear error."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore import load_experiment, run_simulation
from fedcore.aggregation.base import Aggregate, RoundInfo, StopRun
from fedcore.aggregation.distributed_noise import DistributedNoise
from fedcore.cli import main
from fedcore.config import Experiment
from fedcore.errors import ConfigError
from fedcore.privacy import distributed
from fedcore.tasks import build_task
from tests.support.opacus_reference import opacus_epsilon, pld_epsilon


def experiment(**overrides: object) -> Experiment:
    settings: dict[str, object] = {
        "federation__rounds": 3,
        "simulation__sites": 6,
        "simulation__workers": 1,
        "privacy__secure_rng": False,  # reproducible noise: tests only
        "privacy__noise_multiplier": 1.0,
        **overrides,
    }
    return load_experiment().override(**settings)


COMBINATIONS = [
    ("sample", False),
    ("sample", True),
    ("user-central", False),
    ("user-central", True),
    ("user-distributed", True),
]


@pytest.mark.parametrize(("mode", "secure"), COMBINATIONS)
def test_every_accepted_combination_runs_and_accounts_every_round(mode: str, secure: bool) -> None:
    e = experiment(privacy__mode=mode, secure_aggregation__enabled=secure)
    result, summary = run_simulation(e, None)
    epsilons = [r.epsilon for r in result.records]
    assert all(eps is not None and eps > 0 for eps in epsilons)
    assert epsilons == sorted(epsilons)  # privacy spent only grows
    assert all(r.delta == 1e-5 and r.privacy["mode"] == mode for r in result.records)
    assert result.records[-1].accuracy is not None and result.records[-1].accuracy > 0.6
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilons[-1])


def test_sites_report_the_epsilon_dp_accounting_gives_for_their_dp_sgd() -> None:
    """Every site runs the job's public mechanism (q, steps), whatever its size: its
    reported epsilon is dp-accounting's PLD for the rounds it took part in, and the run's is the
    largest site's, which the server accounts itself from the attempts it sent."""
    e = experiment(privacy__mode="sample", federation__sites_per_round=4)
    e = e.override(privacy__sample_rate=0.3, privacy__local_steps=3)
    result, _ = run_simulation(e, None)
    took_part: dict[str, int] = {}
    checked = 0
    for record in result.records:
        for site, eps in record.site_epsilon.items():
            took_part[site] = took_part.get(site, 0) + 1
            expected = pld_epsilon([(1.0, 0.3, 3 * took_part[site])], 1e-5)
            assert eps == pytest.approx(expected, rel=1e-6)
            checked += 1
        most = pld_epsilon([(1.0, 0.3, 3 * max(took_part.values()))], 1e-5)
        assert record.epsilon == pytest.approx(most, rel=1e-6)
    assert checked == 12


def test_user_central_epsilon_is_the_subsampled_gaussian_over_rounds() -> None:
    e = experiment(privacy__mode="user-central", federation__sites_per_round=3, federation__rounds=4)
    e = e.override(federation__min_sites=1)
    result, _ = run_simulation(e, None)
    for k, record in enumerate(result.records, start=1):
        assert record.privacy["sample_rate"] == 0.5
        assert record.epsilon == pytest.approx(pld_epsilon([(1.0, 0.5, k)], 1e-5), rel=1e-6)
    rdp = run_simulation(e.override(privacy__accountant="rdp"), None)[0].records
    assert rdp[-1].epsilon == pytest.approx(opacus_epsilon([(1.0, 0.5, 4)], 1e-5), rel=1e-6)
    assert rdp[-1].epsilon > result.records[-1].epsilon  # PLD is the tighter


@pytest.mark.parametrize("mode", ["sample", "user-central", "user-distributed"])
def test_a_target_epsilon_is_met_and_not_wasted(mode: str) -> None:
    e = experiment(
        privacy__mode=mode,
        privacy__noise_multiplier=None,
        privacy__target_epsilon=2.0,
        secure_aggregation__enabled=mode == "user-distributed",
    )
    result, _ = run_simulation(e, None)
    final = result.records[-1].epsilon
    assert final is not None and 1.9 <= final <= 2.0 * (1 + 1e-6)


def test_a_run_ends_early_rather_than_exceed_its_target_epsilon() -> None:
    """User-central: the plan is made for 20 sites; from round 2 only 10 are there, which
    raises q; the run stops before a round that would cross the target, and says why."""
    e = experiment(
        privacy__mode="user-central",
        privacy__noise_multiplier=None,
        privacy__target_epsilon=2.0,
        federation__rounds=6,
        simulation__sites=20,
        federation__sites_per_round=5,
    )
    from fedcore.simulation import inprocess

    available = inprocess.InProcessTransport.available
    calls = {"n": 0}

    def shrinking(self: inprocess.InProcessTransport) -> list[str]:
        calls["n"] += 1
        every = available(self)
        return every if calls["n"] <= 2 else every[:10]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inprocess.InProcessTransport, "available", shrinking)
        result, summary = run_simulation(e, None)
    assert 1 <= len(result.records) < 6
    assert all(r.epsilon is not None and r.epsilon <= 2.0 * (1 + 1e-6) for r in result.records)
    assert summary["privacy"]["epsilon"] <= 2.0 * (1 + 1e-6)
    assert "over the target 2" in summary["privacy"]["stopped_early"]


def test_distributed_dp_goes_on_with_the_sites_whose_budget_allows_a_round() -> None:
    """Dropouts lose noise, and a retried attempt whose sum was decrypted counts again: the
    sites in those sums spend more than planned. Each is left out of the rounds that would
    take it over the target, while the others go on (one unlucky round does not end the
    run), and no record nor the summary ever exceeds it."""
    e = experiment(
        privacy__mode="user-distributed",
        privacy__noise_multiplier=None,
        privacy__target_epsilon=2.0,
        federation__rounds=6,
        secure_aggregation__enabled=True,
        simulation__sites=8,
        simulation__dropout=0.3,
        federation__min_sites=3,
    )
    result, summary = run_simulation(e, None)
    assert len(result.records) == 6 and summary["privacy"]["stopped_early"] is None
    assert any(len(r.sampled) < 8 for r in result.records)  # some sites sat rounds out
    assert all(r.epsilon is not None and r.epsilon <= 2.0 * (1 + 1e-6) for r in result.records)
    assert summary["privacy"]["epsilon"] <= 2.0 * (1 + 1e-6)


def test_a_target_that_allows_no_round_ends_the_run_before_the_first(tmp_path: Path) -> None:
    """Round 1 loses noise to dropouts: its sum is never decrypted and the run ends with no
    record, an honest summary and no crash."""
    e = experiment(
        privacy__mode="user-distributed",
        privacy__noise_multiplier=None,
        privacy__target_epsilon=2.0,
        secure_aggregation__enabled=True,
        federation__rounds=1,
        simulation__sites=8,
        simulation__dropout=0.3,
        federation__min_sites=3,
    )
    result, summary = run_simulation(e, tmp_path)
    assert result.records == [] and summary["rounds"] == 0 and summary["final_accuracy"] is None
    assert summary["privacy"]["epsilon"] == 0.0
    assert "over the target 2" in summary["privacy"]["stopped_early"]


def test_distributed_dp_accounts_the_noise_lost_to_dropouts() -> None:
    base = {"privacy__mode": "user-distributed", "secure_aggregation__enabled": True, "simulation__sites": 8}
    full, _ = run_simulation(experiment(**base), None)
    lossy, _ = run_simulation(experiment(**base, simulation__dropout=0.25, federation__min_sites=3), None)
    for record in lossy.records:
        # Sites that vanish before their masked input take their noise with them; those that
        # vanish later (unmask) are in the sum, noise included.
        lost = [s for s, drop in record.dropped.items() if not drop.aggregated]
        assert record.privacy["sites_noise"] == record.sites == len(record.sampled) - len(lost)
    assert any(r.sites < len(r.sampled) for r in lossy.records)
    d = sum(a.size for a in build_task("breast_cancer").initial_parameters(0).values())
    for result in (full, lossy):
        assert result.records[-1].epsilon == pytest.approx(independent_epsilon(result.records, d), rel=1e-6)
    assert lossy.records[-1].epsilon > full.records[-1].epsilon  # less noise in the sums


def independent_epsilon(records: list[Any], dimension: int, delta: float = 1e-5) -> float:
    """The run's epsilon from what its rounds recorded, not through fedcore's accountant: a
    round whose sum holds n sites' discrete Gaussians of std sigma is a Gaussian of std
    sqrt(n) sigma on a sum of sensitivity clip x scale + sqrt(d') (d' padded to a power of two
    below 64 bits; tau ~ 0 at these sigmas), rho = Delta^2 / (2 n sigma^2); each site composes
    the rounds its update is in (rho adds up), and the run's epsilon is the largest site's, by
    Opacus's RDP accountant for one Gaussian of that rho."""
    rho: dict[str, float] = {}
    for r in records:
        p = r.privacy
        padded = dimension if p["bits"] == 64 else 1 << (dimension - 1).bit_length()
        sensitivity = p["clip_norm"] * p["scale"] + math.sqrt(padded)
        lost = {s for s, drop in r.dropped.items() if not drop.aggregated}
        contributors = [s for s in r.sampled if s not in lost]
        assert len(contributors) == p["sites_noise"]
        for site in contributors:
            rho[site] = rho.get(site, 0.0) + sensitivity**2 / (2 * p["sites_noise"] * p["sigma"] ** 2)
    return max(opacus_epsilon([(1 / math.sqrt(2 * r), 1.0, 1)], delta) for r in rho.values())


def test_adaptive_clipping_moves_the_clip_norm_towards_the_quantile() -> None:
    e = experiment(
        privacy__mode="user-central",
        privacy__adaptive_clipping=True,
        privacy__clip_norm=100.0,  # far above every update: all unclipped, so it must shrink
        federation__rounds=4,
    )
    result, _ = run_simulation(e, None)
    norms = [r.privacy["clip_norm"] for r in result.records]
    assert norms[0] == 100.0 and norms == sorted(norms, reverse=True) and norms[-1] < 80.0
    assert all(r.privacy["unclipped_fraction"] > 0.5 for r in result.records)


def test_dp_runs_are_reproducible_only_with_the_insecure_test_stream() -> None:
    e = experiment(privacy__mode="user-central")
    a, _ = run_simulation(e, None)
    b, _ = run_simulation(e, None)
    assert [r.accuracy for r in a.records] == [r.accuracy for r in b.records]
    secure = e.override(privacy__secure_rng=True)
    c, _ = run_simulation(secure, None)
    d, _ = run_simulation(secure, None)
    assert [r.loss for r in c.records] != [r.loss for r in d.records]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy__mode": "user-distributed"}, "secure_aggregation"),
        ({"privacy__mode": "user-central", "privacy__ghost_clipping": True}, "ghost_clipping"),
        (
            {
                "privacy__mode": "user-central",
                "privacy__adaptive_clipping": True,
                "secure_aggregation__enabled": True,
            },
            "adaptive_clipping",
        ),
        ({"privacy__mode": "sample", "privacy__target_epsilon": 1.0}, "exactly one"),
        ({"privacy__mode": "sample", "privacy__noise_multiplier": None}, "exactly one"),
        ({"privacy__mode": "laplace"}, "privacy mode"),
        ({"privacy__mode": "sample", "privacy__delta": 2.0}, "delta"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        experiment(**overrides)


def test_a_task_without_dp_sgd_is_refused_for_sample_level_dp() -> None:
    from fedcore.simulation.run import check_simulation

    with pytest.raises(ConfigError, match="DP-SGD"):
        check_simulation(experiment(privacy__mode="sample", task__name="bench:1000"))


def test_simulate_prints_a_privacy_summary_and_plots_epsilon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--rounds",
            "2",
            "--sites",
            "4",
            "--workers",
            "1",
            "--privacy",
            "user-central",
            "--target-epsilon",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "privacy: mode user-central, epsilon" in printed and "delta 1e-05" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epsilon"] is not None for row in rows] == [True, True]
    assert json.loads((out / "summary.json").read_text())["privacy"]["epsilon"] == pytest.approx(
        rows[-1]["epsilon"]
    )
    assert (out / "report.png").stat().st_size > 10_000


def test_user_central_rounds_complete_whoever_is_sampled_and_release_no_training_statistics() -> None:
    """Poisson sampling of 1 expected site in 6: some rounds sample none or one. They still
    complete (noise only, fixed denominator) instead of being redrawn, which would change the
    sampling the accountant assumes; with secure aggregation too."""
    for secure in (False, True):
        e = experiment(
            privacy__mode="user-central",
            federation__sites_per_round=1,
            federation__min_sites=1,
            federation__rounds=8,
            secure_aggregation__enabled=secure,
        )
        result, _ = run_simulation(e, None)
        assert [r.attempt for r in result.records] == [1] * 8
        assert any(len(r.sampled) < 2 for r in result.records)
        assert all(r.train_loss is None and "train_loss" not in r.fit_metrics for r in result.records)
        assert result.records[-1].epsilon == pytest.approx(pld_epsilon([(1.0, 1 / 6, 8)], 1e-5), rel=1e-6)


def test_a_decrypted_distributed_sum_is_accounted_even_when_the_round_is_retried() -> None:
    e = experiment(
        privacy__mode="user-distributed",
        secure_aggregation__enabled=True,
        simulation__sites=7,
        simulation__dropout=0.3,
        federation__min_sites=7,  # any dropout before the masked input fails the attempt
        federation__max_round_retries=20,
    )
    result, summary = run_simulation(e, None)
    completed = distributed.epsilon([r.privacy["rho"] for r in result.records], 1e-5)
    assert any(r.attempt > 1 for r in result.records)
    assert summary["privacy"]["epsilon"] > completed  # the failed attempts' sums cost privacy too


def test_the_per_site_log_says_who_took_part_and_what_each_site_spent(tmp_path: Path) -> None:
    e = experiment(privacy__mode="sample", federation__sites_per_round=4)
    result, _ = run_simulation(e, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "sites.jsonl").read_text().splitlines()]
    assert len(rows) == sum(len(r.sampled) for r in result.records) == 12
    for row in rows:
        record = result.records[row["round"] - 1]
        assert row["aggregated"] == (row["site"] not in record.dropped)
        assert row["epsilon"] == record.site_epsilon[row["site"]] and row["delta"] == 1e-5


def test_retried_rounds_never_take_a_sample_level_run_past_its_target() -> None:
    """The review's case: 6 sites, all needed, 30% dropout, many retries. Every attempt a
    site was sent costs it a round; the server stops the run before an attempt that could
    take a site past the target, and the sites' own epsilons (by their ledgers) stay within."""
    e = experiment(
        task__name="breast_cancer",
        privacy__mode="sample",
        privacy__noise_multiplier=None,
        privacy__target_epsilon=2.0,
        federation__rounds=3,
        federation__min_sites=6,
        federation__max_round_retries=20,
        simulation__dropout=0.3,
    )
    result, summary = run_simulation(e, None)
    assert summary["privacy"]["epsilon"] <= 2.0 * (1 + 1e-6)
    assert all(eps <= 2.0 * (1 + 1e-6) for eps in summary["privacy"]["site_epsilon"].values())
    assert summary["privacy"]["stopped_early"], "retries should have used up the target"
    assert len(result.records) < 3


def test_a_site_refuses_a_round_past_the_jobs_target_whatever_the_server_asks() -> None:
    """A server that ignores the target (asks again and again): the site's own ledger
    refuses the round that would take this run past it; the refusal names the target."""
    from fedcore.errors import PrivacyBudgetError
    from fedcore.privacy.site_policy import SitePrivacy

    site = SitePrivacy()
    job = {
        "noise_multiplier": None,
        "target_epsilon": 2.0,
        "rounds": 3,
        "max_grad_norm": 1.0,
        "sample_rate": 0.5,
        "local_steps": 2,
        "ghost_clipping": False,
        "delta": 1e-5,
        "run": "run-t",
    }
    for _ in range(3):
        site.spend(site.plan_dp_sgd(**job))
    assert site.ledger.spent("run-t") <= 2.0 * (1 + 1e-6)
    with pytest.raises(PrivacyBudgetError, match="target"):
        site.plan_dp_sgd(**job)
    site.plan_dp_sgd(**{**job, "run": "run-u"})  # another run has its own target


@pytest.mark.parametrize(
    ("mode", "secure", "unit", "adjacency"),
    [
        ("sample", False, "example", "add-remove"),
        ("user-central", False, "site", "add-remove"),
        ("user-distributed", True, "site", "zero-out"),
    ],
)
def test_every_epsilon_says_what_it_is(mode: str, secure: bool, unit: str, adjacency: str) -> None:
    """Beside each epsilon: delta, unit, neighbours and accountant, in every round's record
    and the summary; the add-remove modes also give the replace-one figure, which is larger."""
    e = experiment(privacy__mode=mode, secure_aggregation__enabled=secure, federation__rounds=2)
    result, summary = run_simulation(e, None)
    labels = {"unit": unit, "adjacency": adjacency}
    for record in result.records:
        assert {k: record.privacy[k] for k in labels} == labels and record.delta == 1e-5
    privacy = summary["privacy"]
    assert {k: privacy[k] for k in labels} == labels
    assert privacy["accountant"] == ("zcdp" if mode == "user-distributed" else "pld")
    if adjacency == "add-remove":
        assert privacy["epsilon_replace_one"] > privacy["epsilon"]
    else:
        assert privacy["epsilon_replace_one"] is None


def test_a_run_planned_for_replace_one_neighbours_meets_its_target_for_them() -> None:
    e = experiment(
        privacy__mode="sample",
        privacy__noise_multiplier=None,
        privacy__target_epsilon=3.0,
        privacy__adjacency="replace-one",
    )
    result, summary = run_simulation(e, None)
    planned = summary["privacy"]["noise_multiplier"]
    assert summary["privacy"]["adjacency"] == "replace-one" and len(result.records) == 3
    # more noise than the same target for add-remove neighbours needs
    other = run_simulation(e.override(privacy__adjacency="add-remove"), None)[1]["privacy"]
    assert planned > other["noise_multiplier"]
    assert (
        pld_epsilon([(planned, 1.0, 3)], 1e-5, replace=True)
        <= 3.0
        < pld_epsilon([(planned * 0.99, 1.0, 3)], 1e-5, replace=True)
    )


def test_digits_at_epsilon_3_learns_with_nothing_but_the_target_set() -> None:
    """The README's private run, with reproducible noise: the task's private defaults (a
    linear model, full-batch steps, averaged models) give a useful model at epsilon 3
    (simulations/dp_utility.py measures the mean of runs with secure noise)."""
    e = load_experiment().override(
        task__name="digits",
        simulation__sites=10,
        federation__rounds=30,
        privacy__mode="sample",
        privacy__target_epsilon=3.0,
        privacy__secure_rng=False,
    )
    result, summary = run_simulation(e, None)
    assert summary["privacy"]["epsilon"] <= 3.0 * (1 + 1e-6)
    assert result.records[-1].accuracy is not None and result.records[-1].accuracy >= 0.85


def test_a_statistics_release_is_counted_once_in_a_sites_target_check() -> None:
    """An attacker review's finding: the site counted the statistics release both from its
    ledger and as the plan's prior, so it refused the job's last round. Every planned round
    fits, and the run ends within its target."""
    from fedcore.privacy.site_policy import SitePrivacy

    site = SitePrivacy()
    site.spend(site.plan_statistics(noise_multiplier=10.0, delta=1e-5, run="run-s"))
    job = {
        "noise_multiplier": None,
        "target_epsilon": 2.0,
        "rounds": 5,
        "max_grad_norm": 1.0,
        "sample_rate": 1.0,
        "local_steps": 1,
        "ghost_clipping": False,
        "delta": 1e-5,
        "run": "run-s",
        "statistics_noise": 10.0,
    }
    for _ in range(5):
        site.spend(site.plan_dp_sgd(**job))
    assert site.ledger.spent("run-s") <= 2.0 * (1 + 1e-6)


def test_the_server_accounts_every_statistics_release_the_sites_paid_for() -> None:
    """An attacker review's finding: a statistics exchange retried after its sum was
    obtained is paid for again by the sites; the server's epsilon counts every release."""
    from fedcore.aggregation import RoundInfo
    from fedcore.aggregation.sample_dp import SampleLevelDP
    from fedcore.config import Accountant

    e = experiment(privacy__mode="sample")  # noise multiplier 1, q 1, one step a round
    stage = SampleLevelDP(e.privacy, rounds=3, seed=0, releases_statistics=True)
    stage.statistics_released()
    stage.statistics_released()  # a retried exchange: released twice
    info = RoundInfo("run", 1, 1, ("a", "b"), 2, {}, 0)
    stage.check_round(info)
    z, stats = e.privacy.noise_multiplier, e.privacy.statistics_noise_multiplier
    expected = pld_epsilon([(stats, 1.0, 2), (z, 1.0, 1)], 1e-5)
    assert stage.epsilon() == pytest.approx(expected, rel=1e-6)
    assert e.privacy.accountant is Accountant.PLD


def test_distributed_dp_accounts_each_site_for_its_own_rounds_and_spreads_them() -> None:
    """12 sites, 3 a round, 8 rounds, target 2: the server knows who took part (no
    amplification), so each site is accounted for the rounds its update is in: at most
    K = ceil(8 x 3 / 12) = 2 each, with the noise planned for 2 rounds (Opacus: epsilon 2),
    not for all 8. The run's epsilon is the largest site's, from the records independently."""
    e = experiment(
        task__name="breast_cancer",
        privacy__mode="user-distributed",
        privacy__noise_multiplier=None,
        privacy__target_epsilon=2.0,
        secure_aggregation__enabled=True,
        simulation__sites=12,
        federation__sites_per_round=3,
        federation__min_sites=3,
        federation__rounds=8,
    )
    result, summary = run_simulation(e, None)
    assert len(result.records) == 8 and summary["privacy"]["stopped_early"] is None
    taken = Counter(s for r in result.records for s in r.sampled)
    assert set(taken) == {f"site-{k}" for k in range(1, 13)} and set(taken.values()) == {2}
    z = summary["privacy"]["noise_multiplier"]
    assert opacus_epsilon([(z, 1.0, 2)], 1e-5) == pytest.approx(2.0, rel=1e-3)
    d = sum(a.size for a in build_task("breast_cancer").initial_parameters(0).values())
    assert summary["privacy"]["epsilon"] == pytest.approx(independent_epsilon(result.records, d), rel=1e-6)
    assert summary["privacy"]["epsilon"] <= 2.0 * (1 + 1e-6)
    assert summary["privacy"]["rounds_per_site"] == summary["privacy"]["most_rounds_taken"] == 2


def test_distributed_dp_ends_the_run_when_no_three_sites_have_rounds_left() -> None:
    """4 sites, 3 a round, 4 rounds: K = 3 each fills the 12 places; a fifth round finds
    no site with a round left within the target and ends the run instead of exceeding it."""
    config = experiment(
        privacy__mode="user-distributed",
        privacy__noise_multiplier=None,
        privacy__target_epsilon=3.0,
        secure_aggregation__enabled=True,
    ).privacy
    stage = DistributedNoise(config, rounds=4, seed=0, bits=20, sites_per_round=3)
    sites = [f"site-{k}" for k in range(4)]
    model = {"w": np.zeros(31)}
    for number in range(1, 5):
        info = RoundInfo("run", number, 1, (), 4, model, 0)
        info = dataclasses.replace(info, sampled=tuple(stage.sample(sites, info)))
        stage.check_round(info)
        stage.account_round(Aggregate(None, 1.0, 3, list(info.sampled)), info)
    assert {s: stage.taken_part(s) for s in sites} == dict.fromkeys(sites, 3)
    assert stage.epsilon() == pytest.approx(3.0, rel=1e-3)
    info = RoundInfo("run", 5, 1, (), 4, model, 0)
    assert stage.sample(sites, info) == []
    with pytest.raises(StopRun, match="0 site\\(s\\) have rounds left"):
        stage.check_round(info)


def test_a_distributed_run_saved_by_the_per_round_accounting_is_not_resumed_silently() -> None:
    config = experiment(privacy__mode="user-distributed", secure_aggregation__enabled=True).privacy
    stage = DistributedNoise(config, rounds=4, seed=0, bits=20)
    old = {**stage.state_dict(), "rhos": [0.1, 0.2]}  # one list for the run: whose rounds?
    with pytest.raises(ConfigError, match="older fedcore"):
        stage.load_state_dict(old)
    stage.rhos = {"site-1": [0.1]}
    fresh = DistributedNoise(config, rounds=4, seed=0, bits=20)
    fresh.load_state_dict(stage.state_dict())
    assert fresh.rhos == {"site-1": [0.1]}
