"""The server's side of a run's differential privacy: what each fit instruction asks for,
how sites are sampled, how the aggregate is noised, and the run's epsilon.

- sample: sites run DP-SGD and account for themselves; the server collects each site's
  reported epsilon (the run's is the largest).
- user-central: Poisson site sampling with rate q, DP-FedAvg on the sum (see user_level.py),
  one `Mechanism(z, q, 1)` per completed round in the RDP accountant.
- user-distributed: sites add discrete Gaussian noise before masking (see distributed.py);
  one zCDP term per completed round, for the sites whose noise reached the sum.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np

from fedcore.aggregation.base import Aggregate
from fedcore.config import Experiment, PrivacyMode
from fedcore.privacy import accountant, distributed
from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.randomness import dp_random
from fedcore.privacy.user_level import AdaptiveClip, CentralGaussianSum, update_noise_multiplier
from fedcore.secagg.contribution import unflatten
from fedcore.seeding import derive_seed
from fedcore.tensors import Arrays

log = logging.getLogger(__name__)

Config = dict[str, int | float | bool | str]


class TargetReached(Exception):
    """The run's target epsilon leaves no room for what would come next: the run ends."""


class RunPrivacy:
    def __init__(self, experiment: Experiment, template: Arrays) -> None:
        self.experiment = experiment
        self.config = p = experiment.privacy
        self.mode = p.mode
        self.dimension = sum(a.size for a in template.values())
        self.run_id = uuid.uuid4().hex
        self.random = dp_random(secure=p.secure_rng, seed=derive_seed(experiment.seed, "dp-server"))
        self.history: list[Mechanism] = []  # user-central: one subsampled Gaussian per round
        self.rhos: list[float] = []  # user-distributed: one zCDP term per round
        self.site_epsilon: dict[str, float] = {}  # sample: each site's run epsilon, as reported
        self.site_noise: dict[str, float] = {}  # sample: each site's DP-SGD noise multiplier
        self.clip = (
            AdaptiveClip(
                initial=p.clip_norm,
                target_quantile=p.target_quantile,
                learning_rate=p.clip_learning_rate,
                count_stddev=p.clipped_count_stddev,
            )
            if p.adaptive_clipping
            else None
        )
        self._noise: float | None = p.noise_multiplier
        self._samples: dict[int, list[str]] = {}  # user-central: this round's Poisson sample
        self._sampled_from = 0  # how many sites it was drawn from
        self._distributed: distributed.DistributedNoise | None = None
        self.stopped: str | None = None  # why the run ended before its last round, if it did

    @property
    def clip_norm(self) -> float:
        return self.clip.clip_norm if self.clip else self.config.clip_norm

    # Sampling -------------------------------------------------------------------------
    def sample_rate(self, available: int) -> float:
        k = self.experiment.federation.sites_per_round
        return 1.0 if k is None or k >= available else k / available

    def sample(self, available: list[str], number: int) -> list[str] | None:
        """user-central: each site independently with probability q, from the DP stream (the
        accountant's amplification by sampling assumes exactly this), drawn once per round:
        a retried attempt keeps it. Otherwise None (the Coordinator's own sampling)."""
        if self.mode is not PrivacyMode.USER_CENTRAL:
            return None
        if number not in self._samples:
            q = self.sample_rate(len(available))
            chosen = self.random.bernoulli(len(available), q) if q < 1 else np.ones(len(available), bool)
            self._samples = {number: [s for s, c in zip(available, chosen, strict=True) if c]}
            self._sampled_from = len(available)
        return list(self._samples[number])

    def noise_multiplier(self, q: float) -> float:
        """The job's noise multiplier (fixed, or from target_epsilon the first time it is asked)."""
        if self._noise is None:
            target, delta, rounds = (
                self.config.target_epsilon,
                self.config.delta,
                self.experiment.federation.rounds,
            )
            assert target is not None
            if self.mode is PrivacyMode.USER_DISTRIBUTED:
                self._noise = distributed.noise_for(target_epsilon=target, delta=delta, rounds=rounds)
            else:
                self._noise = accountant.noise_for(
                    target_epsilon=target, delta=delta, sample_rate=q, steps=rounds
                )
            log.info("noise multiplier %.4f for epsilon %.3g over %d rounds", self._noise, target, rounds)
        return self._noise

    # Instructions ---------------------------------------------------------------------
    def fit_config(self, sampled: int) -> Config:
        p = self.config
        config: Config = {
            "dp_mode": self.mode.value,
            "dp_secure_rng": p.secure_rng,
            "dp_run": self.run_id,
            "dp_delta": p.delta,
        }
        if self.mode is PrivacyMode.SAMPLE:
            config.update(
                dp_max_grad_norm=p.max_grad_norm,
                dp_ghost=p.ghost_clipping,
                dp_rounds=self.experiment.federation.rounds,
            )
            if p.target_epsilon is not None:
                config["dp_target_epsilon"] = p.target_epsilon
            else:
                assert p.noise_multiplier is not None
                config["dp_noise_multiplier"] = p.noise_multiplier
        elif self.mode is PrivacyMode.USER_CENTRAL:
            config["dp_clip_norm"] = self.clip_norm
        elif self.mode is PrivacyMode.USER_DISTRIBUTED:
            noise = self.distributed_noise(sampled)
            config.update(dp_clip_norm=noise.clip_norm, dp_scale=noise.scale, dp_sigma=noise.sigma)
        return config

    def distributed_noise(self, sampled: int) -> distributed.DistributedNoise:
        """The noise each of `sampled` sites adds this round (kept for decoding the sum)."""
        self._distributed = self._noise_for_sites(sampled)
        return self._distributed

    def _noise_for_sites(self, sites: int) -> distributed.DistributedNoise:
        return distributed.DistributedNoise.for_model(
            dimension=self.dimension,
            clip_norm=self.config.clip_norm,
            noise_multiplier=self.noise_multiplier(1.0),
            sites=sites,
        )

    # Aggregation ----------------------------------------------------------------------
    def central_stage(self, available: int) -> CentralGaussianSum:
        available = self._sampled_from or available
        q = self.sample_rate(available)
        z = self.noise_multiplier(q)
        if self.clip is not None:
            if self.clip.count_stddev is None:
                # Andrew et al. suggest expected sites / 20; in small federations that would
                # leave the update no share of the noise, so never below z (update noise x1.15).
                self.clip.count_stddev = max(q * available / 20, z)
            z = update_noise_multiplier(z, self.clip.count_stddev)
        return CentralGaussianSum(
            clip_norm=self.clip_norm,
            noise_std=z * self.clip_norm,
            expected_sites=q * available,
            random=self.random,
        )

    def distributed_mean(self, total: np.ndarray, template: Arrays, sampled: int) -> tuple[Aggregate, int]:
        """The mean update from the decrypted integer sum (already noised by the sites)."""
        assert self._distributed is not None
        sums, count = distributed.decode(total, self._distributed)
        mean = unflatten(sums / sampled, template)
        return Aggregate(mean=mean, total_weight=float(count), count=count), count

    # Accounting -----------------------------------------------------------------------
    def observe(self, site: str, metrics: dict[str, float]) -> None:
        """sample: a site's fit reply carries its own run epsilon."""
        if "epsilon" in metrics:
            self.site_epsilon[site] = float(metrics["epsilon"])
        if "noise_multiplier" in metrics:
            self.site_noise[site] = float(metrics["noise_multiplier"])

    def complete_round(
        self, *, available: int, contributors: int, unclipped: int | None = None
    ) -> dict[str, Any]:
        """Account a completed round; what the round's record says about privacy."""
        p = self.config
        record: dict[str, Any] = {"mode": self.mode.value}
        if self.mode is PrivacyMode.USER_CENTRAL:
            available = self._sampled_from or available
            q = self.sample_rate(available)
            z = self.noise_multiplier(q)
            self.history.append(Mechanism(z, q, 1))
            record.update(noise_multiplier=z, sample_rate=q, clip_norm=self.clip_norm)
            if self.clip is not None and unclipped is not None:
                record["unclipped_fraction"] = self.clip.update(
                    unclipped, contributors, q * available, self.random
                )
                record["next_clip_norm"] = self.clip.clip_norm
        elif self.mode is PrivacyMode.USER_DISTRIBUTED:
            assert self._distributed is not None
            rho = distributed.round_rho(dimension=self.dimension, noise=self._distributed, sites=contributors)
            self.rhos.append(rho)
            record.update(
                noise_multiplier=self.noise_multiplier(1.0),
                sites_noise=contributors,
                sigma=self._distributed.sigma,
                rho=rho,
                clip_norm=self._distributed.clip_norm,
            )
        record["epsilon"] = self.epsilon()
        record["delta"] = p.delta
        return record

    # A target epsilon is never exceeded ----------------------------------------------
    def check_next_round(self, available: int, sampled: int) -> None:
        """TargetReached unless this round, sampled from `available` sites and completing with
        the noise of all `sampled` sites in the aggregate (the best case), keeps the run
        within its target epsilon. Called after sampling and before any instruction leaves.
        Sample-level DP is each site's to enforce (its ledger and budget); a fixed noise
        multiplier sets no target."""
        if self.config.target_epsilon is None or self.mode is PrivacyMode.SAMPLE:
            return
        if self.mode is PrivacyMode.USER_CENTRAL:
            q = self.sample_rate(self._sampled_from or available)  # what complete_round accounts
            history = [*self.history, Mechanism(self.noise_multiplier(q), q, 1)]
            self._within_target(accountant.epsilon(history, self.config.delta))
        elif sampled > 0:
            self._check_distributed(sampled, self._noise_for_sites(sampled))

    def check_decryption(self, sites: int) -> None:
        """user-distributed: TargetReached if decrypting a sum that holds the noise of only
        `sites` sites (the others dropped before their masked input) would take the run over
        its target. Checked before the unmask stage: a sum never decrypted costs nothing."""
        if self.config.target_epsilon is not None and self.mode is PrivacyMode.USER_DISTRIBUTED:
            assert self._distributed is not None
            self._check_distributed(sites, self._distributed)

    def _check_distributed(self, sites: int, noise: distributed.DistributedNoise) -> None:
        """TargetReached unless a sum holding the noise of `sites` sites keeps the run within it."""
        rho = distributed.round_rho(dimension=self.dimension, noise=noise, sites=max(sites, 1))
        self._within_target(distributed.epsilon([*self.rhos, rho], self.config.delta))

    def _within_target(self, projected: float) -> None:
        target = self.config.target_epsilon
        assert target is not None
        if projected > target * (1 + 1e-6):
            self.stopped = (
                f"going on would take epsilon to {projected:.4g} (delta {self.config.delta:g}), "
                f"over the target {target:g}: the run ends at epsilon {self.epsilon():.4g}"
            )
            raise TargetReached(self.stopped)

    def epsilon(self) -> float:
        if self.mode is PrivacyMode.SAMPLE:
            return max(self.site_epsilon.values(), default=0.0)
        if self.mode is PrivacyMode.USER_CENTRAL:
            return accountant.epsilon(self.history, self.config.delta)
        return distributed.epsilon(self.rhos, self.config.delta)

    def summary(self, records: list[Any]) -> dict[str, Any]:
        """What the run spent, for summary.json and the end of `fedcore simulate`."""
        unit = "one training example" if self.mode is PrivacyMode.SAMPLE else "one site's whole data"
        accountant_name = {
            PrivacyMode.SAMPLE: "each site's RDP accountant (Opacus) over its DP-SGD steps",
            PrivacyMode.USER_CENTRAL: "RDP accountant (Opacus), Poisson site sampling, composition over rounds",
            PrivacyMode.USER_DISTRIBUTED: "distributed discrete Gaussian zCDP (Kairouz et al. 2021), no sampling amplification",
        }[self.mode]
        refused = sum(1 for r in records for why in r.dropped.values() if "privacy" in why)
        return {
            "mode": self.mode.value,
            "epsilon": self.epsilon(),
            "delta": self.config.delta,
            "unit": unit,
            "accountant": accountant_name,
            "noise_multiplier": self._noise,
            "site_epsilon": dict(sorted(self.site_epsilon.items())),
            "site_noise_multiplier": dict(sorted(self.site_noise.items())),
            "refused": refused,
            "secure_rng": self.config.secure_rng,
            "stopped_early": self.stopped,
        }
