"""Stage 3, masked input: every site adds to its input, modulo 2**bits, a self mask expanded
from its seed b and, for each neighbour that shared keys, a pairwise mask expanded from the
X25519 + HKDF secret they agree on: + for the neighbour after it, - for the one before, so
that the pairwise masks of two live neighbours cancel in the sum. A site decrypts the
shares its neighbours sent it now and checks them against their senders' digests: a
neighbour whose shares are garbage is still masked against (it masks against this site:
the pair must cancel), and complained about at unmask instead of stopping the round. Below
32 bits the masked vector travels packed to its low bits (`fedcore.secagg.packing`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.errors import SecurityError
from fedcore.secagg.common import AbortReason, ProtocolAbort, RoundParams, need
from fedcore.secagg.packing import pack, packed, unpack
from fedcore.secagg.primitives import KeyPair, add_masks, decrypt
from fedcore.secagg.shamir import SHARE_BYTES
from fedcore.secagg.stages.consistency import ClientConsistency, ServerConsistency
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    MaskedInput,
    RoutedShares,
    dealt,
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
        shares, garbage = self._open(ciphertexts, message.digests)
        state = ClientConsistency(p, self.site, shares, garbage, self.neighbour_keys, self.own)
        return MaskedInput(self.site, pack(masked, p.bits) if packed(p.bits) else masked), state

    def _open(
        self, ciphertexts: dict[str, bytes], digests: dict[str, bytes]
    ) -> tuple[dict[str, bytes], frozenset[str]]:
        """The pairs of shares that decrypt to what their senders published, and the senders
        of the others: one neighbour's garbage must not stop this site's round."""
        p, shares = self.params, {}
        for sender, ciphertext in ciphertexts.items():
            try:
                plain = decrypt(
                    self.channel_keys[sender], ciphertext, associated=p.associated(sender, self.site)
                )
            except SecurityError:
                continue
            if len(plain) == 2 * SHARE_BYTES and dealt(p, sender, self.site, plain) == digests.get(sender):
                shares[sender] = plain
        return shares, frozenset(ciphertexts) - frozenset(shares)


@dataclass(frozen=True)
class ServerMaskedInput:
    params: RoundParams
    keys: dict[str, AdvertiseKeys]
    shared: frozenset[str]  # the sites that shared keys
    # dealer -> holder -> the digests of the pair of shares it dealt: the pairs of sites that
    # exchanged shares, and so masks (each addressed the other)
    dealt: Mapping[str, Mapping[str, bytes]]
    rejected: dict[str, str] = field(default_factory=dict)  # left out so far, and why

    def collect(self, messages: list[MaskedInput]) -> tuple[dict[str, ConsistencyRequest], ServerConsistency]:
        """Sum the masked inputs; ask every site that sent one to sign the survivor set
        (`summing`, all at once)."""
        running = self.summing()
        for message in messages:
            running.add(message)
        return running.close()

    def summing(self) -> MaskedSum:
        """The sum of the masked inputs, folded one at a time as they arrive."""
        return MaskedSum(self, np.zeros(self.params.length, dtype=dtype(self.params)))


@dataclass
class MaskedSum:
    """The server's running sum of masked inputs: it holds one vector, not one a site, and
    the sum is the same whatever the order they arrive in (addition modulo 2**bits). A site
    whose vector is malformed is left out, as if it had dropped before its masked input (its
    neighbours' shares remove its pairwise masks). A site that sends two fails the attempt,
    named: the first is in the sum already, and nothing is kept to take it back out (over
    the network a site answers a request once, under its own name: `SecureSum`)."""

    stage: ServerMaskedInput
    total: np.ndarray
    added: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)
    twice: set[str] = field(default_factory=set)

    def add(self, message: object) -> None:
        p = self.stage.params
        site = str(getattr(message, "site", ""))
        need(site in p.participants, AbortReason.BAD_MESSAGE, f"masked input from {site!r}")
        if site in self.added or site in self.rejected:
            self.twice.add(site)
            return
        if not isinstance(message, MaskedInput):
            self.rejected[site] = f"{type(message).__name__} in place of masked input"
            return
        vector = self._vector(site, message)
        if vector is not None:
            self.total += vector  # uint wraps: modulo 2**32 or 2**64, which 2**bits divides
            self.added.add(site)

    def _vector(self, site: str, message: MaskedInput) -> np.ndarray | None:
        p = self.stage.params
        if site not in self.stage.shared:  # routed no shares: an honest site declines
            self.rejected[site] = "a masked input it was not asked for"
        elif packed(p.bits):
            try:
                return unpack(message.vector, p.bits, p.length)
            except ValueError:
                self.rejected[site] = "a masked input of the wrong length or type"
        elif message.vector.shape != (p.length,) or message.vector.dtype != dtype(p):
            self.rejected[site] = "a masked input of the wrong length or type"
        else:
            return message.vector
        return None

    def close(self) -> tuple[dict[str, ConsistencyRequest], ServerConsistency]:
        """Ask every site in the sum to sign the survivor set."""
        s = self.stage
        if self.twice:
            raise ProtocolAbort(AbortReason.BAD_MESSAGE, "masked input sent twice", min(self.twice))
        need(
            len(self.added) >= s.params.threshold,
            AbortReason.TOO_FEW_SURVIVORS,
            f"{len(self.added)} masked inputs",
        )
        cohort = frozenset(self.added)
        requests = {site: ConsistencyRequest(site, cohort) for site in sorted(cohort)}
        return requests, ServerConsistency(
            s.params, s.keys, s.shared, s.dealt, cohort, self.total, {**s.rejected, **self.rejected}
        )
