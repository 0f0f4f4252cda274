"""The Site runtime: what a data holder does with an instruction, whatever the transport."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.aggregation import Encoded, RefusalCode, SiteStages, StageState
from fedcore.aggregation.plans import QuantizePlan, StatisticsNoisePlan, StatisticsScalePlan
from fedcore.engine.messages import Config, Instruction, InstructionKind, Reply
from fedcore.errors import ConfigError, FedcoreError, PrivacyBudgetError, ProtocolError, SecurityError
from fedcore.seeding import derive_seed
from fedcore.tasks import SiteData, Task, TrainSettings
from fedcore.tensors import Arrays, check_finite, check_like

log = logging.getLogger(__name__)

STATISTICS_KEY = "fedcore.statistics"  # an instruction's config entry: the run's statistics, JSON
STATISTICS_ARRAY = "statistics"  # the one array of a statistics contribution
STATISTICS_PLAN = (StatisticsNoisePlan, StatisticsScalePlan, QuantizePlan)  # what its plan may hold


class Site:
    """Checks an instruction, trains or evaluates the task on the site's data, and hands the
    update to the site part of the aggregation stages. Synchronous: transports run it off
    their event loop."""

    def __init__(
        self,
        *,
        name: str,
        task: Task,
        data: SiteData,
        stages: SiteStages | None = None,
        template: Arrays | None = None,
    ) -> None:
        self.name = name
        self.task = task
        self.data = data
        self.stages = stages or SiteStages(name)
        self._statistics_used: str | None = None  # the run's statistics the task was given
        # Names, shapes and dtypes that incoming models must have.
        self._template = template if template is not None else task.initial_parameters(0)

    def export_state(self) -> SiteState | None:
        """What this site must remember until its next instruction (None: nothing): the
        task's per-site state and its stages' (secure-aggregation stage, ledger)."""
        state = SiteState(self.task.site_state(self.data), self.stages.export_state())
        return None if state == SiteState() else state

    def import_state(self, state: SiteState | None) -> None:
        if state is not None and not isinstance(state, SiteState):
            raise ValueError("not a site's state")
        state = state or SiteState()
        self.task.restore_site_state(self.data, state.task)
        self.stages.import_state(state.stages)

    @property
    def template(self) -> Arrays:
        """Names, shapes and dtypes every model sent to this site must have."""
        return self._template

    def handle(self, instruction: Instruction) -> Reply:
        try:
            if instruction.kind is InstructionKind.STAGE:
                message = self.stages.exchange(instruction.message, instruction.round)
                # No example count: a secure sum's weights travel masked, over a public bound.
                return Reply(self.name, instruction.kind, instruction.round, message=message)
            if instruction.kind is InstructionKind.STATISTICS:
                return self._statistics(instruction)
            check_like(instruction.parameters, self._template)
            check_finite(instruction.parameters)
            self._use_statistics(instruction.config)
            if instruction.kind is InstructionKind.FIT:
                return self._fit(instruction)
            return self._evaluate(instruction)
        except PrivacyBudgetError as err:
            return self._refuse(instruction, RefusalCode.PRIVACY_BUDGET, str(err))
        except SecurityError as err:  # a secure-aggregation stage aborted here
            return self._refuse(instruction, RefusalCode.ABORTED, str(err))
        except (FedcoreError, ValueError) as err:
            return self._refuse(instruction, RefusalCode.BAD_INSTRUCTION, str(err))
        except Exception as err:  # e.g. out of GPU memory: the site stays up, the round goes on
            log.exception("site %s failed round %d", self.name, instruction.round)
            return self._refuse(instruction, RefusalCode.FAILED, f"{type(err).__name__}: {err}")

    def _refuse(self, instruction: Instruction, code: RefusalCode, why: str) -> Reply:
        log.warning("site %s refused round %d (%s): %s", self.name, instruction.round, code.value, why)
        return Reply(self.name, instruction.kind, instruction.round, refusal=why, refusal_code=code)

    def _use_statistics(self, config: Config) -> None:
        """The run's federated statistics, which come with every instruction after they exist."""
        raw = config.get(STATISTICS_KEY)
        if raw is None or raw == self._statistics_used:
            return
        if not isinstance(raw, str):
            raise ValueError(f"instruction's {STATISTICS_KEY!r} must be a JSON list")
        self.task.use_statistics(np.array(json.loads(raw), dtype=np.float64))
        self._statistics_used = raw

    def _statistics(self, instruction: Instruction) -> Reply:
        """The task's statistics vector, through the statistics stages' plan (noise, scale,
        fixed point) and, under secure aggregation, masked. Nothing else rides on it."""
        if stray := [i for i in instruction.plan if not isinstance(i, STATISTICS_PLAN)]:
            raise ProtocolError(f"a statistics instruction with a {type(stray[0]).__name__}")
        if instruction.round != 0:
            raise ProtocolError("a task's statistics are exchanged once, before round 1")
        size = self.task.statistics_size()
        if size < 1:
            raise ConfigError(f"task {self.task.name!r} has no federated statistics")
        template = {STATISTICS_ARRAY: np.zeros(size)}
        key = fit_key(instruction) if self.stages.remembers else ""
        encoded = self.stages.replay(key)
        if encoded is None:
            prepared = self.stages.prepare(
                instruction.plan,
                masked=instruction.message is not None,
                dimension=size,
                sensitivity=self.task.statistics_sensitivity(),
            )
            vector = np.asarray(self.task.statistics(self.data.train), dtype=np.float64)
            encoded = self.stages.encode(
                prepared,
                key=key,
                update={STATISTICS_ARRAY: vector},
                examples=1,  # a sum, not a mean: every site weighs 1
                metrics={},
                template=template,
                seed=derive_seed(int(instruction.config.get("seed", 0)), "statistics", self.name),
            )
        return self._release(instruction, encoded)

    def _fit(self, instruction: Instruction) -> Reply:
        if stray := [i for i in instruction.plan if isinstance(i, STATISTICS_PLAN[:2])]:
            raise ProtocolError(f"a fit instruction with a {type(stray[0]).__name__}")
        settings = dataclasses.replace(train_settings(instruction.config), round=instruction.round)
        masked = instruction.message is not None
        dimension = sum(a.size for a in self._template.values())
        key = fit_key(instruction) if self.stages.remembers else ""  # hashing the model costs
        encoded = self.stages.replay(key)
        if encoded is None:
            # The site's policy first: a round that would cross its budget is refused untrained.
            prepared = self.stages.prepare(
                instruction.plan,
                masked=masked,
                dimension=dimension,
            )
            if prepared.dp is not None:
                if not self.task.supports_dp_sgd:
                    raise ConfigError(f"task {self.task.name!r} cannot train with DP-SGD")
                settings = dataclasses.replace(settings, dp=prepared.dp, secure_rng=prepared.secure_rng)
            outcome = self.task.fit(instruction.parameters, self.data, settings)
            encoded = self.stages.encode(
                prepared,
                key=key,
                update=delta(outcome.parameters, instruction.parameters),
                examples=outcome.num_examples,
                metrics=outcome.metrics,
                template=self._template,
                seed=settings.seed,
            )
        else:
            log.info(
                "site %s: round %d was already trained for this model; resending it",
                self.name,
                instruction.round,
            )
        return self._release(instruction, encoded)

    def _release(self, instruction: Instruction, encoded: Encoded) -> Reply:
        """What leaves the site for a fit or statistics instruction (masked under secure aggregation)."""
        contribution = self.stages.release(
            encoded, round_number=instruction.round, routed=instruction.message
        )
        return Reply(
            site=self.name,
            kind=instruction.kind,
            round=instruction.round,
            num_examples=contribution.weight,
            update=contribution.update,
            metrics=contribution.metrics,
            message=contribution.message,
        )

    def _evaluate(self, instruction: Instruction) -> Reply:
        if self.stages.private or self.stages.protective:
            # Exact loss, accuracy and count of any model the server sends, on the site's data
            # (training or held out: both are the site's), are an oracle no DP noise covers.
            raise PrivacyBudgetError("privacy policy: no per-site evaluation under differential privacy")
        if self.stages.secagg.advertised:
            # This run sums securely: the server learns only sums, so no per-site metric (nor
            # the count that weighs it) leaves, whatever the server asks.
            raise ProtocolError("this site sends no per-site evaluation in a secure-aggregation run")
        data = self.data.test if self.data.test is not None else self.data.train
        result = self.task.evaluate(instruction.parameters, data)
        return Reply(
            site=self.name,
            kind=InstructionKind.EVALUATE,
            round=instruction.round,
            num_examples=result.num_examples,
            metrics={**result.metrics, "loss": result.loss, "accuracy": result.accuracy},
        )


