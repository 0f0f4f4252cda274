"""Stage 2, share keys: every site splits its self-mask seed b (drawn and committed to at
advertise) and its mask private key into t-of-k Shamir shares, one pair per neighbour whose
keys it verified, and encrypts each pair end to end for that neighbour (AES-GCM under an
X25519 + HKDF key, bound to round, sender and recipient). The server only routes the
ciphertexts, between the pairs of sites that each addressed the other."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fedcore.secagg import shamir
from fedcore.secagg.common import AbortReason, RandBytes, RoundParams, need
from fedcore.secagg.identity import Identity
from fedcore.secagg.primitives import KeyPair, agree, encrypt, valid_public
from fedcore.secagg.stages.masked_input import ClientMaskedInput, ServerMaskedInput
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    NeighbourKeys,
    RoutedShares,
    ShareKeys,
    beacon,
    dealt,
    nonce_commitment,
    one_per_site,
    verified,
)

DEALT_BYTES = 64  # the two digests of a pair of shares


def private_bytes(pair: KeyPair) -> bytes:
    return pair.private


@dataclass(frozen=True)
class ClientShareKeys:
    params: RoundParams
    site: str
    cipher: KeyPair
    mask: KeyPair
    self_seed: bytes  # committed to in this site's advertisement
    commitments: dict[str, bytes] = field(default_factory=dict)  # the nonce commitments shown at reveal

    def receive(
        self, message: NeighbourKeys, randbytes: RandBytes, identity: Identity | None = None
    ) -> tuple[ShareKeys, ClientMaskedInput]:
        """`identity`: this site's check of its neighbours' signatures (states hold no keys).
        The nonces must be those the commitments shown at reveal bind, all of them: their
        beacon draws the graph, which this site computes itself."""
        base = self.params.base
        need(message.site == self.site, AbortReason.BAD_MESSAGE, "neighbour keys addressed to another site")
        need(
            set(message.nonces) == set(self.commitments)
            and all(nonce_commitment(base, s, n) == self.commitments[s] for s, n in message.nonces.items()),
            AbortReason.BAD_REVEAL,
            "nonces that do not match the commitments shown at reveal",
        )
        p = replace(base, beacon=beacon(base, message.nonces))
        p.check_safe(self.site)
        need(
            set(message.keys) <= p.neighbours[self.site] & set(self.commitments),
            AbortReason.BAD_MESSAGE,
            "keys of sites that are not neighbours",
        )
        # Keys their site did not sign (substituted, replayed, or for other parameters, or
        # with another nonce commitment than the reveal showed), and
        # keys no secret can be agreed with (low-order points: the agreement is all zero),
        # are left out: this site shares nothing with, and masks against nothing of, them.
        keys = {
            peer: k
            for peer, k in message.keys.items()
            if k.site == peer
            and k.nonce_commitment == self.commitments.get(peer)  # the one shown at reveal
            and verified(identity, p, k)
            and valid_public(k.cipher_public)
            and valid_public(k.mask_public)
            and len({k.cipher_public, k.mask_public, self.cipher.public, self.mask.public}) == 4
        }
        need(
            len(keys) >= p.threshold, AbortReason.TOO_FEW_NEIGHBOURS, f"{len(keys)} verified live neighbours"
        )
        peers = sorted(keys)
        # One x-coordinate per neighbour (its place among the participants): shares of
        # different sites' secrets held by one neighbour line up for reconstruction.
        xs = {peer: p.index(peer) for peer in peers}
        seed_shares = _shares(self.self_seed, xs, p.threshold, randbytes)
        key_shares = _shares(private_bytes(self.mask), xs, p.threshold, randbytes)
        # The channel key with each neighbour, kept for decrypting its shares.
        private = self.cipher.key()
        channel = {
            peer: agree(private, keys[peer].cipher_public, info=p.info("share encryption")) for peer in peers
        }
        pairs = {peer: seed_shares[peer] + key_shares[peer] for peer in peers}
        ciphertexts = {
            peer: encrypt(channel[peer], pairs[peer], associated=p.associated(self.site, peer))
            for peer in peers
        }
        digests = {peer: dealt(p, self.site, peer, pairs[peer]) for peer in peers}
        own = AdvertiseKeys(self.site, self.cipher.public, self.mask.public)
        state = ClientMaskedInput(p, self.site, channel, self.mask, self.self_seed, keys, own)
        return ShareKeys(self.site, ciphertexts, digests), state


def _shares(secret: bytes, xs: dict[str, int], threshold: int, randbytes: RandBytes) -> dict[str, bytes]:
    """Shamir shares of `secret` evaluated at each neighbour's x-coordinate."""
    top = max(xs.values())
    every = shamir.split(secret, shares=top, threshold=threshold, randbytes=randbytes)
    return {peer: every[x - 1].y for peer, x in xs.items()}


