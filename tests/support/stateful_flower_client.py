"""A Flower client that counts its fits in `context.state`, as a stateful Flower client does."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.client import Client, NumPyClient
from flwr.common import NDArrays, Scalar


class CountingClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.context = context

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return [np.zeros(3, np.float32)]

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        record = self.context.state.config_records.setdefault("counter", ConfigRecord({"fits": 0}))
        record["fits"] = int(record["fits"]) + 1
        return [parameters[0] + 1], 1, {"fits": record["fits"]}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        return 0.0, 1, {"accuracy": 0.0}


def client_fn(context: Context) -> Client:
    return CountingClient(context).to_client()
