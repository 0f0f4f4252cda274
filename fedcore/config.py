"""The experiment schema, shared by `fedcore simulate` and `fedcore server`.

An experiment is a TOML file with the tables below; every key is optional, unknown keys are
errors, and command-line flags override the file (`Experiment.override`).

    [federation]  rounds, min_sites, sites_per_round, start_sites, round_timeout, quorum, grace,
                  max_round_retries,
                  keep_models, max_examples_per_site, allowed_sites
    [task]        name, model, local_epochs, batch_size, lr, weight_decay, initial,
                  classes, image_size, channels, data
    [strategy]    name, proximal_mu, server_lr, beta_1, beta_2, tau, average
    [aggregation] rule, trim, byzantine, clip_norm
    [data]        partition, seed
    [simulation]  sites, workers, backend, ray_address, stragglers, dropout, byzantine, byzantine_attack
    [secure_aggregation]  enabled, neighbors, threshold, clip_range, bits, colluding_fraction
    [privacy]     mode, noise_multiplier, target_epsilon, delta, accountant, adjacency, max_grad_norm,
                  sample_rate, local_steps, expected_batch, ghost_clipping,
                  clip_norm, adaptive_clipping, target_quantile, clip_learning_rate,
                  clipped_count_stddev, secure_rng
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError
from fedcore.privacy_config import Accountant as Accountant  # re-exported: [privacy] is config too
from fedcore.privacy_config import Adjacency as Adjacency
from fedcore.privacy_config import PrivacyConfig as PrivacyConfig
from fedcore.privacy_config import PrivacyMode as PrivacyMode
from fedcore.privacy_config import Unit as Unit
from fedcore.privacy_config import validate_privacy
from fedcore.typed_toml import read_toml, replace_tables


class StrategyName(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 20
    min_sites: int = 2
    sites_per_round: int | None = None  # None: every connected site
    start_sites: int | None = None  # sites connected before round 1 starts (None: min_sites)
    # Seconds an exchange may take before late sites are dropped; None: 4x the last rounds'
    # longest, at least 60 (600 for the first round)
    round_timeout: float | None = None
    # A fraction of an exchange's sites: once it has replied, the others get `grace` seconds
    # more (None: every site has until the deadline)
    quorum: float | None = None
    grace: float = 10.0
    # failed attempts at one round before the run stops (too few replies) or skips the round
    # (its last result rejected with no one to blame: the model stays as it was)
    max_round_retries: int = 3
    keep_models: int | None = None  # the run store keeps the models of the latest N rounds (None: all)
    # A public bound on the example count a site's update weighs (None: the task's, 100,000 for
    # most): a site claiming more weighs this much. Under secure aggregation its weight is
    # min(examples, bound) / bound, masked with its update; a larger bound costs precision at
    # 32 bits (simulations/benchmarks/secagg_weight_precision.py), a smaller one caps big sites.
    max_examples_per_site: int | None = None
    allowed_sites: tuple[str, ...] | None = None  # `fedcore server`: the only site names that may join


class Standardise(enum.StrEnum):
    FEDERATED = "federated"  # from statistics the sites sum before round 1
    RANGES = "ranges"  # from the declared [task] ranges alone: nothing about the data leaves


@dataclass(frozen=True)
class TaskConfig:
    name: str = "breast_cancer"
    model: str | None = None  # None: the task's default model
    local_epochs: int | None = None  # None: the task's default
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    initial: str | None = None  # MODULE:FUNC giving the initial model (a Flower ClientApp's task)
    # The job's data schema, for tasks that read a site's own files (`images`): what every
    # site's data must match. `fedcore simulate` infers it from `data`.
    classes: tuple[str, ...] | None = None  # class names (images: the sub-folder names)
    image_size: tuple[int, ...] | None = None  # images: [height, width]; every image is resized
    channels: int | None = None  # images: 1 (grey) or 3 (RGB)
    data: str | None = None  # simulate: one file or folder, split into the virtual sites
    # tabular: the label column, the feature columns (in order), the categories of the
    # categorical ones, and public [low, high] bounds of numeric ones (secure or DP statistics).
    label: str | None = None
    columns: tuple[str, ...] | None = None
    categories: dict[str, tuple[str, ...]] | None = None
    ranges: dict[str, tuple[float, ...]] | None = None
    standardise: Standardise = Standardise.FEDERATED  # tabular


@dataclass(frozen=True)
class StrategyConfig:
    name: StrategyName = StrategyName.FEDAVG
    proximal_mu: float = 0.0  # FedProx's mu; only FedProx uses it
    server_lr: float = 0.1  # FedOpt's eta
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3  # FedOpt's adaptivity
    # > 0: the run evaluates and delivers an exponential moving average of the global models
    # with this decay (sites still train from the latest); free post-processing under DP.
    # None: the task's private default under sample-level DP, else 0 (off)
    average: float | None = None


class AggregationRule(enum.StrEnum):
    MEAN = "mean"  # FedAvg's weighted mean
    MEDIAN = "median"  # coordinate-wise median (Yin et al. 2018)
    TRIMMED_MEAN = "trimmed_mean"  # coordinate-wise, `trim` cut at each end (Yin et al. 2018)
    KRUM = "krum"  # the update closest to its n - f - 2 neighbours (Blanchard et al. 2017)
    MULTI_KRUM = "multi_krum"  # the mean of the n - f best Krum picks (El Mhamdi et al. 2018)

    @property
    def needs_individual_updates(self) -> bool:
        return self is not AggregationRule.MEAN


@dataclass(frozen=True)
class AggregationConfig:
    rule: AggregationRule = AggregationRule.MEAN
    trim: float = 0.1  # trimmed_mean: the fraction cut at each end, per coordinate
    byzantine: int = 0  # krum / multi_krum: f, the number of attackers tolerated
    clip_norm: float | None = None  # clip each site's update to this L2 norm (no DP implied)


@dataclass(frozen=True)
class DataConfig:
    partition: str | None = None  # None: the task's default (dirichlet:0.5; natural for synthetic)
    seed: int = 0  # the experiment seed: partitioning, initial model, sampling, training order


DEFAULT_COLLUDING_FRACTION = 0.05  # of a round's participants: the default of jobs and of sites' policies
DISTRIBUTED_BITS = 20  # user-distributed DP's secure sum: rotated integers modulo 2**20 (Kairouz et al. 2021)


@dataclass(frozen=True)
class SecureAggregationConfig:
    enabled: bool = False
    neighbors: int | None = None  # degree of the SecAgg+ graph, at least (and by default) ~3 log2(sites)
    threshold: int | None = (
        None  # shares to reconstruct a site's secrets; at least (and by default) a majority of its neighbours
    )
    clip_range: float = 10.0  # every update value is clipped to [-clip_range, clip_range]
    # Arithmetic modulo 2**bits; None: 32, or 20 for distributed DP (its sites rotate their
    # noised integers, which then wrap without loss; 16 to 31, or 64 for no rotation)
    bits: int | None = None
    # The fraction of a round's participants that may collude with a malicious server: the
    # default threshold keeps every input from them except with probability 2**-40
    # (`fedcore.secagg.graph.safe_threshold`); sites refuse less than their own policy needs.
    colluding_fraction: float = DEFAULT_COLLUDING_FRACTION


class Backend(enum.StrEnum):
    LOCAL = "local"  # worker processes on this machine
    RAY = "ray"  # Ray tasks, on a local Ray instance or a cluster (ray_address)


class ByzantineAttack(enum.StrEnum):
    SIGN_FLIP = "sign_flip"  # -10 x the honest update
    GAUSSIAN = "gaussian"  # noise of 10 x the honest update's norm
    ZERO = "zero"  # no update at all


@dataclass(frozen=True)
class SimulationConfig:
    sites: int = 5
    workers: int | None = None  # parallel site trainings; None: the number of cores
    backend: Backend = Backend.LOCAL
    ray_address: str | None = None  # an existing Ray cluster; None: start one locally
    stragglers: float = 0.0  # fraction of each round's sites that do only part of their local work
    dropout: float = 0.0  # fraction of each round's sites that vanish mid-round
    byzantine: float = 0.0  # floor(fraction x sampled) of each round's sites send attacks
    byzantine_attack: ByzantineAttack = ByzantineAttack.SIGN_FLIP


@dataclass(frozen=True)
class Experiment:
    federation: FederationConfig = field(default_factory=FederationConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def secagg_bits(self) -> int:
        """The secure sum's modulus: 32 bits suffice for clipped, weighted updates, 20 for
        distributed DP's rotated, noised integers (`fedcore.privacy.distributed`)."""
        if self.secure_aggregation.bits is not None:
            return self.secure_aggregation.bits
        return DISTRIBUTED_BITS if self.privacy.mode is PrivacyMode.USER_DISTRIBUTED else 32

    @property
    def seed(self) -> int:
        return self.data.seed

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every setting, by table and key (enums are strings): what a run store records."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str) -> Experiment:
        """The experiment `to_dict` gave (checked like a file)."""
        return _build(raw, base=cls(), source=source)

    def override(self, **dotted: Any) -> Experiment:
        """Copy with `section.key` values replaced; `None` values are ignored (flag not given)."""
        sections: dict[str, dict[str, Any]] = {}
        for path, value in dotted.items():
            if value is None:
                continue
            section, _, key = path.partition("__")
            sections.setdefault(section, {})[key] = value
        # _build replaces only the given keys; it also reports an unknown section or key.
        return _build(sections, base=self, source="command line")


