"""Stage 2, share keys: every site draws its self-mask seed b, splits b and its mask private
key into t-of-k Shamir shares, one pair per neighbour, and encrypts each pair end to end for
that neighbour (AES-GCM under an X25519 + HKDF key, bound to round, sender and recipient).
The server only routes the ciphertexts."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedcore.secagg import shamir
from fedcore.secagg.common import SEED_BYTES, AbortReason, RandBytes, RoundParams, need
from fedcore.secagg.identity import Identity
from fedcore.secagg.primitives import KeyPair, agree, encrypt
from fedcore.secagg.stages.masked_input import ClientMaskedInput, ServerMaskedInput
from fedcore.secagg.stages.messages import AdvertiseKeys, NeighbourKeys, RoutedShares, ShareKeys, verified


def private_bytes(pair: KeyPair) -> bytes:
    return pair.private


@dataclass(frozen=True)
class ClientShareKeys:
    params: RoundParams
    site: str
    cipher: KeyPair
    mask: KeyPair

    def receive(
        self, message: NeighbourKeys, randbytes: RandBytes, identity: Identity | None = None
    ) -> tuple[ShareKeys, ClientMaskedInput]:
        """`identity`: this site's check of its neighbours' signatures (states hold no keys)."""
        p = self.params
        need(message.site == self.site, AbortReason.BAD_MESSAGE, "neighbour keys addressed to another site")
        need(
            set(message.keys) <= p.neighbours[self.site],
            AbortReason.BAD_MESSAGE,
            "keys of sites that are not neighbours",
        )
        # Keys their site did not sign (substituted, replayed, or for other parameters) are
        # left out: this site shares nothing with, and masks against nothing of, them.
        keys = {
            peer: k
            for peer, k in message.keys.items()
            if k.site == peer
            and verified(identity, p, k)
            and len({k.cipher_public, k.mask_public, self.cipher.public, self.mask.public}) == 4
        }
        need(
            len(keys) >= p.threshold, AbortReason.TOO_FEW_NEIGHBOURS, f"{len(keys)} verified live neighbours"
        )
        self_seed = randbytes(SEED_BYTES)
        peers = sorted(keys)
        # One x-coordinate per neighbour (its place among the participants): shares of
        # different sites' secrets held by one neighbour line up for reconstruction.
        xs = {peer: p.index(peer) for peer in peers}
        seed_shares = _shares(self_seed, xs, p.threshold, randbytes)
        key_shares = _shares(private_bytes(self.mask), xs, p.threshold, randbytes)
        # The channel key with each neighbour, kept for decrypting its shares at unmask.
        private = self.cipher.key()
        channel = {
            peer: agree(private, keys[peer].cipher_public, info=p.info("share encryption")) for peer in peers
        }
        ciphertexts = {
            peer: encrypt(
                channel[peer], seed_shares[peer] + key_shares[peer], associated=p.associated(self.site, peer)
            )
            for peer in peers
        }
        own = AdvertiseKeys(self.site, self.cipher.public, self.mask.public)
        state = ClientMaskedInput(p, self.site, channel, self.mask, self_seed, keys, own)
        return ShareKeys(self.site, ciphertexts), state


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
        """Route each ciphertext to its recipient. Sites that sent nothing dropped out; a
        site whose shares are malformed or addressed to other sites is left out (as if it had
        dropped here), with the reason: `ServerMaskedInput.rejected`."""
        p = self.params
        sent: dict[str, ShareKeys] = {}
        rejected: dict[str, str] = {}
        for m in messages:
            site = str(getattr(m, "site", ""))
            need(site in self.keys, AbortReason.BAD_MESSAGE, f"shares from {site!r}")
            if not isinstance(m, ShareKeys):
                rejected[site] = f"{type(m).__name__} in the share-keys stage"
            elif site in sent or site in rejected:
                rejected[site] = "shares sent twice"
            elif set(m.ciphertexts) != p.neighbours[site] & set(self.keys):
                rejected[site] = "shares addressed to other sites than its neighbours"
            else:
                sent[site] = m
        sent = {s: m for s, m in sent.items() if s not in rejected}
        live = set(sent)
        need(len(live) >= p.threshold, AbortReason.TOO_FEW_SURVIVORS, f"{len(live)} sites shared keys")
        routed = {
            site: RoutedShares(
                site, {sender: sent[sender].ciphertexts[site] for sender in sorted(p.neighbours[site] & live)}
            )
            for site in sorted(live)
        }
        return routed, ServerMaskedInput(p, self.keys, frozenset(live), {**self.rejected, **rejected})
