"""A round's model as the store keeps it: a safetensors file, made as pieces (its header, then
views of the tensors' bytes) so that storing, hashing and writing it never copies the model.

`safetensors.numpy.save` makes the whole file as one buffer, and copies every tensor into a
bytes object on the way (`tobytes`): two model copies, which a 512 MiB model held for each
round's commit. The layout here is the library's own, byte for byte (tests pin it against
`save` for every dtype): tensors ordered by dtype, then by name, and the JSON header padded
with spaces to a multiple of 8 bytes. Reading stays with the library (`load_ordered`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable

import numpy as np
from safetensors.numpy import load

from fedcore.engine.run_state import safetensors_metadata
from fedcore.tensors import Arrays

MODEL_METADATA = "fedcore.model"

# safetensors' dtype names, in the order it lays tensors out (its `Dtype` enum's, descending).
_LAYOUT = [
    (np.uint64, "U64"), (np.int64, "I64"), (np.float64, "F64"), (np.float32, "F32"),
    (np.uint32, "U32"), (np.int32, "I32"), (np.float16, "F16"), (np.uint16, "U16"),
    (np.int16, "I16"), (np.int8, "I8"), (np.uint8, "U8"), (np.bool_, "BOOL"),
]  # fmt: skip
_NAMES = {np.dtype(t): name for t, name in _LAYOUT}
_RANK = {np.dtype(t): rank for rank, (t, _) in enumerate(_LAYOUT)}


def model_pieces(round: int, model: Arrays) -> list[bytes | memoryview]:
    """The model's safetensors file as pieces to be written one after another."""
    arrays = {}
    for name, value in model.items():
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named __metadata__ (safetensors' header entry)")
        value = np.asarray(value)  # little-endian, C order: a copy only when it is not already
        array = np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C")
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: safetensors has no dtype for {array.dtype}")
        arrays[name] = array
    order = sorted(arrays, key=lambda n: (_RANK[arrays[n].dtype], n.encode()))
    about = json.dumps({"round": round, "names": list(model)})
    header: dict[str, object] = {"__metadata__": {MODEL_METADATA: about}}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    views = [arrays[name].reshape(-1).view(np.uint8).data for name in order]
    return [struct.pack("<Q", len(text)) + text, *(v for v in views if v.nbytes)]


def sha256_of(pieces: Iterable[bytes | memoryview]) -> str:
    hashed = hashlib.sha256()
    for piece in pieces:
        hashed.update(piece)
    return hashed.hexdigest()


def model_blob(round: int, model: Arrays) -> bytes:
    """The whole file in one buffer (small models, tests)."""
    return b"".join(model_pieces(round, model))


def model_digest(round: int, model: Arrays) -> str:
    """The SHA-256 of the model's stored form: its identity in lineage and audit logs."""
    return sha256_of(model_pieces(round, model))


def load_ordered(blob: bytes) -> dict[str, np.ndarray]:
    """A safetensors buffer's tensors in the order they were saved in (safetensors sorts them)."""
    arrays: dict[str, np.ndarray] = load(blob)
    about = json.loads(safetensors_metadata(blob).get(MODEL_METADATA, "{}"))
    names = about.get("names") or sorted(arrays)
    return {name: arrays[name] for name in names}