@dataclass(frozen=True)
class ServerShareKeys:
    params: RoundParams
    keys: dict[str, AdvertiseKeys]  # the sites that advertised keys
    rejected: dict[str, str] = field(default_factory=dict)  # left out at advertise, and why

    def collect(self, messages: list[ShareKeys]) -> tuple[dict[str, RoutedShares], ServerMaskedInput]:
        """Route each ciphertext, with its digests, to its recipient. Sites that sent nothing
        dropped out; a site whose shares are malformed or addressed to sites other than its
        live neighbours is left out (as if it had dropped here), with the reason in
        `ServerMaskedInput.rejected`.

        A site leaves out neighbours whose keys it did not verify, so two sites share secrets
        and masks only when each addressed the other (`ServerMaskedInput.dealt`), and a site
        with fewer than threshold such pairs is left out (its secrets could not be rebuilt):
        named if most of its live neighbours did not pair with it (its keys did not verify:
        framing it would take a majority of its neighbourhood), else routed no shares at all,
        so that it declines the stage like a site whose neighbours dropped out."""
        p = self.params
        received, rejected = one_per_site(messages, ShareKeys, self.keys, "shares")
        sent: dict[str, ShareKeys] = {}
        for site, m in received.items():
            if not set(m.ciphertexts) <= p.neighbours[site] & set(self.keys):
                rejected[site] = "shares addressed to other sites than its neighbours"
            elif set(m.digests) != set(m.ciphertexts) or any(
                len(d) != DEALT_BYTES for d in m.digests.values()
            ):
                rejected[site] = "malformed share digests"
            else:
                sent[site] = m
        declined: set[str] = set()
        while True:  # leaving a site out takes pairs from its neighbours: until none falls short
            pairs = {
                s: frozenset(q for q in m.ciphertexts if q in sent and s in sent[q].ciphertexts)
                for s, m in sent.items()
            }
            short = {s for s, q in pairs.items() if len(q) < p.threshold}
            if not short:
                break
            for s in short:
                if 2 * len(pairs[s]) < len(p.neighbours[s] & set(sent)):
                    rejected[s] = "most of its neighbours did not exchange shares with it"
                else:
                    declined.add(s)
            sent = {s: m for s, m in sent.items() if s not in short}
        need(len(sent) >= p.threshold, AbortReason.TOO_FEW_SURVIVORS, f"{len(sent)} sites shared keys")
        routed = {
            site: RoutedShares(
                site,
                {sender: sent[sender].ciphertexts[site] for sender in sorted(pairs[site])},
                {sender: sent[sender].digests[site] for sender in sorted(pairs[site])},
            )
            for site in sorted(sent)
        }
        routed |= {site: RoutedShares(site, {}) for site in sorted(declined)}
        digests = {
            dealer: {holder: sent[dealer].digests[holder] for holder in pairs[dealer]} for dealer in sent
        }
        return routed, ServerMaskedInput(
            p, self.keys, frozenset(sent), digests, {**self.rejected, **rejected}
        )
