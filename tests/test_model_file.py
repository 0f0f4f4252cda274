"""The stored model file is made in pieces without copying the model, and is byte for byte
the file safetensors' own `save` writes (so its SHA-256, the model's identity in lineage
and audit logs, is the one any safetensors tool computes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load, save

from fedcore.engine.model_file import (
    MODEL_METADATA,
    load_ordered,
    model_blob,
    model_digest,
    model_pieces,
    sha256_of,
)

DTYPES = [
    np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
    np.uint8, np.uint16, np.uint32, np.uint64, np.bool_,
]  # fmt: skip


def library(round: int, model: dict[str, np.ndarray]) -> bytes:
    about = json.dumps({"round": round, "names": list(model)})
    contiguous = {k: np.ascontiguousarray(v).reshape(v.shape) for k, v in model.items()}
    return save(contiguous, metadata={MODEL_METADATA: about})


def models() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    every_dtype = {f"t{i}.{np.dtype(d).name}": (rng.random(5) * 100).astype(d) for i, d in enumerate(DTYPES)}
    return [
        {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)},
        dict(reversed(list(every_dtype.items()))),  # saved in an order that is not the layout's
        {"layer.1": np.ones(3), "layer.10": np.ones(2), "Layer.2": np.ones(1), "é": np.ones(2, np.int64)},
        {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5), "x": np.ones(7, np.uint8)},
        {"strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2], "big": np.arange(3, dtype=">f4")},
    ]


@pytest.mark.parametrize("model", models(), ids=["mlp", "dtypes", "names", "shapes", "layouts"])
def test_the_pieces_are_the_file_safetensors_writes(model: dict[str, np.ndarray]) -> None:
    expected = library(7, {k: v.astype(v.dtype.newbyteorder("<")) for k, v in model.items()})
    assert model_blob(7, model) == expected
    assert sha256_of(model_pieces(7, model)) == model_digest(7, model)
    loaded = load_ordered(expected)
    assert list(loaded) == list(model)  # the order the model was given in
    for name, value in model.items():
        assert loaded[name].shape == value.shape and loaded[name].dtype == value.dtype.newbyteorder("=")
        np.testing.assert_array_equal(loaded[name], value)
    assert set(load(expected)) == set(model)


def test_the_tensors_are_not_copied() -> None:
    w = np.ones(1 << 20, np.float32)
    pieces = model_pieces(1, {"w": w})
    assert len(pieces) == 2 and np.shares_memory(np.frombuffer(pieces[1], np.uint8), w)


def test_what_safetensors_cannot_store_is_refused() -> None:
    with pytest.raises(ValueError, match="no dtype"):
        model_pieces(1, {"c": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match="__metadata__"):
        model_pieces(1, {"__metadata__": np.ones(2)})
