"""Every random choice that is not a protocol secret is seeded by (experiment seed, labels...).

Labels name the purpose, round and site, e.g. `derive_seed(seed, "train", round, "site-3")`,
so a run is reproducible whatever the number of workers, the backend or the transport.
Protocol secrets (keys, masks, DP noise) never come from here.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed from the experiment seed and labels (stable across processes and runs)."""
    text = "\x1f".join(str(x) for x in (seed, *labels)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def rng(seed: int, *labels: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *labels))
