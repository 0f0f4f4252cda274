"""Server-side strategies: the math applied to the aggregate of the sites' updates.

A strategy sees only the weighted mean of the sites' updates (update = site's parameters
after local training - global parameters), never one site's update, so every strategy here
composes with secure aggregation. A strategy that needs individual updates (a robust
aggregator) must set `needs_individual_updates`.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from fedcore.tensors import Arrays


class Strategy(abc.ABC):
    name: ClassVar[str]
    needs_individual_updates: ClassVar[bool] = False
    # Whether a site that did only part of its local work still contributes (FedProx keeps a
    # straggler's partial solution; FedAvg, as in the FedProx paper, drops the straggler).
    accepts_partial_work: ClassVar[bool] = False

    def fit_config(self, round_number: int) -> dict[str, Any]:
        """Extra settings sent to the sites with the round (e.g. FedProx's mu)."""
        return {}

    @abc.abstractmethod
    def apply(self, current: Arrays, mean_update: Arrays) -> Arrays:
        """The next global model from the current one and the sites' mean update."""

    def released(self, current: Arrays) -> Arrays:
        """The model the run evaluates and delivers: the iterate itself (`Averaged`: their average)."""
        return current

    def restored(self, stored: Arrays) -> Arrays:
        """The iterate to go on from, given the model a checkpoint stored (`released`'s)."""
        return stored

    def state_dict(self) -> dict[str, Arrays]:
        """Optimizer state to save with the model (empty when stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Arrays]) -> None:
        """Continue from `state_dict()`'s value."""
        if state:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(state)}")
