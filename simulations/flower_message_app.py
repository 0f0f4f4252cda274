"""A Flower `ClientApp` in the Message API, as Flower's quickstarts write it: logistic
regression in numpy on the breast-cancer data, each node training on its own partition.

Run it in fedcore unchanged:

    PYTHONPATH=simulations fedcore simulate --task flower:flower_message_app:app \\
        --sites 3 --rounds 5 --config simulations/flower_message_app.toml

(`[task] initial = "flower_message_app:initial_arrays"` gives the initial model.)
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_breast_cancer

app = ClientApp()
FEATURES = 30


def partition(context: Context) -> tuple[np.ndarray, np.ndarray]:
    """The node's rows (every num-partitions-th one, from its partition id), standardised."""
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    part, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    return x[part::parts], y[part::parts].astype(np.float64)


def initial_arrays() -> ArrayRecord:
    return ArrayRecord({"weights": Array(np.zeros(FEATURES)), "bias": Array(np.zeros(1))})


def _loss(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    p = 1.0 / (1.0 + np.exp(-(x @ w + b[0])))
    eps = 1e-12
    return float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))), p


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays, config = msg.content["arrays"], msg.content["config"]
    w, b = arrays["weights"].numpy().copy(), arrays["bias"].numpy().copy()
    x, y = partition(context)
    lr, epochs = float(config.get("lr", 0.1)), int(config.get("local_epochs", 1))
    for _ in range(epochs):  # one full-batch gradient step per epoch
        _, p = _loss(w, b, x, y)
        w -= lr * x.T @ (p - y) / len(y)
        b -= lr * np.array([np.mean(p - y)])
    loss, _ = _loss(w, b, x, y)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"weights": Array(w), "bias": Array(b)}),
            "metrics": MetricRecord({"num-examples": len(y), "train_loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    w, b = arrays["weights"].numpy(), arrays["bias"].numpy()
    x, y = partition(context)
    loss, p = _loss(w, b, x, y)
    accuracy = float(np.mean((p > 0.5) == (y > 0.5)))
    metrics = MetricRecord({"num-examples": len(y), "eval_loss": loss, "eval_acc": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
