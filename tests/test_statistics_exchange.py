"""The statistics exchange at a site, against the mechanism that ran and against a dishonest
server: under sample-level DP the released vector carries Gaussian noise of the charged
multiplier x the task's per-record sensitivity, and the site's epsilon is that of one
Gaussian release (checked against the exact analytic curve, Balle & Wang 2018); a server
cannot get statistics out under a plan that claims privacy without noise, without the noise a
protective site requires, past a site's budget, or from a task with no per-record bound."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from fedcore.aggregation import SiteStages
from fedcore.aggregation.plans import SampleDPPlan, StatisticsNoisePlan, StatisticsScalePlan
from fedcore.engine import Instruction, InstructionKind, Site
from fedcore.engine.statistics import statistics_config
from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.site_policy import SitePolicy, SitePrivacy
from fedcore.tasks import build_task
from fedcore.tasks.tabular import Tabular
from tests.support.wine import write_wine_csv

RUN, DELTA = "run-1", 1e-5


@pytest.fixture(scope="module")
def wine_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wine_csv(tmp_path_factory.mktemp("wine") / "wine.csv")


def site(wine_csv: Path, policy: SitePolicy | None = None, *, ranges: bool = True) -> tuple[Site, Tabular]:
    task = build_task("tabular")
    assert isinstance(task, Tabular)
    task.configure({"data": str(wine_csv), "label": "target"})
    if not ranges:
        assert task.schema is not None
        task.schema = type(task.schema)(task.schema.label, task.schema.classes, task.schema.columns)
    data = task.site_data(str(wine_csv), partition="iid", seed=0, partitions=1)
    privacy = SitePrivacy(policy or SitePolicy(allow_insecure_rng=True))
    return Site(name="s", task=task, data=data, stages=SiteStages("s", privacy, remembers=False)), task


def ask(
    target: Site, *plan: object, seed: int = 0, kind: InstructionKind = InstructionKind.STATISTICS
) -> object:
    return target.handle(Instruction(kind, 0, {}, {"seed": seed}, 1, None, tuple(plan), "fit"))  # type: ignore[arg-type]


def analytic_gaussian_epsilon(z: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release with noise multiplier z at `delta`."""

    def delta_of(eps: float) -> float:
        return float(norm.cdf(1 / (2 * z) - eps * z) - math.exp(eps) * norm.cdf(-1 / (2 * z) - eps * z))

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def test_the_released_statistics_carry_the_noise_the_site_charged(wine_csv: Path) -> None:
    z = 2.0
    target, task = site(wine_csv)
    truth = task.statistics(target.data.train)
    sensitivity = task.statistics_sensitivity()
    assert sensitivity == pytest.approx(math.sqrt(3 * 13))
    residuals = []
    for seed in range(60):
        reply = ask(target, StatisticsNoisePlan(z, DELTA, f"{RUN}-{seed}", secure_rng=False), seed=seed)
        assert reply.refusal is None and reply.update is not None  # type: ignore[attr-defined]
        residuals.append(reply.update["statistics"] - truth)  # type: ignore[attr-defined]
    spread = float(np.std(np.concatenate(residuals)))
    assert spread == pytest.approx(z * sensitivity, rel=0.05)
    # Each release is one Gaussian mechanism in the ledger, and its epsilon bounds the exact one.
    ledger = target.stages.privacy.ledger
    assert ledger.runs[f"{RUN}-0"] == [Mechanism(z, 1.0, 1)]
    reported = reply.metrics["epsilon"]  # type: ignore[attr-defined]
    exact = analytic_gaussian_epsilon(z, DELTA)
    assert exact <= reported <= 1.3 * exact


def test_a_plan_that_claims_privacy_without_statistics_noise_is_refused(wine_csv: Path) -> None:
    """A DP-SGD item protects training, not a statistics vector: sent with one, the exact
    statistics would leave a site believing itself private. Nothing leaves; nothing is charged."""
    target, _ = site(wine_csv, SitePolicy(require_dp=True))
    dp_sgd = SampleDPPlan(max_grad_norm=1.0, rounds=1, delta=DELTA, run=RUN, noise_multiplier=1.0)
    reply = ask(target, dp_sgd)
    assert reply.refusal is not None and reply.update is None  # type: ignore[attr-defined]
    assert target.stages.privacy.ledger.runs == {}


def test_a_protective_site_refuses_statistics_without_noise(wine_csv: Path) -> None:
    target, _ = site(wine_csv, SitePolicy(require_dp=True))
    reply = ask(target)
    assert reply.refusal is not None and "privacy policy" in reply.refusal  # type: ignore[attr-defined]
    assert ask(target, StatisticsScalePlan(1000.0)).refusal is not None  # type: ignore[attr-defined]


def test_repeated_statistics_requests_are_each_charged_until_the_budget_refuses(wine_csv: Path) -> None:
    target, _ = site(wine_csv, SitePolicy(max_epsilon=3.0))
    replies = [ask(target, StatisticsNoisePlan(3.0, DELTA, RUN), seed=s) for s in range(10)]
    served = [r for r in replies if r.refusal is None]  # type: ignore[attr-defined]
    assert 1 <= len(served) < 10
    assert target.stages.privacy.ledger.runs[RUN] == [Mechanism(3.0, 1.0, 1)] * len(served)
    assert target.stages.privacy.ledger.spent() <= 3.0


