"""Stage 4, unmask: every surviving site returns, per neighbour it exchanged shares with, the
self-mask seed share if that neighbour sent masked input or the mask-key share if it
dropped, never both (that would reveal the neighbour's input), and names the neighbours
whose shares were garbage. The server rebuilds every secret it needs from t shares and
checks it (a seed against its owner's commitment, a key against its advertised public key),
using the extra shares to pass over wrong ones: the result is exactly the sum of the
survivors' inputs modulo 2**bits, or an abort that names the site whose secret is lost."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.secagg import shamir
from fedcore.secagg.common import SEED_BYTES, AbortReason, RoundParams, need
from fedcore.secagg.identity import Identity
from fedcore.secagg.packing import packed, reduce
from fedcore.secagg.primitives import KeyPair, add_masks
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    UnmaskRequest,
    UnmaskShares,
    agreed,
    one_per_site,
    pairwise_mask,
    seed_commitment,
    share_digest,
)

SHARE = shamir.SHARE_BYTES


@dataclass(frozen=True)
class ClientUnmask:
    params: RoundParams
    site: str
    shares: dict[str, bytes]  # sender -> its pair of shares for this site (seed share, key share)
    garbage: frozenset[str] = frozenset()  # senders whose ciphertexts did not decrypt to shares
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
            asked <= set(self.shares) | self.garbage,
            AbortReason.INCONSISTENT_REQUEST,
            "shares of sites that gave this site none",
        )
        need(
            len(request.survivors) + 1 >= p.threshold,
            AbortReason.TOO_FEW_SURVIVORS,
            "too few live neighbours",
        )
        # One half of each pair, by the signed set: a seed share of a survivor, a key share
        # of a site that dropped (survivors and dropped are disjoint, checked above), once
        # per round. A neighbour whose shares were garbage is complained about instead of
        # stopping the round; a complaint releases nothing, so a server that garbles shares
        # in transit only loses them.
        seed_shares = {peer: self.shares[peer][:SHARE] for peer in request.survivors if peer in self.shares}
        key_shares = {peer: self.shares[peer][SHARE:] for peer in request.dropped if peer in self.shares}
        return UnmaskShares(self.site, seed_shares, key_shares, self.garbage & asked)


@dataclass(frozen=True)
class ServerUnmask:
    params: RoundParams
    keys: dict[str, AdvertiseKeys]
    shared: frozenset[str]
    dealt: Mapping[str, Mapping[str, bytes]]  # dealer -> holder -> digests of the pair it dealt
    survivors: frozenset[str]
    total: np.ndarray  # sum of the masked inputs
    # Sites named after the masked inputs were summed, and why: at the consistency check,
    # then by `collect`: a holder that released a share other than the one dealt to it, a
    # dealer whose shares do not fit its secret. A named survivor's input stays in the sum.
    rejected: dict[str, str] = field(default_factory=dict)

    def collect(self, messages: list[UnmaskShares]) -> np.ndarray:
        """The sum of the survivors' inputs modulo 2**bits (raises ProtocolAbort otherwise).

        A share that does not match its dealer's digest is its holder's lie: named, left
        out. The rest are what the dealers dealt; each secret is rebuilt from them and
        checked (a seed against its owner's commitment, a key against its advertised public
        key), and shares off it are their dealer's doing: named. A secret that cannot be
        rebuilt aborts the round, with its owner as the culprit when the fault is its own:
        threshold of the shares it dealt give no secret that passes, or the complaints of
        garbage are what left fewer than threshold readable shares (a complaint alone names
        nobody: it is one site's word against another's). Never a wrong sum: every secret used passed."""
        p = self.params
        dropped = self.shared - self.survivors
        received, bad = one_per_site(messages, UnmaskShares, self.survivors, "unmask answer")
        # A site named at the consistency check was asked for nothing: its reason stands.
        self.rejected.update({s: why for s, why in bad.items() if s not in self.rejected})
        answers: dict[str, UnmaskShares] = {}
        for site, m in received.items():
            held = self.dealt[site].keys()  # the dealers of the shares it holds (pairs are mutual)
            if site in self.rejected:
                continue
            if not (
                m.seed_shares.keys() <= held & self.survivors
                and m.key_shares.keys() <= held & dropped
                and m.complaints <= held
            ):
                self.rejected[site] = "shares of sites it was not asked for"
            else:
                answers[site] = m

        def rebuild(owner: str, kind: str, check: Callable[[bytes], bool]) -> bytes:
            what = "self-mask seed" if kind == "seed" else "mask key"
            shares = []
            for holder, m in sorted(answers.items()):
                y = (m.seed_shares if kind == "seed" else m.key_shares).get(owner)
                if y is None:
                    continue
                pair = self.dealt[owner][holder]  # it holds a share of owner's: they paired
                if share_digest(p, owner, holder, kind, y) != (pair[:32] if kind == "seed" else pair[32:]):
                    self.rejected[holder] = f"a share of the {what} of {owner} other than the one dealt to it"
                else:
                    shares.append(shamir.Share(p.index(holder), y))
            try:
                secret, bad = shamir.recover(shares, threshold=p.threshold, length=SEED_BYTES, check=check)
            except ValueError as err:
                complaints = sum(owner in m.complaints for m in answers.values())
                # The dealer is named when its shares were there but unreadable: the complaints
                # are what left fewer than t. Framing an honest dealer so takes k - t + 1
                # colluding neighbours, as many as can already stop its secret by silence.
                own = len(shares) + complaints >= p.threshold
                detail = f"the {what} of {owner} ({complaints} complaints of garbage): {err}"
                need(False, AbortReason.NOT_ENOUGH_SHARES, detail, culprit=owner if own else None)
                raise AssertionError("unreachable") from None
            if bad:
                self.rejected[owner] = f"dealt shares that do not fit its {what}"
            return secret

        masks: list[tuple[bytes, bool]] = []  # what to remove from the total
        for site in sorted(self.survivors):
            masks.append((rebuild(site, "seed", _committed(p, site, self.keys[site].seed_commitment)), True))
        for site in sorted(dropped):
            peers = sorted(self.dealt[site].keys() & self.survivors)  # those that masked against it
            if not peers:
                continue
            private = KeyPair.from_private(
                rebuild(site, "key", _advertised(self.keys[site].mask_public))
            ).key()
            # Remove what each surviving neighbour added for the dropped site: the dropped
            # site's own view of that pairwise mask is exactly its negation.
            masks += [pairwise_mask(p, private, site, peer, self.keys[peer].mask_public) for peer in peers]
        result = self.total.copy()
        add_masks(result, masks)
        return reduce(result, p.bits) if packed(p.bits) else result


def _committed(params: RoundParams, site: str, commitment: bytes) -> Callable[[bytes], bool]:
    """The check of a rebuilt self-mask seed: the commitment its site signed at advertise."""
    return lambda seed: seed_commitment(params, site, seed) == commitment


def _advertised(mask_public: bytes) -> Callable[[bytes], bool]:
    """The check of a rebuilt mask private key: the public key its site advertised."""
    return lambda private: KeyPair.from_private(private).public == mask_public
