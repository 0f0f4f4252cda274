"""Stage 4, unmask: every surviving site decrypts the shares its neighbours gave it and
returns, per neighbour, the self-mask seed share if that neighbour sent masked input or the
mask-key share if it dropped, never both (that would reveal the neighbour's input). The
server reconstructs what it needs with t shares each and removes the masks: the result is
exactly the sum of the survivors' inputs modulo 2**bits, or an abort."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcore.errors import SecurityError
from fedcore.secagg import shamir
from fedcore.secagg.common import SEED_BYTES, AbortReason, RoundParams, need
from fedcore.secagg.identity import Identity
from fedcore.secagg.primitives import KeyPair, add_masks, decrypt
from fedcore.secagg.stages.messages import AdvertiseKeys, UnmaskRequest, UnmaskShares, agreed, pairwise_mask

SHARE = shamir.SHARE_BYTES


@dataclass(frozen=True)
class ClientUnmask:
    params: RoundParams
    site: str
    channel_keys: dict[str, bytes]  # neighbour -> the key of the channel with it (share keys)
    ciphertexts: dict[str, bytes]  # sender -> its encrypted shares for this site
    cohort: frozenset[str] = frozenset()  # the survivor set this site signed
    neighbour_keys: dict[str, AdvertiseKeys] | None = None  # verified, with their credentials

    def _signed_by(self, request: UnmaskRequest, identity: Identity | None) -> int:
        """This site and the neighbours whose signatures on the cohort verify."""
        if identity is None or self.neighbour_keys is None:
            return len(request.signatures)  # no identities: the server is trusted to relay
        keys = self.neighbour_keys
        return 1 + sum(
            1
            for peer, signature in request.signatures.items()
            if peer in keys
            and peer in self.cohort
            and identity.verifier.verify(
                peer, keys[peer].credential, signature, agreed(self.params, keys[peer], self.cohort)
            )
        )

    def receive(self, request: UnmaskRequest, identity: Identity | None = None) -> UnmaskShares:
        p = self.params
        need(request.site == self.site, AbortReason.BAD_MESSAGE, "request addressed to another site")
        asked = request.survivors | request.dropped
        need(
            request.cohort == self.cohort
            and request.survivors <= self.cohort
            and not request.dropped & self.cohort,
            AbortReason.INCONSISTENT_REQUEST,
            "shares asked for another survivor set than the one this site signed",
        )
        need(
            self._signed_by(request, identity) >= p.threshold,
            AbortReason.BAD_SIGNATURES,
            f"fewer than {p.threshold} of this site's neighbourhood signed the survivor set",
        )
        need(
            asked <= set(self.ciphertexts),
            AbortReason.INCONSISTENT_REQUEST,
            "shares of sites that gave this site none",
        )
        need(
            len(request.survivors) + 1 >= p.threshold,
            AbortReason.TOO_FEW_SURVIVORS,
            "too few live neighbours",
        )
        seed_shares, key_shares = {}, {}
        for peer in sorted(asked):
            try:
                plaintext = decrypt(
                    self.channel_keys[peer], self.ciphertexts[peer], associated=p.associated(peer, self.site)
                )
            except SecurityError:
                need(False, AbortReason.DECRYPTION_FAILED, f"share from {peer}")
            need(len(plaintext) == 2 * SHARE, AbortReason.BAD_MESSAGE, f"share from {peer}")
            if peer in request.survivors:
                seed_shares[peer] = plaintext[:SHARE]
            else:
                key_shares[peer] = plaintext[SHARE:]
        return UnmaskShares(self.site, seed_shares, key_shares)


@dataclass(frozen=True)
class ServerUnmask:
    params: RoundParams
    keys: dict[str, AdvertiseKeys]
    shared: frozenset[str]
    survivors: frozenset[str]
    total: np.ndarray  # sum of the masked inputs

    def collect(self, messages: list[UnmaskShares]) -> np.ndarray:
        """The sum of the survivors' inputs modulo 2**bits (raises ProtocolAbort otherwise)."""
        p = self.params
        dropped = self.shared - self.survivors
        seeds: dict[str, list[shamir.Share]] = {s: [] for s in self.survivors}
        private_keys: dict[str, list[shamir.Share]] = {d: [] for d in dropped}
        answered: set[str] = set()
        for m in messages:
            need(
                isinstance(m, UnmaskShares),
                AbortReason.BAD_MESSAGE,
                f"{type(m).__name__} in the unmask stage",
            )
            need(
                m.site in self.survivors and m.site not in answered,
                AbortReason.BAD_MESSAGE,
                f"shares from {m.site}",
            )
            answered.add(m.site)
            x = p.index(m.site)
            for peer, y in m.seed_shares.items():
                need(
                    peer in seeds and peer in p.neighbours[m.site],
                    AbortReason.BAD_MESSAGE,
                    f"{m.site} sent a share of {peer}",
                )
                seeds[peer].append(shamir.Share(x, y))
            for peer, y in m.key_shares.items():
                need(
                    peer in private_keys and peer in p.neighbours[m.site],
                    AbortReason.BAD_MESSAGE,
                    f"{m.site} sent a key share of {peer}",
                )
                private_keys[peer].append(shamir.Share(x, y))
        masks: list[tuple[bytes, bool]] = []  # what to remove from the total
        for site, shares in sorted(seeds.items()):
            need(
                len(shares) >= p.threshold,
                AbortReason.NOT_ENOUGH_SHARES,
                f"self-mask seed of {site}: {len(shares)} shares",
            )
            masks.append((_combine(shares, p.threshold, site), True))
        for site, shares in sorted(private_keys.items()):
            need(
                len(shares) >= p.threshold,
                AbortReason.NOT_ENOUGH_SHARES,
                f"mask key of dropped {site}: {len(shares)} shares",
            )
            pair = KeyPair.from_private(_combine(shares, p.threshold, site))
            need(
                pair.public == self.keys[site].mask_public,
                AbortReason.NOT_ENOUGH_SHARES,
                f"shares of {site}'s key are inconsistent",
            )
            # Remove what each surviving neighbour added for the dropped site: the dropped
            # site's own view of that pairwise mask is exactly its negation.
            private = pair.key()
            masks += [
                pairwise_mask(p, private, site, peer, self.keys[peer].mask_public)
                for peer in sorted(p.neighbours[site] & self.survivors)
            ]
        result = self.total.copy()
        add_masks(result, masks)
        return result


def _combine(shares: list[shamir.Share], threshold: int, site: str) -> bytes:
    try:
        return shamir.combine(shares, threshold=threshold, length=SEED_BYTES)
    except ValueError as err:
        need(False, AbortReason.NOT_ENOUGH_SHARES, f"{site}: {err}")
        raise AssertionError("unreachable") from None
