"""The SecAgg+ stage messages, and what the stages share: masks and vector types. Stage
modules import only this module and the next stage's (no cycles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.secagg.common import RoundParams
from fedcore.secagg.primitives import agree


@dataclass(frozen=True)
class AdvertiseKeys:
    site: str
    cipher_public: bytes  # for the share encryption keys
    mask_public: bytes  # for the pairwise mask seeds


@dataclass(frozen=True)
class NeighbourKeys:
    """What the server forwards to a site: its live neighbours' public keys."""

    site: str
    keys: dict[str, AdvertiseKeys]


@dataclass(frozen=True)
class ShareKeys:
    site: str
    ciphertexts: dict[str, bytes]  # neighbour -> its encrypted pair of shares


@dataclass(frozen=True)
class RoutedShares:
    """What the server hands a site: the ciphertexts its neighbours addressed to it."""

    site: str
    ciphertexts: dict[str, bytes]  # sender -> ciphertext


@dataclass(frozen=True)
class MaskedInput:
    site: str
    vector: np.ndarray  # uint32 or uint64, length params.length


def dtype(params: RoundParams) -> type[np.unsignedinteger[Any]]:
    return np.uint32 if params.bits == 32 else np.uint64


def pairwise_mask(
    params: RoundParams,
    mask_private: X25519PrivateKey,
    me: str,
    peer: str,
    peer_mask_public: bytes,
    *,
    negate: bool = False,
) -> tuple[bytes, bool]:
    """The mask `me` adds for `peer`, as (seed, subtract) for `add_masks`: +PRG(s) if me
    sorts before peer, else -PRG(s) (mod 2**bits); `negate` gives its removal instead."""
    secret = agree(mask_private, peer_mask_public, info=params.info("pairwise mask"))
    return secret, (params.index(me) > params.index(peer)) != negate


@dataclass(frozen=True)
class UnmaskRequest:
    site: str
    survivors: frozenset[str]  # neighbours that sent masked input: send their seed shares
    dropped: frozenset[str]  # neighbours that shared keys but sent no input: send key shares


@dataclass(frozen=True)
class UnmaskShares:
    site: str
    seed_shares: dict[str, bytes]  # survivor -> share of its self-mask seed
    key_shares: dict[str, bytes]  # dropped site -> share of its mask private key
