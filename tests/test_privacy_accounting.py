"""Every epsilon equals its accountant's, called directly (Opacus's RDP, dp-accounting's
PLD) and, without subsampling, the Gaussian mechanism's exact curve; the ledger survives
restarts and damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.config import Accountant, Adjacency
from fedcore.errors import ConfigError
from fedcore.privacy.accountant import Mechanism, epsilon, noise_for
from fedcore.privacy.ledger import PrivacyLedger
from tests.support.opacus_reference import gaussian_epsilon, opacus_epsilon, pld_epsilon


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.5, 5.0), st.floats(1e-4, 1.0), st.integers(1, 5000)),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from([1e-5, 1e-6, 1e-3]),
)
def test_epsilon_equals_opacus_rdp_accountant(history: list[tuple[float, float, int]], delta: float) -> None:
    ours = epsilon([Mechanism(*m) for m in history], delta, Accountant.RDP)
    assert ours == pytest.approx(opacus_epsilon(history, delta), rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.6, 5.0), st.floats(1e-3, 1.0), st.integers(1, 500)),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from([1e-5, 1e-3]),
    st.booleans(),
)
def test_epsilon_equals_dp_accountings_pld_accountant(
    history: list[tuple[float, float, int]], delta: float, replace: bool
) -> None:
    """fedcore groups equal mechanisms; the reference composes event by event: at the same
    discretisation they agree to 1e-6."""
    adjacency = Adjacency.REPLACE_ONE if replace else Adjacency.ADD_REMOVE
    ours = epsilon([Mechanism(*m) for m in history], delta, Accountant.PLD, adjacency)
    assert ours == pytest.approx(pld_epsilon(history, delta, replace=replace), rel=1e-6)


@pytest.mark.parametrize("history", [[(1.0, 0.1, 300)], [(0.8, 0.02, 1000), (2.0, 1.0, 3)]])
def test_the_pld_discretisation_is_pessimistic_and_close(history: list[tuple[float, float, int]]) -> None:
    """A ten times finer discretisation gives at most fedcore's epsilon, within 1% of it."""
    ours = epsilon([Mechanism(*m) for m in history], 1e-5, Accountant.PLD)
    finer = pld_epsilon(history, 1e-5, interval=1e-4)
    assert finer <= ours * (1 + 1e-9) and ours <= finer * 1.01


@pytest.mark.parametrize(("z", "steps"), [(0.5, 1), (1.0, 1), (2.0, 30), (5.0, 300)])
def test_without_subsampling_every_accountant_bounds_the_exact_gaussian_curve(z: float, steps: int) -> None:
    """The review's distributed-round figure (z = 0.5 per example: 10.73 by RDP) and more:
    the exact epsilon <= PLD <= RDP, PLD within its discretisation of the exact one; and
    replace-one is the Gaussian mechanism at half the multiplier."""
    exact = gaussian_epsilon(z, steps, 1e-5)
    pld = epsilon([Mechanism(z, 1.0, steps)], 1e-5, Accountant.PLD)
    rdp = epsilon([Mechanism(z, 1.0, steps)], 1e-5, Accountant.RDP)
    assert exact <= pld <= rdp and pld <= exact + 0.02
    replaced = epsilon([Mechanism(z, 1.0, steps)], 1e-5, Accountant.PLD, Adjacency.REPLACE_ONE)
    assert replaced == pytest.approx(gaussian_epsilon(z / 2, steps, 1e-5), abs=0.03)
    assert epsilon([Mechanism(z, 1.0, steps)], 1e-5, Accountant.RDP, Adjacency.REPLACE_ONE) == pytest.approx(
        opacus_epsilon([(z / 2, 1.0, steps)], 1e-5), rel=1e-9
    )


@pytest.mark.parametrize("accountant", list(Accountant))
def test_noise_for_a_target_epsilon_meets_it(accountant: Accountant) -> None:
    sigma = noise_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000, accountant=accountant)
    assert epsilon([Mechanism(sigma, 0.01, 1000)], 1e-5, accountant) <= 3.0
    assert epsilon([Mechanism(sigma * 0.9, 0.01, 1000)], 1e-5, accountant) > 3.0
    if accountant is Accountant.PLD:  # tighter: less noise for the same target
        assert sigma < noise_for(
            target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000, accountant=Accountant.RDP
        )


def test_the_ledger_composes_runs_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "site" / "privacy.json"
    ledger = PrivacyLedger(path, delta=1e-5, accountant=Accountant.RDP)
    ledger.record("run-a", Mechanism(1.1, 0.02, 300))
    ledger.record("run-b", Mechanism(1.3, 0.02, 200))
    restarted = PrivacyLedger(path, delta=1e-5, accountant=Accountant.RDP)  # a new process, the same disk
    assert restarted.spent() == pytest.approx(
        opacus_epsilon([(1.1, 0.02, 300), (1.3, 0.02, 200)], 1e-5), rel=1e-9
    )
    assert restarted.spent("run-a") == pytest.approx(opacus_epsilon([(1.1, 0.02, 300)], 1e-5), rel=1e-9)
    assert restarted.spent_after(Mechanism(1.1, 0.02, 100)) > restarted.spent()
    assert sorted(p.name for p in path.parent.iterdir()) == ["privacy.json"]  # no temporary left behind
    assert json.loads(path.read_text())["epsilon_total"] == pytest.approx(restarted.spent())


@pytest.mark.parametrize(
    "content", ["{", '{"version": 2, "runs": {}}', '{"version": 1, "runs": {"r": [{"steps": 1}]}}']
)
def test_a_damaged_ledger_is_never_silently_reset(tmp_path: Path, content: str) -> None:
    path = tmp_path / "privacy.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="unreadable"):
        PrivacyLedger(path, delta=1e-5)


def test_noise_for_a_target_epsilon_covers_a_prior_release() -> None:
    """With a statistics release before the DP-SGD rounds, the noise meets the target for
    both together (Opacus's accountant over the whole history as the reference)."""
    prior = (Mechanism(10.0, 1.0, 1),)
    z = noise_for(
        target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=500, prior=prior, accountant=Accountant.RDP
    )
    history = [(10.0, 1.0, 1), (z, 0.1, 500)]
    assert opacus_epsilon(history, 1e-5) <= 2.0 < opacus_epsilon([(10.0, 1.0, 1), (z * 0.99, 0.1, 500)], 1e-5)
    assert z > noise_for(
        target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=500, accountant=Accountant.RDP
    )
    with pytest.raises(ValueError, match="leaves nothing"):
        noise_for(target_epsilon=0.1, delta=1e-5, sample_rate=0.1, steps=500, prior=(Mechanism(1.0, 1.0, 1),))
