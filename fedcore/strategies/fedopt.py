"""Adaptive server optimisers (Reddi et al., ICLR 2021): FedAdagrad, FedAdam, FedYogi.

The sites' mean update is a pseudo-gradient; the server keeps first and second moments
(m, v) and steps x += eta * m / (sqrt(v) + tau). The moments start at zero as in Flower's
implementations; FedAdam corrects their bias as Adam does.
"""

from __future__ import annotations

import abc

import numpy as np

from fedcore.strategies.base import Strategy
from fedcore.tensors import Arrays


class FedOpt(Strategy):
    def __init__(self, *, server_lr: float, beta_1: float, beta_2: float, tau: float) -> None:
        self.eta, self.beta_1, self.beta_2, self.tau = server_lr, beta_1, beta_2, tau
        self.m: Arrays = {}
        self.v: Arrays = {}
        self.steps = 0

    @abc.abstractmethod
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The new v from the old v and this round's pseudo-gradient."""

    def step_size(self) -> float:
        return self.eta

    def apply(self, current: Arrays, mean_update: Arrays) -> Arrays:
        self.steps += 1
        eta = self.step_size()
        new: Arrays = {}
        for k, x in current.items():
            delta = np.asarray(mean_update[k], dtype=np.float64)
            m = self.m.get(k, np.zeros_like(delta))
            v = self.v.get(k, np.zeros_like(delta))
            self.m[k] = self.beta_1 * m + (1 - self.beta_1) * delta
            self.v[k] = self.second_moment(v, delta)
            new[k] = (x + eta * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(x.dtype)
        return new

    def state_dict(self) -> dict[str, Arrays]:
        return {"m": dict(self.m), "v": dict(self.v), "steps": {"steps": np.array([self.steps], np.int64)}}

    def load_state_dict(self, state: dict[str, Arrays]) -> None:
        if set(state) != {"m", "v", "steps"}:
            raise ValueError(f"not a {self.name} state: {sorted(state)}")
        self.m = {k: np.asarray(v, np.float64) for k, v in state["m"].items()}
        self.v = {k: np.asarray(v, np.float64) for k, v in state["v"].items()}
        self.steps = int(state["steps"]["steps"][0])


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return np.asarray(v + delta * delta)


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return np.asarray(self.beta_2 * v + (1 - self.beta_2) * delta * delta)

    def step_size(self) -> float:
        t = self.steps
        return float(self.eta * np.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t))


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        d2 = delta * delta
        return np.asarray(v - (1 - self.beta_2) * d2 * np.sign(v - d2))
