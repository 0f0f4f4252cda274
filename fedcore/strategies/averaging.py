"""Iterate averaging: an exponential moving average of a strategy's global models.

Sites keep training from the strategy's own iterate; the run evaluates, records and delivers
the average. It is a function of the released models only, so it costs no privacy, and it
smooths the noise DP adds to every round (De et al. 2022 average DP-SGD's iterates alike).
"""

from __future__ import annotations

from typing import Any

from fedcore.strategies.base import Strategy
from fedcore.tensors import Arrays

AVERAGE, ITERATE = "average", "iterate"  # their keys in the state dict


class Averaged(Strategy):
    def __init__(self, inner: Strategy, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        self.inner, self.decay = inner, decay
        self.name = inner.name  # type: ignore[misc]
        self.needs_individual_updates = inner.needs_individual_updates  # type: ignore[misc]
        self.accepts_partial_work = inner.accepts_partial_work  # type: ignore[misc]
        self.average: Arrays | None = None
        self.iterate: Arrays | None = None  # what the sites train from (the run's state holds the average)

    def fit_config(self, round_number: int) -> dict[str, Any]:
        return self.inner.fit_config(round_number)

    def apply(self, current: Arrays, mean_update: Arrays) -> Arrays:
        following = self.iterate = self.inner.apply(current, mean_update)
        if self.average is None:
            self.average = {k: v.copy() for k, v in following.items()}
        else:
            for k, v in following.items():
                self.average[k] = self.decay * self.average[k] + (1 - self.decay) * v
        return following

    def released(self, current: Arrays) -> Arrays:
        return current if self.average is None else self.average

    def restored(self, stored: Arrays) -> Arrays:
        return stored if self.iterate is None else self.iterate

    def state_dict(self) -> dict[str, Arrays]:
        state = dict(self.inner.state_dict())
        if AVERAGE in state or ITERATE in state:
            raise ValueError(f"strategy {self.inner.name} keeps a state named {AVERAGE!r} or {ITERATE!r}")
        if self.average is None or self.iterate is None:
            return state
        return {**state, AVERAGE: self.average, ITERATE: self.iterate}

    def load_state_dict(self, state: dict[str, Arrays]) -> None:
        self.inner.load_state_dict({k: v for k, v in state.items() if k not in (AVERAGE, ITERATE)})
        self.average = {k: v.copy() for k, v in state[AVERAGE].items()} if AVERAGE in state else None
        self.iterate = {k: v.copy() for k, v in state[ITERATE].items()} if ITERATE in state else None
