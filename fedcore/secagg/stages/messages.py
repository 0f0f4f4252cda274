"""The SecAgg+ stage messages, and what the stages share: masks and vector types. Stage
modules import only this module and the next stage's (no cycles)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.secagg.common import AbortReason, RoundParams, need
from fedcore.secagg.identity import Identity, signed_bytes
from fedcore.secagg.primitives import agree

COMMITMENT_BYTES = 32  # a seed commitment: SHA-256


@dataclass(frozen=True)
class AdvertiseKeys:
    site: str
    cipher_public: bytes  # for the share encryption keys
    mask_public: bytes  # for the pairwise mask seeds
    signature: bytes = b""  # the site's, over the session, the parameters, both keys, the commitment
    credential: bytes = b""  # what proves the signing key (its certificate)
    seed_commitment: bytes = b""  # SHA-256 binding the self-mask seed: see `seed_commitment`
    nonce_commitment: bytes = b""  # SHA-256 binding the site's beacon nonce: see `nonce_commitment`


@dataclass(frozen=True)
class RevealRequest:
    """The server's fixed set of sites (those whose keys it accepted), by their nonce
    commitments: a site whose own commitment is in it reveals its nonce."""

    site: str
    commitments: dict[str, bytes]  # site -> its nonce commitment


@dataclass(frozen=True)
class NonceReveal:
    site: str
    nonce: bytes


@dataclass(frozen=True)
class NeighbourKeys:
    """What the server forwards to a site: its live neighbours' public keys."""

    site: str
    keys: dict[str, AdvertiseKeys]
    nonces: dict[str, bytes] = field(default_factory=dict)  # every revealed nonce: the beacon's


@dataclass(frozen=True)
class ShareKeys:
    site: str
    ciphertexts: dict[str, bytes]  # neighbour -> its encrypted pair of shares
    digests: dict[str, bytes] = field(default_factory=dict)  # neighbour -> `dealt` of its pair


@dataclass(frozen=True)
class RoutedShares:
    """What the server hands a site: the ciphertexts its neighbours addressed to it, and
    the digests their senders published of them."""

    site: str
    ciphertexts: dict[str, bytes]  # sender -> ciphertext
    digests: dict[str, bytes] = field(default_factory=dict)  # sender -> `dealt` of the pair


@dataclass(frozen=True)
class MaskedInput:
    site: str
    vector: np.ndarray  # uint32 or uint64, length params.length


def advertised(params: RoundParams, keys: AdvertiseKeys) -> bytes:
    """What a site signs with its keys: the session, its view of the parameters, both keys
    and its seed commitment."""
    return signed_bytes(
        "advertise",
        params.session,
        params.base.digest,
        keys.site,
        keys.cipher_public,
        keys.mask_public,
        keys.seed_commitment,
        keys.nonce_commitment,
    )


def nonce_commitment(params: RoundParams, site: str, nonce: bytes) -> bytes:
    """What a site commits to at advertise, and reveals once the server has fixed who takes
    part: the server cannot know an honest site's nonce when it fixes the set."""
    return hashlib.sha256(
        signed_bytes("beacon nonce", params.session, params.base.digest, site, nonce)
    ).digest()


def beacon(params: RoundParams, nonces: dict[str, bytes]) -> bytes:
    """The round's randomness, from every revealed nonce: what draws the neighbour graph."""
    pairs = [part for site, nonce in sorted(nonces.items()) for part in (site, nonce)]
    return hashlib.sha256(signed_bytes("beacon", params.session, params.base.digest, *pairs)).digest()


def seed_commitment(params: RoundParams, site: str, seed: bytes) -> bytes:
    """What a site commits to at advertise: the server checks the self-mask seed it rebuilds
    from shares against it, so that a lying share holder (or a dealer sharing another seed)
    cannot make it remove a wrong self mask. Hiding: the seed is 256 random bits."""
    return hashlib.sha256(
        signed_bytes("self-mask seed", params.session, params.base.digest, site, seed)
    ).digest()


