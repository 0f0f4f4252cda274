"""A plain Flower client that fedcore can host: `[task] name = "flower:flower_client_example:client_fn"`.

Logistic regression in numpy on scikit-learn's breast-cancer data, trained with mini-batch
SGD in a fixed order (no shuffling), so that a run is deterministic and Flower's simulation
and fedcore give the same model. Partition `partition-id` of `num-partitions` is a fixed
slice of a seeded permutation; 80% of it trains, 20% evaluates.

fedcore imports this module by name: put `simulations/` on PYTHONPATH or run from there, e.g.
    cd simulations && python -m fedcore simulate flower_client.toml   (the `fedcore` script
    does not put the current directory on sys.path: use PYTHONPATH=. with it)
    PYTHONPATH=simulations fedcore client --task flower:flower_client_example:client_fn --data builtin:1/3 ...
In Flower: `ClientApp(client_fn=client_fn)`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.common import NDArrays, Scalar
from sklearn.datasets import load_breast_cancer

SPLIT_SEED = 0


def load_partition(partition_id: int, num_partitions: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) of one partition, standardized with its own train stats."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    part = np.array_split(order, num_partitions)[partition_id]
    cut = int(0.8 * len(part))
    train, test = part[:cut], part[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    return (
        (x[train] - mean) / std,
        y[train].astype(np.float64),
        (x[test] - mean) / std,
        y[test].astype(np.float64),
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _loss_and_accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    p = np.clip(_sigmoid(x @ w + b[0]), 1e-12, 1 - 1e-12)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(loss), float(np.mean((p > 0.5) == (y > 0.5)))


class LogRegClient(NumPyClient):
    def __init__(self, partition_id: int, num_partitions: int) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = load_partition(partition_id, num_partitions)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        # Drawn from numpy's global generator: fedcore seeds it before asking.
        return [np.random.normal(0.0, 0.01, self.x_train.shape[1]), np.zeros(1)]

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        w, b = (np.array(p, dtype=np.float64) for p in parameters)
        epochs, batch = int(config.get("local_epochs", 1)), int(config.get("batch_size", 32))
        lr, decay = float(config.get("lr", 0.1)), float(config.get("weight_decay", 0.0))
        n = len(self.y_train)
        for _ in range(epochs):
            for start in range(0, n, batch):
                xb, yb = self.x_train[start : start + batch], self.y_train[start : start + batch]
                err = _sigmoid(xb @ w + b[0]) - yb
                w -= lr * (xb.T @ err / len(yb) + decay * w)
                b -= lr * np.array([err.mean()])
        loss, accuracy = _loss_and_accuracy(w, b, self.x_train, self.y_train)
        return [w, b], n, {"train_loss": loss, "train_accuracy": accuracy}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        w, b = parameters
        loss, accuracy = _loss_and_accuracy(w, b, self.x_test, self.y_test)
        return loss, len(self.y_test), {"accuracy": accuracy}


def client_fn(context: Context) -> Client:
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return LogRegClient(partition_id, num_partitions).to_client()
