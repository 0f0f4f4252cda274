"""SecAgg+ stage messages <-> their protocol messages.

Site names inside messages are never taken from the sender: the server sets the sender to
the authenticated site, and a site reads messages as addressed to itself. A masked input's
vector travels as the Result's payload (tensor "masked"), like any update.
"""

from __future__ import annotations

import numpy as np

from fedcore.errors import ProtocolError
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.secagg.common import RoundParams
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    MaskedInput,
    NeighbourKeys,
    NonceReveal,
    RevealRequest,
    RoutedShares,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedcore.tensors import Arrays

MASKED = "masked"


def to_wire(message: object) -> pb.SecAgg:
    if isinstance(message, RoundParams):
        params = pb.SecAggParams(
            round=message.round,
            participants=list(message.participants),
            threshold=message.threshold,
            length=message.length,
            bits=message.bits,
            session=message.session,
            degree=message.degree,
        )
        return pb.SecAgg(params=params)
    if isinstance(message, AdvertiseKeys):
        return pb.SecAgg(keys=_keys(message))
    if isinstance(message, NeighbourKeys):
        out = pb.SecAgg(neighbour_keys=pb.SecAggNeighbourKeys())
        for site, keys in message.keys.items():
            out.neighbour_keys.keys[site].CopyFrom(_keys(keys))
        out.neighbour_keys.nonces.update(message.nonces)
        return out
    if isinstance(message, RevealRequest):
        return pb.SecAgg(reveal_request=pb.SecAggRevealRequest(commitments=message.commitments))
    if isinstance(message, NonceReveal):
        return pb.SecAgg(nonce_reveal=pb.SecAggNonceReveal(nonce=message.nonce))
    if isinstance(message, ConsistencyRequest):
        return pb.SecAgg(consistency_request=pb.SecAggConsistencyRequest(cohort=sorted(message.cohort)))
    if isinstance(message, ConsistencySignature):
        return pb.SecAgg(consistency_signature=pb.SecAggConsistencySignature(signature=message.signature))
    if isinstance(message, ShareKeys):
        return pb.SecAgg(
            share_keys=pb.SecAggCiphertexts(ciphertexts=message.ciphertexts, digests=message.digests)
        )
    if isinstance(message, RoutedShares):
        return pb.SecAgg(
            routed_shares=pb.SecAggCiphertexts(ciphertexts=message.ciphertexts, digests=message.digests)
        )
    if isinstance(message, MaskedInput):
        return pb.SecAgg(masked_input=pb.SecAggMaskedInput())
    if isinstance(message, UnmaskRequest):
        return pb.SecAgg(
            unmask_request=pb.SecAggUnmaskRequest(
                survivors=sorted(message.survivors),
                dropped=sorted(message.dropped),
                cohort=sorted(message.cohort),
                signatures=message.signatures,
            )
        )
    if isinstance(message, UnmaskShares):
        return pb.SecAgg(
            unmask_shares=pb.SecAggUnmaskShares(
                seed_shares=message.seed_shares,
                key_shares=message.key_shares,
                complaints=sorted(message.complaints),
            )
        )
    raise TypeError(f"not a SecAgg+ message: {type(message).__name__}")


def _keys(keys: AdvertiseKeys) -> pb.SecAggKeys:
    return pb.SecAggKeys(
        cipher_public=keys.cipher_public,
        mask_public=keys.mask_public,
        signature=keys.signature,
        credential=keys.credential,
        seed_commitment=keys.seed_commitment,
        nonce_commitment=keys.nonce_commitment,
    )


def _from_keys(site: str, k: pb.SecAggKeys) -> AdvertiseKeys:
    return AdvertiseKeys(
        site, k.cipher_public, k.mask_public, k.signature, k.credential, k.seed_commitment, k.nonce_commitment
    )


def from_wire(message: pb.SecAgg, *, site: str, payload: Arrays | None = None) -> object:
    """The stage message, with `site` as its sender (server side) or addressee (site side)."""
    which = message.WhichOneof("stage")
    try:
        if which == "params":
            p = message.params
            return RoundParams(
                round=p.round,
                participants=tuple(p.participants),
                degree=p.degree,
                threshold=p.threshold,
                length=p.length,
                bits=p.bits,
                session=p.session,
            )
        if which == "keys":
            return _from_keys(site, message.keys)
        if which == "neighbour_keys":
            keys = {s: _from_keys(s, k) for s, k in message.neighbour_keys.keys.items()}
            return NeighbourKeys(site, keys, dict(message.neighbour_keys.nonces))
        if which == "reveal_request":
            return RevealRequest(site, dict(message.reveal_request.commitments))
        if which == "nonce_reveal":
            return NonceReveal(site, message.nonce_reveal.nonce)
        if which == "consistency_request":
            return ConsistencyRequest(site, frozenset(message.consistency_request.cohort))
        if which == "consistency_signature":
            return ConsistencySignature(site, message.consistency_signature.signature)
        if which == "share_keys":
            c = message.share_keys
            return ShareKeys(site, dict(c.ciphertexts), dict(c.digests))
        if which == "routed_shares":
            c = message.routed_shares
            return RoutedShares(site, dict(c.ciphertexts), dict(c.digests))
        if which == "masked_input":
            vector = (payload or {}).get(MASKED)
            # uint8: packed below 32 bits (`fedcore.secagg.packing`)
            if vector is None or vector.ndim != 1 or vector.dtype not in (np.uint8, np.uint32, np.uint64):
                raise ProtocolError("a masked input needs one uint8/uint32/uint64 tensor 'masked'")
            return MaskedInput(site, np.array(vector))
        if which == "unmask_request":
            r = message.unmask_request
            return UnmaskRequest(
                site,
                survivors=frozenset(r.survivors),
                dropped=frozenset(r.dropped),
                cohort=frozenset(r.cohort),
                signatures=dict(r.signatures),
            )
        if which == "unmask_shares":
            u = message.unmask_shares
            return UnmaskShares(site, dict(u.seed_shares), dict(u.key_shares), frozenset(u.complaints))
    except ValueError as err:  # RoundParams' own checks
        raise ProtocolError(f"bad secure-aggregation parameters: {err}") from None
    raise ProtocolError(f"unknown secure-aggregation stage {which!r}")


def payload_of(message: object) -> Arrays | None:
    """A masked input's vector travels as the Result's payload."""
    return {MASKED: message.vector} if isinstance(message, MaskedInput) else None
