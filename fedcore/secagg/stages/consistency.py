"""Stage 3b, consistency check (Bonawitz et al. CCS'17, the malicious-server variant): every
survivor signs the survivor set the server claims, and answers the unmask request only
with the signatures of at least `threshold` of its neighbourhood (itself included) on that
very set, and only for that set: seed shares of neighbours in it, key shares of neighbours
out of it. An honest site signs one set per round, and only one that holds itself, so the
server cannot have one neighbour reveal a site's self mask (it survived) while others reveal
the keys of its neighbours (they dropped): both views would need a majority of signatures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.secagg.common import MIN_COHORT, AbortReason, RoundParams, need
from fedcore.secagg.identity import Identity
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    UnmaskRequest,
    agreed,
    one_per_site,
)
from fedcore.secagg.stages.unmask import ClientUnmask, ServerUnmask


@dataclass(frozen=True)
class ClientConsistency:
    params: RoundParams
    site: str
    shares: dict[str, bytes]  # sender -> its pair of shares for this site (seed share, key share)
    garbage: frozenset[str]  # senders whose ciphertexts did not decrypt to a pair of shares
    neighbour_keys: dict[str, AdvertiseKeys]  # verified: their credentials check the signatures
    own: AdvertiseKeys  # this site's public keys of this execution, bound into its signature

    def receive(
        self, request: ConsistencyRequest, identity: Identity | None = None
    ) -> tuple[ConsistencySignature, ClientUnmask]:
        p = self.params
        cohort = request.cohort
        need(request.site == self.site, AbortReason.BAD_MESSAGE, "a survivor set addressed to another site")
        need(
            self.site in cohort and cohort <= set(p.participants) and len(cohort) >= MIN_COHORT,
            AbortReason.INCONSISTENT_REQUEST,
            f"a survivor set without this site, with sites outside the round, or under {MIN_COHORT}",
        )
        need(
            len(cohort & p.neighbours[self.site]) + 1 >= p.threshold,
            AbortReason.TOO_FEW_SURVIVORS,
            "too few live neighbours",
        )
        signature = identity.signer.sign(agreed(p, self.own, cohort)) if identity is not None else b""
        state = ClientUnmask(p, self.site, self.shares, self.garbage, cohort, self.neighbour_keys)
        return ConsistencySignature(self.site, signature), state


@dataclass(frozen=True)
class ServerConsistency:
    params: RoundParams
    keys: dict[str, AdvertiseKeys]
    shared: frozenset[str]
    dealt: Mapping[str, Mapping[str, bytes]]  # dealer -> holder -> digests of the shares dealt
    cohort: frozenset[str]  # the survivors: sites whose masked inputs are in the total
    total: np.ndarray
    rejected: dict[str, str] = field(default_factory=dict)  # left out so far, and why

    def collect(self, messages: list[ConsistencySignature]) -> tuple[dict[str, UnmaskRequest], ServerUnmask]:
        """Hand every signer all the signatures, with the shares it must send: self-mask
        shares of surviving neighbours, mask-key shares of the neighbours that dropped. A
        survivor whose message is no signature, or comes twice, is named (its input stays
        in the sum) and asked for nothing, as if it had dropped here."""
        p = self.params
        received, rejected = one_per_site(
            messages, ConsistencySignature, self.cohort, "consistency signature"
        )
        signatures = {s: m.signature for s, m in received.items()}
        need(len(signatures) >= p.threshold, AbortReason.TOO_FEW_SURVIVORS, f"{len(signatures)} signatures")
        dropped = self.shared - self.cohort
        requests = {
            site: UnmaskRequest(
                site,
                survivors=frozenset(self.dealt[site].keys() & self.cohort),
                dropped=frozenset(self.dealt[site].keys() & dropped),
                cohort=self.cohort,
                signatures=dict(signatures),
            )
            for site in sorted(signatures)
        }
        unmask = ServerUnmask(p, self.keys, self.shared, self.dealt, self.cohort, self.total, rejected)
        return requests, unmask
