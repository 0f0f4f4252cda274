"""The one-run privacy audit (Steinke, Nasr and Jagielski 2023): its bound against closed
forms, and `fedcore privacy-audit` on a correct mechanism (the empirical lower bound stays
below the accountant's epsilon) and on one whose noise is cut to a tenth behind the
accountant's back (the bound exceeds the claimed epsilon: the audit can fail)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedcore.cli import main
from fedcore.privacy.audit import lower_bound, p_value


def test_all_guesses_right_gives_the_closed_form_bound() -> None:
    """delta = 0, v = r: P[Binomial(r, q) >= r] = q^r = 5% at the bound, q = e^eps / (1 + e^eps)."""
    for r in (20, 200):
        q = 0.05 ** (1 / r)
        assert lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


def test_the_bound_grows_with_correct_guesses_and_chance_gives_nothing() -> None:
    bounds = [lower_bound(1000, 200, v, 1e-5) for v in (100, 120, 140, 160, 180, 200)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > 4
    assert p_value(1000, 200, 150, 0.0, 0.0) < 1e-10  # 150 of 200 is not chance
    assert p_value(1000, 200, 150, 0.0, 1e-5) > p_value(1000, 200, 150, 0.0, 0.0)  # delta costs


@pytest.mark.parametrize("mode", ["sample", "user-central"])
@pytest.mark.parametrize("noise_scale", [1.0, 0.1])
def test_the_audit_passes_a_correct_mechanism_and_catches_one_with_too_little_noise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, noise_scale: float
) -> None:
    config = tmp_path / "job.toml"
    config.write_text(
        f"[federation]\nrounds = 30\nsites_per_round = 2\n\n[simulation]\nsites = 4\n\n"
        f'[privacy]\nmode = "{mode}"\ntarget_epsilon = 2.0\n'
    )
    code = main(
        ["privacy-audit", str(config), "--json", "--seed", "7", "--test-noise-scale", str(noise_scale)]
    )
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)  # stdout holds only the JSON object
    assert result["epsilon"] == pytest.approx(2.0, rel=1e-3)
    if noise_scale == 1.0:
        assert result["empirical_lower_bound"] < result["epsilon"]
    else:
        assert result["empirical_lower_bound"] > result["epsilon"]
