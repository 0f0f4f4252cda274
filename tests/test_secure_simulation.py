"""SecAgg+ inside the round: `fedcore simulate --secure-aggregation` gives the plain
FedAvg model (up to quantization), survives dropouts during the masked-input stage, works
across forked workers (a site's protocol state is kept between instructions)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from fedcore import load_experiment, run_simulation
from fedcore.config import Experiment


def experiment(**overrides: object) -> Experiment:
    settings: dict[str, object] = {
        "federation__rounds": 4,
        "simulation__sites": 6,
        "simulation__workers": 1,
        **overrides,
    }
    return load_experiment().override(**settings)


def test_the_secure_model_is_the_plain_model() -> None:
    """Exactly at 64 bits; at 32 bits up to the precision the masked weights cost (each
    site's weight is its count over the public bound: no count leaves it)."""
    plain, _ = run_simulation(experiment(), None)
    secure, _ = run_simulation(experiment(secure_aggregation__enabled=True), None)
    exact, _ = run_simulation(experiment(secure_aggregation__enabled=True, secure_aggregation__bits=64), None)
    for name, value in plain.parameters.items():
        np.testing.assert_allclose(exact.parameters[name], value, atol=1e-6)
        np.testing.assert_allclose(secure.parameters[name], value, atol=2e-3)
    assert abs(secure.records[-1].accuracy - plain.records[-1].accuracy) <= 0.01
    record = secure.records[-1]
    assert record.secure_aggregation["masked"] == 6
    assert set(record.secure_aggregation["stages"]) == {
        "advertise",
        "reveal",
        "share_keys",
        "masked_input",
        "consistency",
        "unmask",
    }


@pytest.mark.slow
def test_dropouts_at_every_secagg_stage_never_give_a_wrong_sum() -> None:
    """Sites vanish at all four stages (seeded), across worker processes. Every bench site
    moves each weight by exactly 0.01, so any wrong sum shows in the model: after R
    rounds it must be 0.01 R, whoever survived."""
    rounds = 8
    e = experiment(
        task__name="bench:2000",
        simulation__sites=12,
        simulation__dropout=0.3,
        simulation__workers=2,
        federation__rounds=rounds,
        federation__min_sites=3,
        federation__max_round_retries=10,
        secure_aggregation__enabled=True,
        federation__max_examples_per_site=1,  # the public bound on a bench site's count: weight 1
    )
    result, _ = run_simulation(e, None)
    stages = {drop.exchange for r in result.records for drop in r.dropped.values()}
    assert stages == {"advertise", "share_keys", "masked_input", "unmask"}  # simulated dropouts
    assert sum(r.secure_aggregation["recovered"] for r in result.records) > 0
    for r in result.records:
        lost = {s for s, drop in r.dropped.items() if not drop.aggregated}
        assert r.sites == r.secure_aggregation["masked"] == len(r.sampled) - len(lost)
    np.testing.assert_allclose(result.parameters["w"], 0.01 * rounds, atol=1e-6)


def test_the_fedopt_family_runs_on_the_secure_sum() -> None:
    result, _ = run_simulation(experiment(strategy__name="fedadam", secure_aggregation__enabled=True), None)
    assert all(r.sites == 6 for r in result.records)


def masked_lies(
    monkeypatch: pytest.MonkeyPatch, tamper: Callable[[np.ndarray, float, float, int], None]
) -> list[int]:
    """Every site's quantized contribution edited by `tamper(out, step, clip, call)` before it
    is masked (`call` counts contributions from 1); the list of calls made."""
    from fedcore.aggregation import site as site_stages

    honest = site_stages.quantized_contribution
    calls: list[int] = []

    def lying(update, template, *, weight, clip, step, bits, rng):  # type: ignore[no-untyped-def]
        out = honest(update, template, weight=weight, clip=clip, step=step, bits=bits, rng=rng)
        calls.append(1)
        tamper(out, step, clip, len(calls))
        return out

    monkeypatch.setattr(site_stages, "quantized_contribution", lying)
    return calls


@pytest.mark.parametrize("lie", ["negative weight", "oversized update"])
def test_a_masked_input_out_of_range_fails_the_attempt_never_the_run(
    lie: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One site's first masked input lies (no single input can be checked under the mask):
    the decoded sum is out of the honest bounds, so that attempt is discarded, retried, and
    the run's model is exact; nothing raises."""

    def tamper(out: np.ndarray, step: float, clip: float, call: int) -> None:
        if call == 1:  # lies in the integers, as a hostile site would, modulo 2**bits
            if lie == "negative weight":
                out[-1:] -= np.uint32(round(4 / step))  # w = 0.5 - 4: the sum of weights < 0
            else:
                out[:-1] += np.uint32(round(3 * clip / step))  # 6x its bound, w x <= 0.5 clip

    calls = masked_lies(monkeypatch, tamper)
    e = experiment(
        task__name="bench:100",
        simulation__sites=5,
        federation__rounds=2,
        secure_aggregation__enabled=True,
        federation__max_examples_per_site=2,  # each bench site (1 example) weighs 0.5
        secure_aggregation__clip_range=1.0,
    )
    result, _ = run_simulation(e, None)
    assert calls, "the lie was not told"
    assert [r.attempt for r in result.records] == [2, 1]
    np.testing.assert_allclose(result.parameters["w"], 0.02, atol=1e-6)


def test_a_site_that_lies_in_every_attempt_skips_rounds_but_cannot_stop_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A site sends a negative weight in every masked input of round 1 (its lie cannot be
    pinned on it under the mask): every attempt's sum is rejected, the round is skipped with
    the model unchanged, and round 2, where it tells the truth, proceeds from that model."""

    def tamper(out: np.ndarray, step: float, clip: float, call: int) -> None:
        if call <= 15 and call % 5 == 1:  # one of five in each of round 1's attempts
            out[-1:] -= np.uint32(round(4 / step))  # w = 0.5 - 4

    masked_lies(monkeypatch, tamper)
    e = experiment(
        task__name="bench:100",
        simulation__sites=5,
        federation__rounds=2,
        federation__max_round_retries=2,
        secure_aggregation__enabled=True,
        federation__max_examples_per_site=2,
        secure_aggregation__clip_range=1.0,
    )
    result, summary = run_simulation(e, None)
    first, second = result.records
    assert first.skipped is not None and "weights" in first.skipped
    assert not any(c.isdigit() for c in first.skipped.replace("(0, count]", ""))  # no figure of the sum
    assert summary["skipped_rounds"] == [1]
    assert (first.attempt, first.sites, first.examples) == (3, 0, 0)
    assert second.skipped is None and second.sites == 5
    np.testing.assert_allclose(result.parameters["w"], 0.01, atol=1e-6)  # one round's step


def test_a_site_that_garbles_its_shares_is_named_and_excluded_for_the_rest_of_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """site-2 sends its neighbours shares that cannot be decrypted, every attempt: they
    complain, its secrets cannot be rebuilt, and the abort names it. The retry and every
    later round leave it out; the model is the other sites' exact mean."""
    from fedcore.secagg.client import SecAggClient
    from fedcore.secagg.stages.messages import ShareKeys

    honest_step = SecAggClient.step

    def step(self: SecAggClient, message: object, round_number: int) -> object:
        reply = honest_step(self, message, round_number)
        if self.site == "site-2" and isinstance(reply, ShareKeys):
            garbage = {peer: bytes(len(c)) for peer, c in reply.ciphertexts.items()}
            reply = dataclasses.replace(reply, ciphertexts=garbage)
        return reply

    monkeypatch.setattr(SecAggClient, "step", step)
    e = experiment(
        task__name="bench:100",
        simulation__sites=6,
        federation__min_sites=3,
        federation__rounds=3,
        secure_aggregation__enabled=True,
        federation__max_examples_per_site=1,
    )
    result, _ = run_simulation(e, None)
    first = result.records[0]
    assert first.attempt == 2 and "site-2" not in first.sampled
    assert all("site-2" not in r.sampled and r.sites == 5 for r in result.records)
    np.testing.assert_allclose(result.parameters["w"], 0.03, atol=1e-6)


@pytest.mark.parametrize("bits", [None, 64])  # the default 20 (rotated, wrapping) and plain integers
def test_under_distributed_dp_a_sum_beyond_the_clip_and_noise_fails_the_attempt(
    monkeypatch: pytest.MonkeyPatch, bits: int | None
) -> None:
    """One site adds 2**18 to every integer of its first encoding (distributed DP's integers
    are summed masked, unchecked; modulo 2**20 a lie is at most 2**19 a coordinate): the
    decoded sum's norm exceeds what clipped updates and their noise can reach, the attempt
    is discarded and retried; the model stays within the noise."""
    from fedcore.aggregation import site as site_stages

    honest = site_stages.SiteStages.encode
    lies: list[str] = []

    def encode(self, prepared, **kw):  # type: ignore[no-untyped-def]
        made = honest(self, prepared, **kw)
        if self.secagg.site == "site-2" and made.integers is not None and not lies:
            lies.append("told")
            made.integers[:-1] += made.integers.dtype.type(2**18)
        return made

    monkeypatch.setattr(site_stages.SiteStages, "encode", encode)
    e = experiment(
        task__name="bench:10",
        simulation__sites=4,
        federation__rounds=1,
        secure_aggregation__enabled=True,
        privacy__mode="user-distributed",
        privacy__noise_multiplier=0.5,
        privacy__clip_norm=1.0,
        secure_aggregation__bits=bits,
    )
    result, _ = run_simulation(e, None)
    assert lies and [r.attempt for r in result.records] == [2]
    assert np.abs(result.parameters["w"]).max() < 5.0  # within clip and noise, not 2**18 / scale
