"""An empirical privacy audit in one run (Steinke, Nasr and Jagielski, NeurIPS 2023).

Insert m canaries, each independently with probability 1/2; run the job's mechanism once;
score each canary; guess "included" for the k highest scores and "excluded" for the k
lowest. Under (epsilon, delta)-DP the number of correct guesses is dominated by a binomial
of success probability e^eps / (1 + e^eps) (plus a delta term), so many correct guesses
reject every epsilon below a bound, at 95% confidence: an empirical lower bound on what
the mechanism really spends, to set beside the accountant's upper bound.

The canaries are the strongest the audit can place without changing fedcore: Dirac canaries
(Nasr et al. 2021), each moving its own coordinate only.
- sample-level: one site whose examples are the canaries, trained with fedcore's DP-SGD
  (`dpsgd.train`: its clipping, sampling and secure noise) for the job's rounds, sampling
  rate, steps and noise; a canary is the one-hot input s e_i of class 0 for a linear model;
  its score is how far the model moved its logit toward class 0;
- user-level (central): the canaries are sites, sampled each round at the job's rate, each
  sending its clipped update C e_i, and the server's release is fedcore's (`grid_noised`);
  its score is the sum of its coordinate over the released sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch

from fedcore.privacy import dpsgd
from fedcore.privacy.accountant import Mechanism, epsilon, noise_for
from fedcore.privacy.dpsgd import SampleDP
from fedcore.privacy.randomness import SecureRandom
from fedcore.privacy.user_level import grid_noised
from fedcore.privacy_config import PrivacyConfig, PrivacyMode

CONFIDENCE = 0.95


@dataclass(frozen=True)
class AuditResult:
    mode: str
    unit: str
    epsilon: float  # the accountant's, for the mechanism the audit ran
    empirical_lower_bound: float  # at CONFIDENCE
    delta: float
    canaries: int
    guesses: int
    correct: int
    noise_multiplier: float
    rounds: int

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "confidence": CONFIDENCE}


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (eps, delta)-DP mechanism with m canaries
    (Steinke et al. 2023, Theorem 3: the binomial tail plus 2 m delta times the largest
    mean of its lower tail)."""
    q = 1 / (1 + math.exp(-eps))
    tail = float(scipy.stats.binom.sf(v - 1, r, q))
    below, alpha = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(scipy.stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, tail + 2 * m * delta * alpha)


def lower_bound(m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest eps that `v` correct of `r` guesses reject at `confidence` (0: none)."""
    level = 1 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < level else (low, middle)
    return low


def _noise(privacy: PrivacyConfig, sample_rate: float, steps: int) -> float:
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    assert privacy.target_epsilon is not None
    return noise_for(
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=privacy.accountant,
        adjacency=privacy.neighbours,
    )


def _sample_level(privacy: PrivacyConfig, included: np.ndarray, rounds: int, z: float) -> np.ndarray:
    """Scores of canary examples trained into one site's linear model by fedcore's DP-SGD."""
    m, clip = included.size, privacy.max_grad_norm
    model = torch.nn.Linear(m, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    rows = np.flatnonzero(included)
    x = torch.zeros(len(rows), m)
    x[torch.arange(len(rows)), torch.as_tensor(rows)] = 4.0 * clip  # clipped at first: every step counts
    y = torch.zeros(len(rows), dtype=torch.long)
    dp = SampleDP(z, clip, privacy.sample_rate, privacy.local_steps, privacy.expected_batch)
    random = SecureRandom()
    for _ in range(rounds):
        dpsgd.train(model, x, y, dp=dp, random=random, lr=1.0, weight_decay=0.0)
    w = model.weight.detach().numpy()
    return np.asarray(w[0] - w[1], dtype=np.float64)


def _user_level(included: np.ndarray, rounds: int, z: float, clip: float, rate: float) -> np.ndarray:
    """Scores of canary sites through fedcore's central release, `rounds` rounds."""
    random = SecureRandom()
    scores = np.zeros(included.size)
    for _ in range(rounds):
        sampled = included & (random.uniform(included.size) < rate)
        released, _ = grid_noised(sampled * clip, noise_multiplier=z, clip=clip, random=random)
        scores += released
    return scores


def run_audit(
    privacy: PrivacyConfig,
    *,
    rounds: int,
    site_rate: float = 1.0,
    canaries: int = 1000,
    guesses: int = 200,
    seed: int | None = None,
    noise_scale: float = 1.0,
    progress: Callable[[str], None] = lambda _: None,
) -> AuditResult:
    """Audit the job's mechanism once. `site_rate`: the user-level sampling rate of sites.
    `noise_scale` < 1 cuts the noise the mechanism adds but not the epsilon it claims: a
    test-only switch, to show the audit can fail."""
    if not 2 <= guesses <= canaries:
        raise ValueError("guesses must be between 2 and the number of canaries")
    included = np.random.default_rng(seed).random(canaries) < 0.5
    if privacy.mode is PrivacyMode.SAMPLE:
        steps, q, unit = privacy.local_steps, privacy.sample_rate, "example"
        z = _noise(privacy, q, steps * rounds)
        progress(f"DP-SGD on {int(included.sum())} of {canaries} canaries, {rounds} rounds, z {z:.4g}")
        scores = _sample_level(privacy, included, rounds, z * noise_scale)
        history = [Mechanism(z, q, steps)] * rounds
    elif privacy.mode is PrivacyMode.USER_CENTRAL:
        q, unit = site_rate, "site"
        z = _noise(privacy, q, rounds)
        progress(f"central releases over {int(included.sum())} of {canaries} canary sites, {rounds} rounds")
        scores = _user_level(included, rounds, z * noise_scale, privacy.clip_norm, q)
        history = [Mechanism(z, q, 1)] * rounds
    else:
        raise ValueError(f"the audit covers the sample and user-central modes, not {privacy.mode.value!r}")
    order = np.argsort(scores)
    k = guesses // 2
    correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
    claimed = epsilon(history, privacy.delta, privacy.accountant, privacy.neighbours)
    bound = lower_bound(canaries, 2 * k, correct, privacy.delta)
    return AuditResult(
        privacy.mode.value, unit, claimed, bound, privacy.delta, canaries, 2 * k, correct, z, rounds
    )