_CHOICES: dict[str, tuple[type[enum.StrEnum], str]] = {
    "AggregationRule": (AggregationRule, "aggregation rule"),
    "ByzantineAttack": (ByzantineAttack, "byzantine attack"),
    "Backend": (Backend, "backend"),
    "PrivacyMode": (PrivacyMode, "privacy mode"),
    "Accountant": (Accountant, "privacy accountant"),
    "Adjacency": (Adjacency, "neighbouring relation"),
    "StrategyName": (StrategyName, "strategy"),
    "Standardise": (Standardise, "standardisation"),
}


def _build(raw: dict[str, Any], *, base: Experiment, source: str) -> Experiment:
    experiment = replace_tables(base, raw, source=source, choices=_CHOICES)
    _validate(experiment, source)
    return experiment


def _validate(e: Experiment, source: str) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {message}")

    fed = e.federation
    need(fed.rounds >= 1, f"[federation] rounds must be >= 1, got {fed.rounds}")
    need(fed.min_sites >= 1, f"[federation] min_sites must be >= 1, got {fed.min_sites}")
    need(
        fed.sites_per_round is None or fed.sites_per_round >= fed.min_sites,
        f"[federation] sites_per_round ({fed.sites_per_round}) must be >= min_sites ({fed.min_sites})",
    )
    need(
        fed.start_sites is None or fed.start_sites >= fed.min_sites,
        f"[federation] start_sites ({fed.start_sites}) must be >= min_sites ({fed.min_sites})",
    )
    need(fed.round_timeout is None or fed.round_timeout > 0, "[federation] round_timeout must be > 0 seconds")
    need(fed.quorum is None or 0 < fed.quorum <= 1, "[federation] quorum is a fraction in (0, 1]")
    need(fed.grace >= 0, "[federation] grace must be >= 0 seconds")
    need(fed.max_round_retries >= 0, "[federation] max_round_retries must be >= 0")
    t = e.task
    need(t.local_epochs is None or t.local_epochs >= 1, "[task] local_epochs must be >= 1")
    need(t.batch_size is None or t.batch_size >= 1, "[task] batch_size must be >= 1")
    need(t.lr is None or t.lr > 0, "[task] lr must be > 0")
    need(t.weight_decay is None or t.weight_decay >= 0, "[task] weight_decay must be >= 0")
    need(e.strategy.proximal_mu >= 0, "[strategy] proximal_mu must be >= 0")
    need(e.strategy.server_lr > 0, "[strategy] server_lr must be > 0")
    need(
        0 <= e.strategy.beta_1 < 1 and 0 <= e.strategy.beta_2 < 1,
        "[strategy] betas must be in [0, 1)",
    )
    need(e.strategy.tau > 0, "[strategy] tau must be > 0")
    need(e.strategy.average is None or 0 <= e.strategy.average < 1, "[strategy] average must be in [0, 1)")
    a = e.aggregation
    need(0 <= a.trim < 0.5, f"[aggregation] trim is a fraction in [0, 0.5), got {a.trim}")
    need(a.byzantine >= 0, f"[aggregation] byzantine must be >= 0, got {a.byzantine}")
    need(a.clip_norm is None or a.clip_norm > 0, "[aggregation] clip_norm must be > 0")
    need(
        not (a.rule.needs_individual_updates and e.secure_aggregation.enabled),
        f"[aggregation] rule = {a.rule.value!r} needs every site's update; with secure aggregation "
        "the server only learns their sum: use rule = 'mean' or turn secure aggregation off",
    )
    need(
        not (a.rule.needs_individual_updates and e.privacy.mode is PrivacyMode.USER_CENTRAL),
        f"[aggregation] rule = {a.rule.value!r} with user-central DP is not supported: the noise is "
        "sized for the sum of clipped updates",
    )
    need(
        fed.max_examples_per_site is None or fed.max_examples_per_site >= 1,
        "[federation] max_examples_per_site must be >= 1 (or unset: the task's)",
    )
    need(
        fed.keep_models is None or fed.keep_models >= 1,
        "[federation] keep_models must be >= 1 (or unset: all)",
    )
    sa = e.secure_aggregation
    need(sa.clip_range > 0, "[secure_aggregation] clip_range must be > 0")
    need(sa.neighbors is None or sa.neighbors >= 2, "[secure_aggregation] neighbors must be >= 2")
    need(sa.threshold is None or sa.threshold >= 1, "[secure_aggregation] threshold must be >= 1")
    need(0 <= sa.colluding_fraction < 0.5, "[secure_aggregation] colluding_fraction must be in [0, 0.5)")
    sim = e.simulation
    need(sim.sites >= 1, f"[simulation] sites must be >= 1, got {sim.sites}")
    need(sim.workers is None or sim.workers >= 1, f"[simulation] workers must be >= 1, got {sim.workers}")
    need(0 <= sim.stragglers <= 1, f"[simulation] stragglers is a fraction in [0, 1], got {sim.stragglers}")
    need(0 <= sim.dropout <= 1, f"[simulation] dropout is a fraction in [0, 1], got {sim.dropout}")
    need(0 <= sim.byzantine < 1, f"[simulation] byzantine is a fraction in [0, 1), got {sim.byzantine}")
    validate_privacy(e.privacy, need, secure=e.secure_aggregation.enabled, bits=e.secure_aggregation.bits)
    from fedcore.tasks.partition import parse_partition  # late: tasks import config

    if e.data.partition is not None:
        try:
            parse_partition(e.data.partition)
        except ValueError as err:
            raise ConfigError(f"{source}: [data] partition: {err}") from None


def load_experiment(path: str | Path | None = None) -> Experiment:
    """The experiment in `path` (TOML), or the defaults when no path is given."""
    if path is None:
        return _build({}, base=Experiment(), source="defaults")
    return _build(read_toml(path, "experiment"), base=Experiment(), source=str(path))
