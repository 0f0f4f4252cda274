"""Stage 1, advertise keys: every site makes two X25519 key pairs, one to encrypt the shares
it sends its neighbours, one to agree pairwise masks with them, and draws its self-mask
seed; it publishes both public keys and a commitment to the seed, signed together."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedcore.secagg.common import SEED_BYTES, AbortReason, RandBytes, RoundParams, need
from fedcore.secagg.identity import Identity
from fedcore.secagg.primitives import KeyPair, valid_public
from fedcore.secagg.stages.messages import (
    COMMITMENT_BYTES,
    AdvertiseKeys,
    RevealRequest,
    advertised,
    nonce_commitment,
    one_per_site,
    seed_commitment,
)
from fedcore.secagg.stages.reveal import ClientReveal, ServerReveal


def keypair(randbytes: RandBytes) -> KeyPair:
    return KeyPair.from_private(randbytes(SEED_BYTES))


@dataclass(frozen=True)
class ClientAdvertise:
    params: RoundParams
    site: str
    identity: Identity | None = None  # None: unsigned keys (an honest server is trusted)

    def start(self, randbytes: RandBytes) -> tuple[AdvertiseKeys, ClientReveal]:
        self.params.check_safe(self.site)
        cipher, mask = keypair(randbytes), keypair(randbytes)
        # The seed is drawn now, and committed to, so that the server can check what it
        # rebuilds from shares at unmask.
        seed = randbytes(SEED_BYTES)
        commitment = seed_commitment(self.params, self.site, seed)
        # The nonce too: revealed only once the server has fixed who takes part (`reveal`).
        nonce = randbytes(SEED_BYTES)
        message = AdvertiseKeys(
            self.site,
            cipher.public,
            mask.public,
            seed_commitment=commitment,
            nonce_commitment=nonce_commitment(self.params, self.site, nonce),
        )
        if self.identity is not None:
            signature = self.identity.signer.sign(advertised(self.params, message))
            message = replace(message, signature=signature, credential=self.identity.signer.credential)
        return message, ClientReveal(self.params, self.site, cipher, mask, seed, nonce)


@dataclass(frozen=True)
class ServerAdvertise:
    params: RoundParams

    def collect(self, messages: list[AdvertiseKeys]) -> tuple[dict[str, RevealRequest], ServerReveal]:
        """Fix the set of sites whose keys are accepted, and ask each of them to reveal its
        nonce (`ServerReveal`), showing it the set's nonce commitments. Sites that sent nothing dropped
        out; a site whose message is malformed, repeated or reuses another's key is left out
        with the reason (`ServerReveal.rejected`): one site cannot abort the round.
        Malformed: keys that are not canonical 32-byte X25519 points, low-order points (every
        agreement with one is all zero), one key twice, or a commitment that is no SHA-256."""
        if self.params.beacon:
            raise ValueError("the advertise stage runs on the parameters before the beacon")
        sent, rejected = one_per_site(messages, AdvertiseKeys, self.params.participants, "keys")
        keys: dict[str, AdvertiseKeys] = {}
        for site, m in sent.items():
            if not (
                len(m.cipher_public) == SEED_BYTES == len(m.mask_public) and m.cipher_public != m.mask_public
            ):
                rejected[site] = "malformed keys"
            elif not (valid_public(m.cipher_public) and valid_public(m.mask_public)):
                rejected[site] = "a low-order or non-canonical X25519 key"
            elif not len(m.seed_commitment) == COMMITMENT_BYTES == len(m.nonce_commitment):
                rejected[site] = "a malformed seed or nonce commitment"
            else:
                keys[site] = m
        owners: dict[bytes, list[str]] = {}
        for k in keys.values():
            for public in (k.cipher_public, k.mask_public):
                owners.setdefault(public, []).append(k.site)
        for sites in owners.values():
            if len(sites) > 1:  # a copied key: neither copy is trusted
                rejected.update(dict.fromkeys(sites, "a key another site also advertised"))
        keys = {s: k for s, k in keys.items() if s not in rejected}
        live = set(keys)
        need(
            len(live) >= self.params.threshold,
            AbortReason.TOO_FEW_SURVIVORS,
            f"{len(live)} sites advertised keys",
        )
        reveal = ServerReveal(self.params, keys, rejected)
        return reveal.requests(), reveal
