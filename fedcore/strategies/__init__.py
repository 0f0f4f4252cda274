"""Strategies: FedAvg, FedProx, FedAdagrad, FedAdam, FedYogi."""

from __future__ import annotations

from fedcore.config import StrategyConfig, StrategyName
from fedcore.strategies.averaging import Averaged
from fedcore.strategies.base import Strategy
from fedcore.strategies.fedavg import FedAvg, FedProx
from fedcore.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi


def build_strategy(config: StrategyConfig) -> Strategy:
    strategy = _inner(config)
    return Averaged(strategy, config.average) if config.average else strategy


def _inner(config: StrategyConfig) -> Strategy:
    fedopt = {
        "server_lr": config.server_lr,
        "beta_1": config.beta_1,
        "beta_2": config.beta_2,
        "tau": config.tau,
    }
    match config.name:
        case StrategyName.FEDAVG:
            return FedAvg()
        case StrategyName.FEDPROX:
            return FedProx(proximal_mu=config.proximal_mu)
        case StrategyName.FEDADAGRAD:
            return FedAdagrad(**fedopt)
        case StrategyName.FEDADAM:
            return FedAdam(**fedopt)
        case StrategyName.FEDYOGI:
            return FedYogi(**fedopt)


__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Strategy",
    "build_strategy",
]