@dataclass
class SiteState:
    """What a site carries between instructions when it is rebuilt for each (a simulation)."""

    task: bytes | None = None  # Task.site_state
    stages: StageState | None = None

    def to_json(self) -> dict[str, Any]:
        """The state between rounds, JSON (saved with a simulation's checkpoint)."""
        return {
            "task": base64.b64encode(self.task).decode() if self.task is not None else None,
            "stages": self.stages.to_json() if self.stages is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteState:
        task, stages = data["task"], data["stages"]
        return cls(
            base64.b64decode(task) if task is not None else None,
            StageState.from_json(stages) if stages is not None else None,
        )


def fit_key(instruction: Instruction) -> str:
    """What makes two fit instructions the same fit: round, model, settings and stage plan
    (the run's id is in a private plan; a site object serves one run); masked, also the
    attempt: a retried secure round is a new sum, whose noise must be fresh."""
    masked = instruction.message is not None
    h = hashlib.sha256()
    h.update(
        repr(
            (
                instruction.kind.value,
                instruction.round,
                instruction.attempt if masked else None,
                sorted(instruction.config.items()),
                instruction.plan,
            )
        ).encode()
    )
    for name in sorted(instruction.parameters):
        array = np.ascontiguousarray(instruction.parameters[name])
        h.update(repr((name, array.dtype.str, array.shape)).encode())
        h.update(array.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


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
