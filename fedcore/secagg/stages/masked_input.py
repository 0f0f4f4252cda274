"""Stage 3, masked input: every site adds to its input, modulo 2**bits, a self mask expanded
from its seed b and, for each neighbour that shared keys, a pairwise mask expanded from the
X25519 + HKDF secret they agree on: + for the neighbour after it, - for the one before, so
that the pairwise masks of two live neighbours cancel in the sum."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcore.secagg.common import AbortReason, RoundParams, need
from fedcore.secagg.primitives import KeyPair, add_masks
from fedcore.secagg.stages.consistency import ClientConsistency, ServerConsistency
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    MaskedInput,
    RoutedShares,
    dtype,
    pairwise_mask,
)


@dataclass(frozen=True)
class ClientMaskedInput:
    params: RoundParams
    site: str
    channel_keys: dict[str, bytes]  # neighbour -> the key its shares for this site are encrypted with
    mask: KeyPair
    self_seed: bytes
    neighbour_keys: dict[str, AdvertiseKeys]  # verified
    own: AdvertiseKeys  # this site's public keys of this execution

    def receive(
        self, message: RoutedShares, quantized: np.ndarray, *, in_place: bool = False
    ) -> tuple[MaskedInput, ClientConsistency]:
        """Mask `quantized` (integers modulo 2**bits) against the neighbours that shared keys;
        `in_place` masks the caller's array itself (a copy of 4 MB per 1M parameters saved)."""
        p = self.params
        need(message.site == self.site, AbortReason.BAD_MESSAGE, "shares addressed to another site")
        # Shares from a sender whose keys this site did not verify are left out: it masks
        # against nothing it could not check.
        ciphertexts = {s: c for s, c in message.ciphertexts.items() if s in self.neighbour_keys}
        need(
            len(ciphertexts) >= p.threshold,
            AbortReason.TOO_FEW_NEIGHBOURS,
            f"{len(ciphertexts)} verified neighbours shared keys",
        )
        need(
            quantized.shape == (p.length,) and quantized.dtype == dtype(p),
            AbortReason.BAD_MESSAGE,
            "input of the wrong shape or type",
        )
        masked = quantized if in_place else quantized.copy()
        private = self.mask.key()
        masks = [(self.self_seed, False)] + [
            pairwise_mask(p, private, self.site, peer, self.neighbour_keys[peer].mask_public)
            for peer in sorted(ciphertexts)
        ]
        add_masks(masked, masks)
        state = ClientConsistency(p, self.site, self.channel_keys, ciphertexts, self.neighbour_keys, self.own)
        return MaskedInput(self.site, masked), state


@dataclass(frozen=True)
class ServerMaskedInput:
    params: RoundParams
    keys: dict[str, AdvertiseKeys]
    shared: frozenset[str]  # the sites that shared keys

    def collect(self, messages: list[MaskedInput]) -> tuple[dict[str, ConsistencyRequest], ServerConsistency]:
        """Sum the masked inputs; ask every site that sent one to sign the survivor set."""
        p = self.params
        total = np.zeros(p.length, dtype=dtype(p))
        survivors: set[str] = set()
        for m in messages:
            need(
                isinstance(m, MaskedInput),
                AbortReason.BAD_MESSAGE,
                f"{type(m).__name__} in the masked-input stage",
            )
            need(
                m.site in self.shared and m.site not in survivors,
                AbortReason.BAD_MESSAGE,
                f"masked input from {m.site}",
            )
            need(
                m.vector.shape == (p.length,) and m.vector.dtype == dtype(p),
                AbortReason.BAD_MESSAGE,
                f"{m.site}'s vector",
            )
            total += m.vector
            survivors.add(m.site)
        need(len(survivors) >= p.threshold, AbortReason.TOO_FEW_SURVIVORS, f"{len(survivors)} masked inputs")
        cohort = frozenset(survivors)
        requests = {site: ConsistencyRequest(site, cohort) for site in sorted(survivors)}
        return requests, ServerConsistency(p, self.keys, self.shared, cohort, total)
