"""Flower `ClientApp`s (the Message API of Flower's current quickstarts) hosted as fedcore
sites: `[task] name = "flower:MODULE:APP"` with `[task] initial = "MODULE:FUNC"`.

Each fit is a `train` message whose content is `"arrays"` (the global model, an ArrayRecord
with fedcore's array names) and `"config"` (the round's training settings, as for hosted
`client_fn`s, plus `"server-round"`); the reply must carry `"arrays"` and a `"metrics"`
MetricRecord with `"num-examples"`. An `evaluate` message carries the arrays and an empty
config; the reply's `"num-examples"`, a loss (`loss`, `eval_loss`) and an accuracy
(`accuracy`, `acc`, `eval_acc` or `eval_accuracy`) are read. Array names are kept as the
app names them. The initial model is FUNC(), an ArrayRecord or a list of arrays.

Messages get Flower's metadata as its simulation would give them (run 0, the node's id,
the round as group id); the node's `Context` is the one `FlowerTask` keeps per node.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Any

import numpy as np

from fedcore.tensors import Arrays

ACCURACY_KEYS = ("accuracy", "acc", "eval_acc", "eval_accuracy")
LOSS_KEYS = ("loss", "eval_loss")
_TTL = 3600.0


def is_client_app(target: object) -> bool:
    try:
        from flwr.clientapp import ClientApp
    except ImportError:
        return False
    return isinstance(target, ClientApp)


def load_initial(spec: str) -> Arrays | list[np.ndarray]:
    """What FUNC() gives for `[task] initial = "MODULE:FUNC"`: named arrays (from an
    ArrayRecord, names kept) or a list of arrays."""
    from flwr.app import ArrayRecord

    module_name, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"[task] initial {spec!r}: cannot load it ({err})") from None
    initial = function()
    if isinstance(initial, ArrayRecord):
        return from_record(initial)
    if isinstance(initial, list | tuple) and all(isinstance(a, np.ndarray) for a in initial):
        return list(initial)
    raise ValueError(
        f"[task] initial {spec!r} returned {type(initial).__name__}, not an ArrayRecord or a list of arrays"
    )


def to_record(arrays: Arrays) -> Any:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: Any) -> Arrays:
    return {name: np.asarray(array.numpy()) for name, array in record.items()}


def _message(kind: str, node_id: int, round_number: int, arrays: Arrays, config: dict[str, Any]) -> Any:
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    metadata = Metadata(
        run_id=0,
        message_id=f"fedcore-{kind}-{round_number}-{node_id}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(round_number),
        created_at=time.time(),
        ttl=_TTL,
        message_type=kind,
    )
    content = RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(config)})
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


def _reply(app: Any, message: Any, context: Any, what: str) -> Any:
    reply = app(message, context)
    if reply.has_error():
        raise ValueError(f"the ClientApp's {what} failed: {reply.error.reason}")
    return reply.content


def train(
    app: Any, context: Any, node_id: int, round_number: int, arrays: Arrays, config: dict[str, Any]
) -> tuple[Arrays, int, dict[str, float]]:
    """The app's trained arrays, its example count and its numeric metrics."""
    content = _reply(
        app,
        _message("train", node_id, round_number, arrays, {**config, "server-round": round_number}),
        context,
        "train",
    )
    if "arrays" not in content or "metrics" not in content:
        raise ValueError("the ClientApp's train reply lacks 'arrays' or 'metrics'")
    metrics = {k: float(v) for k, v in content["metrics"].items() if isinstance(v, int | float)}
    examples = metrics.pop("num-examples", None)
    if examples is None:
        raise ValueError("the ClientApp's train metrics lack 'num-examples'")
    return from_record(content["arrays"]), int(examples), metrics


def evaluate(
    app: Any, context: Any, node_id: int, round_number: int, arrays: Arrays
) -> tuple[float, float, int, dict[str, float]]:
    """Loss, accuracy (NaN when the app reports none), example count and every numeric
    metric under the app's own name."""
    content = _reply(app, _message("evaluate", node_id, round_number, arrays, {}), context, "evaluate")
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    loss = next((float(metrics[k]) for k in LOSS_KEYS if k in metrics), math.nan)
    accuracy = next((float(metrics[k]) for k in ACCURACY_KEYS if k in metrics), math.nan)
    named = {k: float(v) for k, v in metrics.items() if k != "num-examples" and _number(v)}
    return loss, accuracy, int(metrics.get("num-examples", 0)), named


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