def test_the_site_floor_raises_the_statistics_noise(wine_csv: Path) -> None:
    target, _ = site(wine_csv, SitePolicy(min_noise_multiplier=5.0, allow_insecure_rng=True))
    reply = ask(target, StatisticsNoisePlan(0.1, DELTA, RUN))
    assert reply.refusal is None and reply.metrics["noise_multiplier"] == 5.0  # type: ignore[attr-defined]


def test_statistics_without_a_per_record_bound_are_not_released_with_noise(wine_csv: Path) -> None:
    target, _ = site(wine_csv, ranges=False)
    reply = ask(target, StatisticsNoisePlan(2.0, DELTA, RUN))
    assert reply.refusal is not None and "no per-record bound" in reply.refusal  # type: ignore[attr-defined]


def test_a_fit_cannot_carry_a_statistics_item(wine_csv: Path) -> None:
    target, task = site(wine_csv)
    task.use_statistics(task.statistics(target.data.train))
    config = {"local_epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 0}
    fit = Instruction(
        InstructionKind.FIT,
        1,
        task.initial_parameters(0),
        config,
        1,
        None,
        (StatisticsScalePlan(1e6),),
        "fit",
    )
    assert target.handle(fit).refusal is not None


def test_every_instruction_after_the_exchange_carries_the_statistics(wine_csv: Path) -> None:
    """A site built afresh (a virtual site, a reconnecting agent) standardises from the sum
    that rides with the instruction, not from anything it remembers."""
    target, task = site(wine_csv)
    total = task.statistics(target.data.train) * 2.0
    evaluate = Instruction(
        InstructionKind.EVALUATE, 1, task.initial_parameters(0), statistics_config(total), exchange="evaluate"
    )
    assert target.handle(evaluate).refusal is None
    fresh = build_task("tabular")
    assert isinstance(fresh, Tabular)
    fresh.configure({"data": str(wine_csv), "label": "target"})
    fresh.use_statistics(total)
    assert task.centre is not None and fresh.centre is not None
    np.testing.assert_array_equal(task.centre, fresh.centre)


def test_an_encoding_before_the_noise_is_refused(wine_csv: Path) -> None:
    """Quantized before the noise, the masked integers would carry the exact statistics
    while the site is charged for noise: the integer encoding must be the plan's last item."""
    from fedcore.aggregation.plans import QuantizePlan

    target, _ = site(wine_csv, SitePolicy(require_dp=True))
    reordered = (QuantizePlan(1e6, 1e-6, 1, 64, True), StatisticsNoisePlan(10.0, DELTA, RUN))
    reply = target.handle(
        Instruction(InstructionKind.STATISTICS, 0, {}, {"seed": 0}, 1, object(), reordered, "masked_input")
    )
    assert reply.refusal is not None and "last item" in reply.refusal
    assert target.stages.privacy.ledger.runs == {}  # refused before anything was charged


def test_after_dp_a_site_releases_nothing_without_it(wine_csv: Path) -> None:
    target, task = site(wine_csv)
    assert ask(target, StatisticsNoisePlan(2.0, DELTA, RUN)).refusal is None  # type: ignore[attr-defined]
    again = ask(target)  # the same run, now without noise
    assert again.refusal is not None and "trained under differential privacy" in again.refusal  # type: ignore[attr-defined]
    task.use_statistics(task.statistics(target.data.train))
    config = {"local_epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 0}
    fit = Instruction(InstructionKind.FIT, 1, task.initial_parameters(0), config, 1, None, (), "fit")
    assert target.handle(fit).refusal is not None


def test_statistics_come_once_before_round_1(wine_csv: Path) -> None:
    target, _ = site(wine_csv)
    later = Instruction(InstructionKind.STATISTICS, 3, {}, {"seed": 0}, 1, None, (), "fit")
    assert target.handle(later).refusal is not None


def test_a_lying_sites_plain_statistics_cannot_overflow_the_sum() -> None:
    from fedcore.aggregation import SiteReply
    from fedcore.aggregation.statistics import StatisticsCheck
    from fedcore.errors import ProtocolError

    check, info = StatisticsCheck(), None
    with pytest.raises(ProtocolError):
        check.admit(SiteReply("liar", {"statistics": np.array([1.0, 2.0])}, weight=1e9), info)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        check.admit(SiteReply("liar", {"statistics": np.array([1e300, 2.0])}, weight=1.0), info)  # type: ignore[arg-type]
    fine = SiteReply("ok", {"statistics": np.array([47.0, 20.5, 9.8])}, weight=1.0)
    assert check.admit(fine, info) is fine  # type: ignore[arg-type]


def test_the_server_cannot_name_a_file_on_the_site() -> None:
    from fedcore.tasks.base import job_from_config

    job = job_from_config(
        {"job.data": "/home/site/cohort.csv", "job.features": "[]", "job.label": "y", "seed": 1}
    )
    assert job == {"label": "y"}


@pytest.mark.parametrize("categories", [{"colour": ()}, {"colour": ("red", "red")}, {"colour": ("red", "")}])
def test_category_lists_must_be_distinct_non_empty_names(categories: dict[str, tuple[str, ...]]) -> None:
    """A server-chosen empty or repeated list would shift every later column: a raw sum
    would be released where a clipped count belongs."""
    from fedcore.tasks.table_files import TableSchema

    with pytest.raises(ValueError, match="categories"):
        TableSchema("y", ("0", "1"), ("colour", "size"), categories=categories)
