"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcore.strategies.base import Strategy
from fedcore.tensors import Arrays

BLOCK = 1 << 16  # values added at a time


class FedAvg(Strategy):
    """The next model is the example-weighted mean of the sites' models."""

    name = "fedavg"

    def apply(self, current: Arrays, mean_update: Arrays) -> Arrays:
        out = {}
        for k, v in current.items():  # in blocks: no float64 temporary of a whole tensor
            out[k] = np.empty(v.shape, v.dtype)  # C order, whatever `v`'s: its flat view is a view
            flat, step, into = v.reshape(-1), np.asarray(mean_update[k]).reshape(-1), out[k].reshape(-1)
            for start in range(0, flat.size, BLOCK):
                part = slice(start, start + BLOCK)
                into[part] = flat[part].astype(np.float64) + step[part]
        return out


class FedProx(FedAvg):
    """FedAvg on the server; the sites add mu/2 * ||w - w_global||^2 to their local loss."""

    name = "fedprox"
    accepts_partial_work = True

    def __init__(self, *, proximal_mu: float) -> None:
        self.proximal_mu = proximal_mu

    def fit_config(self, round_number: int) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
