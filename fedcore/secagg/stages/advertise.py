"""Stage 1, advertise keys: every site makes two X25519 key pairs, one to encrypt the shares
it sends its neighbours, one to agree pairwise masks with them, and publishes both."""

from __future__ import annotations

from dataclasses import dataclass

from fedcore.secagg.common import SEED_BYTES, AbortReason, RandBytes, RoundParams, need
from fedcore.secagg.identity import Identity
from fedcore.secagg.primitives import KeyPair
from fedcore.secagg.stages.messages import AdvertiseKeys, NeighbourKeys, advertised
from fedcore.secagg.stages.share_keys import ClientShareKeys, ServerShareKeys


def keypair(randbytes: RandBytes) -> KeyPair:
    return KeyPair.from_private(randbytes(SEED_BYTES))


@dataclass(frozen=True)
class ClientAdvertise:
    params: RoundParams
    site: str
    identity: Identity | None = None  # None: unsigned keys (an honest server is trusted)

    def start(self, randbytes: RandBytes) -> tuple[AdvertiseKeys, ClientShareKeys]:
        self.params.check_safe(self.site)
        cipher, mask = keypair(randbytes), keypair(randbytes)
        message = AdvertiseKeys(self.site, cipher.public, mask.public)
        if self.identity is not None:
            signature = self.identity.signer.sign(advertised(self.params, message))
            message = AdvertiseKeys(
                self.site, cipher.public, mask.public, signature, self.identity.signer.credential
            )
        return message, ClientShareKeys(self.params, self.site, cipher, mask)


@dataclass(frozen=True)
class ServerAdvertise:
    params: RoundParams

    def collect(self, messages: list[AdvertiseKeys]) -> tuple[dict[str, NeighbourKeys], ServerShareKeys]:
        """Forward each live site its live neighbours' keys. Sites that sent nothing dropped out."""
        keys: dict[str, AdvertiseKeys] = {}
        for m in messages:
            need(
                isinstance(m, AdvertiseKeys),
                AbortReason.BAD_MESSAGE,
                f"{type(m).__name__} in the advertise stage",
            )
            need(
                m.site in self.params.neighbours and m.site not in keys,
                AbortReason.BAD_MESSAGE,
                f"keys from {m.site}",
            )
            need(
                len(m.cipher_public) == SEED_BYTES == len(m.mask_public) and m.cipher_public != m.mask_public,
                AbortReason.BAD_MESSAGE,
                f"malformed keys from {m.site}",
            )
            keys[m.site] = m
        seen = [k.cipher_public for k in keys.values()] + [k.mask_public for k in keys.values()]
        need(len(set(seen)) == len(seen), AbortReason.BAD_MESSAGE, "two sites advertised the same key")
        live = set(keys)
        need(
            len(live) >= self.params.threshold,
            AbortReason.TOO_FEW_SURVIVORS,
            f"{len(live)} sites advertised keys",
        )
        out = {
            site: NeighbourKeys(site, {p: keys[p] for p in sorted(self.params.neighbours[site] & live)})
            for site in sorted(live)
        }
        return out, ServerShareKeys(self.params, keys)
