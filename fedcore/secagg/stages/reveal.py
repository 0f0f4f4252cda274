"""Stage 1b, reveal: the randomness that draws the neighbour graph. Every site committed to
a random nonce at advertise; once the server has fixed the sites whose keys it accepted, it
shows each of them that set's commitments, and each site whose own commitment is there
reveals its nonce. The beacon is the hash of every nonce: the server fixed the set before it
knew an honest site's nonce, so it cannot pick the graph by searching sessions or sets
offline. It can only abort the attempt to draw again, which every site caps per round."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fedcore.secagg.common import MIN_COHORT, SEED_BYTES, AbortReason, RoundParams, need
from fedcore.secagg.primitives import KeyPair
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    NeighbourKeys,
    NonceReveal,
    RevealRequest,
    beacon,
    nonce_commitment,
)
from fedcore.secagg.stages.share_keys import ClientShareKeys, ServerShareKeys


@dataclass(frozen=True)
class ClientReveal:
    params: RoundParams  # before the beacon
    site: str
    cipher: KeyPair
    mask: KeyPair
    self_seed: bytes
    nonce: bytes  # committed to in this site's advertisement

    def receive(
        self, request: RevealRequest, min_cohort: int = MIN_COHORT
    ) -> tuple[NonceReveal, ClientShareKeys]:
        """Reveal the nonce only into a set that holds this site's own commitment, of at least
        `min_cohort` sites of the round: the commitments shown here are what the nonces the
        server forwards next must match (`ClientShareKeys.receive`)."""
        p, commitments = self.params, dict(request.commitments)
        need(request.site == self.site, AbortReason.BAD_MESSAGE, "a reveal request addressed to another site")
        need(
            commitments.get(self.site) == nonce_commitment(p, self.site, self.nonce),
            AbortReason.BAD_REVEAL,
            "the commitments shown lack this site's own",
        )
        need(
            set(commitments) <= set(p.participants) and len(commitments) >= max(min_cohort, MIN_COHORT),
            AbortReason.UNSAFE_PARAMETERS,
            f"{len(commitments)} sites (or sites outside the round) take part; this site's policy needs {min_cohort}",
        )
        state = ClientShareKeys(p, self.site, self.cipher, self.mask, self.self_seed, commitments)
        return NonceReveal(self.site, self.nonce), state


@dataclass(frozen=True)
class ServerReveal:
    params: RoundParams  # before the beacon
    keys: dict[str, AdvertiseKeys]  # the fixed set: the sites whose keys were accepted
    rejected: dict[str, str] = field(default_factory=dict)  # left out at advertise, and why

    def requests(self) -> dict[str, RevealRequest]:
        commitments = {s: k.nonce_commitment for s, k in sorted(self.keys.items())}
        return {site: RevealRequest(site, dict(commitments)) for site in sorted(self.keys)}

    def collect(self, messages: list[NonceReveal]) -> tuple[dict[str, NeighbourKeys], ServerShareKeys]:
        """Every site of the set must reveal the nonce it committed to: a missing one aborts
        the attempt (it is retried), a wrong or repeated one names its site. Then forward each
        site its neighbours' keys in the graph the beacon draws, and every nonce."""
        nonces: dict[str, bytes] = {}
        for m in messages:
            site = str(getattr(m, "site", ""))
            need(site in self.keys, AbortReason.BAD_MESSAGE, f"a nonce from {site!r}")
            need(
                isinstance(m, NonceReveal)
                and site not in nonces
                and len(m.nonce) == SEED_BYTES
                and nonce_commitment(self.params, site, m.nonce) == self.keys[site].nonce_commitment,
                AbortReason.BAD_REVEAL,
                f"{site} revealed a nonce that does not match its commitment, or revealed twice",
                culprit=site,
            )
            assert isinstance(m, NonceReveal)
            nonces[site] = m.nonce
        missing = sorted(set(self.keys) - set(nonces))
        need(not missing, AbortReason.MISSING_REVEAL, f"{len(missing)} sites revealed no nonce")
        p = replace(self.params, beacon=beacon(self.params, nonces))
        live = set(self.keys)
        out = {
            site: NeighbourKeys(
                site, {q: self.keys[q] for q in sorted(p.neighbours[site] & live)}, dict(nonces)
            )
            for site in sorted(live)
        }
        return out, ServerShareKeys(p, self.keys, self.rejected)
