"""The Site runtime: what a data holder does with an instruction, whatever the transport."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from fedcore.aggregation import AggregationStage, WeightedMean
from fedcore.engine.messages import Config, Instruction, InstructionKind, Reply
from fedcore.errors import ConfigError, FedcoreError, PrivacyBudgetError
from fedcore.privacy.distributed import encode as encode_distributed
from fedcore.privacy.randomness import dp_random
from fedcore.privacy.site_policy import RoundPlan, SitePrivacy, job_setting
from fedcore.secagg.client import SecAggClient
from fedcore.secagg.contribution import weight
from fedcore.secagg.stages.share_keys import RoutedShares
from fedcore.tasks import SiteData, Task, TrainSettings
from fedcore.tensors import Arrays, check_finite, check_like, clip_l2

log = logging.getLogger(__name__)


class Site:
    """Checks an instruction, trains or evaluates the task on the site's data, and encodes
    its update through the aggregation stage. Synchronous: transports run it off their
    event loop."""

    def __init__(
        self,
        *,
        name: str,
        task: Task,
        data: SiteData,
        aggregation: AggregationStage | None = None,
        template: Arrays | None = None,
        privacy: SitePrivacy | None = None,
    ) -> None:
        self.name = name
        self.task = task
        self.data = data
        self.aggregation = aggregation or WeightedMean()
        # Names, shapes and dtypes that incoming models must have.
        self._template = template if template is not None else task.initial_parameters(0)
        self.secagg = SecAggClient(name)
        self.privacy = privacy or SitePrivacy()
        self._private = False  # this site has trained under DP: no exact statistics leave it

    def export_state(self) -> object | None:
        """What this site must remember until its next instruction (None: nothing): the
        task's per-site state and the secure-aggregation stage it is in."""
        state = (self.task.site_state(self.data), self.secagg.state, self.privacy.ledger.state() or None)
        return None if state == (None, None, None) else state

    def import_state(self, state: object | None) -> None:
        task_state, self.secagg.state, ledger = state if isinstance(state, tuple) else (None, None, None)
        self.task.restore_site_state(self.data, task_state)
        self.privacy.ledger.restore(ledger or {})

    @property
    def template(self) -> Arrays:
        """Names, shapes and dtypes every model sent to this site must have."""
        return self._template

    def handle(self, instruction: Instruction) -> Reply:
        try:
            if instruction.kind is InstructionKind.SECAGG:
                reply = self.secagg.step(instruction.secagg, instruction.round)
                # The example count goes with the keys: the round's weights are relative to the
                # largest count (see secure_round.py).
                return Reply(
                    self.name, instruction.kind, instruction.round, len(self.data.train), secagg=reply
                )
            check_like(instruction.parameters, self._template)
            check_finite(instruction.parameters)
            if instruction.kind is InstructionKind.FIT:
                return self._fit(instruction)
            return self._evaluate(instruction)
        except (FedcoreError, ValueError) as err:
            log.warning("site %s refused round %d: %s", self.name, instruction.round, err)
            return Reply(self.name, instruction.kind, instruction.round, refusal=str(err))
        except Exception as err:  # e.g. out of GPU memory: the site stays up, the round goes on
            log.exception("site %s failed round %d", self.name, instruction.round)
            return Reply(
                self.name, instruction.kind, instruction.round, refusal=f"failed: {type(err).__name__}: {err}"
            )

    def _fit(self, instruction: Instruction) -> Reply:
        config = instruction.config
        settings = dataclasses.replace(train_settings(config), round=instruction.round)
        mode = str(config.get("dp_mode", "none"))
        secure = isinstance(instruction.secagg, RoutedShares)
        # The site's policy first: a round that would cross its budget is refused untrained.
        plan = self.privacy.plan(
            config,
            examples=len(self.data.train),
            batch_size=settings.batch_size,
            local_epochs=settings.local_epochs,
            dimension=sum(a.size for a in self._template.values()),
            secure_participants=len(self.secagg.participants()) if secure else None,
        )
        secure_rng = self.privacy.secure_rng(bool(config.get("dp_secure_rng", True)))
        if plan is not None and plan.dp is not None:
            if not self.task.supports_dp_sgd:
                raise ConfigError(f"task {self.task.name!r} cannot train with DP-SGD")
            settings = dataclasses.replace(settings, dp=plan.dp, secure_rng=secure_rng)
        if mode != "none":
            self._private = True
        outcome = self.task.fit(instruction.parameters, self.data, settings)
        update = delta(outcome.parameters, instruction.parameters)
        # Under DP only the privacy accounting goes with the update: a training loss or an
        # exact example count would be statistics of the data that no noise covers.
        metrics = dict(outcome.metrics) if mode == "none" else {}
        examples = outcome.num_examples
        if mode in ("user-central", "user-distributed"):
            examples = 1  # every site weighs the same: its size need not leave
        if mode == "user-central":
            update, within = clip_l2(update, job_setting(config, "dp_clip_norm"))
            metrics["unclipped"] = float(within)
        masked = (
            self._mask(instruction, outcome.num_examples, update, mode, plan, secure_rng) if secure else None
        )
        if plan is not None:
            metrics.update(self.privacy.spend(plan))  # written before anything leaves the site
        if masked is not None:
            # Secure aggregation: the server gets a masked vector and the privacy accounting,
            # nothing else of ours.
            privacy_only = {
                k: v for k, v in metrics.items() if k in ("epsilon", "epsilon_total", "noise_multiplier")
            }
            return Reply(
                self.name, InstructionKind.FIT, instruction.round, secagg=masked, metrics=privacy_only
            )
        encoded = self.aggregation.encode(update, float(examples))
        return Reply(
            site=self.name,
            kind=InstructionKind.FIT,
            round=instruction.round,
            num_examples=examples,
            update=encoded,
            metrics=metrics,
        )

    def _mask(
        self,
        instruction: Instruction,
        examples: int,
        update: Arrays,
        mode: str,
        plan: RoundPlan | None,
        secure_rng: bool,
    ) -> object:
        c = instruction.config
        assert isinstance(instruction.secagg, RoutedShares)
        if plan is not None and plan.distributed is not None:
            noise = plan.distributed
            flat = np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in self._template])
            random = dp_random(secure=secure_rng, seed=int(c["seed"]))
            return self.secagg.mask_integers(
                instruction.secagg, instruction.round, encode_distributed(flat, noise, random)
            )
        return self.secagg.mask(
            instruction.secagg,
            instruction.round,
            update,
            self._template,
            # User-level DP: every site counts once, whatever its size.
            weight=1.0 if mode == "user-central" else weight(examples, int(c["secagg_max_examples"])),
            clip=float(c["secagg_clip"]),
            step=float(c["secagg_step"]),
        )

    def _evaluate(self, instruction: Instruction) -> Reply:
        if self.data.test is None and (self._private or self.privacy.protective):
            # Exact loss and accuracy of any model the server sends, on the training data, is
            # an oracle on that data that no DP noise covers.
            raise PrivacyBudgetError(
                "privacy policy: no evaluation on training data under differential privacy"
            )
        data = self.data.test if self.data.test is not None else self.data.train
        result = self.task.evaluate(instruction.parameters, data)
        return Reply(
            site=self.name,
            kind=InstructionKind.EVALUATE,
            round=instruction.round,
            num_examples=result.num_examples,
            metrics={"loss": result.loss, "accuracy": result.accuracy},
        )


def delta(new: Arrays, old: Arrays) -> Arrays:
    """new - old, in the parameters' own dtype (float updates only)."""
    return {k: np.subtract(new[k], old[k], dtype=old[k].dtype) for k in old}


def train_settings(config: Config) -> TrainSettings:
    """TrainSettings from an instruction's config; ValueError names a missing or bad key."""

    def get(key: str, kind: type, default: Any = None) -> Any:
        value = config.get(key, default)
        if value is None:
            raise ValueError(f"instruction lacks {key!r}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"instruction's {key!r} must be {kind.__name__}, got {value!r}")
        return value

    settings = TrainSettings(
        local_epochs=get("local_epochs", int),
        batch_size=get("batch_size", int),
        lr=get("lr", float),
        seed=get("seed", int),
        proximal_mu=get("proximal_mu", float, 0.0),
        weight_decay=get("weight_decay", float, 0.0),
    )
    if (
        settings.local_epochs < 1
        or settings.batch_size < 1
        or not settings.lr > 0
        or min(settings.proximal_mu, settings.weight_decay) < 0
    ):
        raise ValueError(f"instruction's training settings are out of range: {settings}")
    return settings
