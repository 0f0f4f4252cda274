"""Named arrays <-> one flat vector, in the model's (template's) order."""

from __future__ import annotations

import numpy as np

from fedcore.tensors.codec import Arrays


def flatten(arrays: Arrays, template: Arrays, dtype: type = np.float64) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=dtype).ravel() for k in template])


def unflatten(flat: np.ndarray, template: Arrays) -> Arrays:
    """The first entries of `flat` cut back into arrays shaped like `template` (views)."""
    out: Arrays = {}
    offset = 0
    for name, ref in template.items():
        out[name] = flat[offset : offset + ref.size].reshape(ref.shape)
        offset += ref.size
    return out