def share_digest(params: RoundParams, dealer: str, holder: str, kind: str, share: bytes) -> bytes:
    """What a dealer publishes (through the server) of each share it deals: the holder checks
    what it decrypts against it, the server what the holder releases. A wrong share is then
    its holder's lie (an honest holder complains instead of releasing a share that does not
    match), and shares that match but do not fit the dealer's secret are the dealer's. One
    way and bound to dealer, holder and kind: it gives away nothing of a 521-bit share."""
    return hashlib.sha256(
        signed_bytes("share", params.session, params.digest, dealer, holder, kind, share)
    ).digest()


def dealt(params: RoundParams, dealer: str, holder: str, pair: bytes) -> bytes:
    """The digests of a pair of shares (seed share || key share): 64 bytes."""
    half = len(pair) // 2
    return share_digest(params, dealer, holder, "seed", pair[:half]) + share_digest(
        params, dealer, holder, "key", pair[half:]
    )


def agreed(params: RoundParams, keys: AdvertiseKeys, cohort: frozenset[str]) -> bytes:
    """What a survivor signs at the consistency check: the session, the parameters with the
    beacon it computed (sites shown different commitments or nonces cannot verify each
    other), its keys of this execution (a signature from an earlier execution of the
    session cannot be replayed) and the survivor set."""
    return signed_bytes(
        "consistency",
        params.session,
        params.digest,
        keys.site,
        keys.cipher_public,
        keys.mask_public,
        cohort,
    )


def verified(identity: Identity | None, params: RoundParams, keys: AdvertiseKeys) -> bool:
    """Whether `keys` are what their site signed (always, for a site without an identity:
    it trusts the server to relay keys honestly)."""
    if identity is None:
        return True
    return identity.verifier.verify(keys.site, keys.credential, keys.signature, advertised(params, keys))


def dtype(params: RoundParams) -> type[np.unsignedinteger[Any]]:
    return np.uint32 if params.bits <= 32 else np.uint64


def pairwise_mask(
    params: RoundParams,
    mask_private: X25519PrivateKey,
    me: str,
    peer: str,
    peer_mask_public: bytes,
    *,
    negate: bool = False,
) -> tuple[bytes, bool]:
    """The mask `me` adds for `peer`, as (seed, subtract) for `add_masks`: +PRG(s) if me
    sorts before peer, else -PRG(s) (mod 2**bits); `negate` gives its removal instead."""
    secret = agree(mask_private, peer_mask_public, info=params.info("pairwise mask"))
    return secret, (params.index(me) > params.index(peer)) != negate


@dataclass(frozen=True)
class ConsistencyRequest:
    """The survivor set (the sites whose masked inputs the server holds), for a site to sign."""

    site: str
    cohort: frozenset[str]


@dataclass(frozen=True)
class ConsistencySignature:
    site: str
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    site: str
    survivors: frozenset[str]  # neighbours that sent masked input: send their seed shares
    dropped: frozenset[str]  # neighbours that shared keys but sent no input: send key shares
    cohort: frozenset[str] = frozenset()  # the signed survivor set
    signatures: dict[str, bytes] = field(default_factory=dict)  # survivor -> its signature on it


@dataclass(frozen=True)
class UnmaskShares:
    site: str
    seed_shares: dict[str, bytes]  # survivor -> share of its self-mask seed
    key_shares: dict[str, bytes]  # dropped site -> share of its mask private key
    complaints: frozenset[str] = frozenset()  # neighbours whose shares for this site were garbage


Message = TypeVar("Message")


def one_per_site(
    messages: Iterable[object], kind: type[Message], senders: Collection[str], what: str
) -> tuple[dict[str, Message], dict[str, str]]:
    """A server stage's replies, one per site: the messages of `kind` by site, and the sites
    left out with why (a message of another kind, or a second one: then neither counts). A
    message from a site outside `senders` aborts the round: nothing there can be named."""
    got: dict[str, Message] = {}
    rejected: dict[str, str] = {}
    for m in messages:
        site = str(getattr(m, "site", ""))
        need(site in senders, AbortReason.BAD_MESSAGE, f"{what} from {site!r}")
        if not isinstance(m, kind):
            rejected[site] = f"{type(m).__name__} in place of {what}"
        elif site in got or site in rejected:
            rejected[site] = f"{what} sent twice"
        else:
            got[site] = m
    return {s: m for s, m in got.items() if s not in rejected}, rejected
