"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcore.strategies.base import Strategy
from fedcore.tensors import Arrays


class FedAvg(Strategy):
    """The next model is the example-weighted mean of the sites' models."""

    name = "fedavg"

    def apply(self, current: Arrays, mean_update: Arrays) -> Arrays:
        return {k: (v.astype(np.float64) + mean_update[k]).astype(v.dtype) for k, v in current.items()}


class FedProx(FedAvg):
    """FedAvg on the server; the sites add mu/2 * ||w - w_global||^2 to their local loss."""

    name = "fedprox"
    accepts_partial_work = True

    def __init__(self, *, proximal_mu: float) -> None:
        self.proximal_mu = proximal_mu

    def fit_config(self, round_number: int) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
