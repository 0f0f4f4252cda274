"""Every epsilon equals Opacus's RDP accountant's; the ledger survives restarts and damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.errors import ConfigError
from fedcore.privacy.accountant import Mechanism, epsilon, noise_for
from fedcore.privacy.ledger import PrivacyLedger
from tests.support.opacus_reference import opacus_epsilon


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
    ours = epsilon([Mechanism(*m) for m in history], delta)
    assert ours == pytest.approx(opacus_epsilon(history, delta), rel=1e-6)


def test_noise_for_a_target_epsilon_meets_it() -> None:
    sigma = noise_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000)
    assert epsilon([Mechanism(sigma, 0.01, 1000)], 1e-5) <= 3.0
    assert epsilon([Mechanism(sigma * 0.9, 0.01, 1000)], 1e-5) > 3.0


def test_the_ledger_composes_runs_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "site" / "privacy.json"
    ledger = PrivacyLedger(path, delta=1e-5)
    ledger.record("run-a", Mechanism(1.1, 0.02, 300))
    ledger.record("run-b", Mechanism(1.3, 0.02, 200))
    restarted = PrivacyLedger(path, delta=1e-5)  # a new process reading the same disk
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
    z = noise_for(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=500, prior=prior)
    history = [(10.0, 1.0, 1), (z, 0.1, 500)]
    assert opacus_epsilon(history, 1e-5) <= 2.0 < opacus_epsilon([(10.0, 1.0, 1), (z * 0.99, 0.1, 500)], 1e-5)
    assert z > noise_for(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=500)
    with pytest.raises(ValueError, match="leaves nothing"):
        noise_for(target_epsilon=0.1, delta=1e-5, sample_rate=0.1, steps=500, prior=(Mechanism(1.0, 1.0, 1),))
