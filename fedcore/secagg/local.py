"""One SecAgg+ round among sites in this process: the stage states wired together, with
dropouts injected between stages. What a transport does over the network, minus the
network; tests and simulations use it as the reference run of the protocol."""

from __future__ import annotations

import os
from collections.abc import Mapping, Set

import numpy as np

from fedcore.secagg.common import Aborted, ProtocolAbort, RandBytes, RoundParams
from fedcore.secagg.identity import Identity
from fedcore.secagg.stages.advertise import ClientAdvertise, ServerAdvertise
from fedcore.secagg.stages.messages import AdvertiseKeys, NeighbourKeys
from fedcore.secagg.stages.reveal import ClientReveal
from fedcore.secagg.stages.share_keys import ClientShareKeys, ServerShareKeys


def advertise(
    params: RoundParams, stage1: Mapping[str, tuple[AdvertiseKeys, ClientReveal]]
) -> tuple[dict[str, NeighbourKeys], ServerShareKeys, dict[str, ClientShareKeys]]:
    """Stage 1 and its reveal, honestly: the server collects the advertisements, every site
    it accepted reveals its nonce, and the server forwards the keys in the graph the nonces
    draw (`ServerShareKeys.params`: the parameters with the beacon)."""
    requests, server = ServerAdvertise(params).collect([m for m, _ in stage1.values()])
    revealed = {s: stage1[s][1].receive(requests[s]) for s in requests}
    forwarded, server2 = server.collect([m for m, _ in revealed.values()])
    return forwarded, server2, {s: state for s, (_, state) in revealed.items()}


def run_round(
    params: RoundParams,
    inputs: Mapping[str, np.ndarray],
    *,
    drop_before: Mapping[int, Set[str]] | None = None,
    randbytes: RandBytes = os.urandom,
    identities: Mapping[str, Identity] | None = None,
) -> np.ndarray | Aborted:
    """The sum modulo 2**bits of the inputs of the sites that reach stage 3, or an abort.
    `drop_before[stage]` (1 advertise, 2 share keys, 3 masked input, 4 consistency, 5 unmask)
    are the sites that vanish before sending that stage."""
    drop = {stage: set((drop_before or {}).get(stage, ())) for stage in (1, 2, 3, 4, 5)}
    gone: set[str] = set()

    def alive(stage: int) -> list[str]:
        gone.update(drop[stage])
        return [s for s in params.participants if s not in gone]

    try:
        clients = {s: ClientAdvertise(params, s, (identities or {}).get(s)) for s in params.participants}
        stage1 = {s: clients[s].start(randbytes) for s in alive(1)}
        # The reveal is part of advertising: a site missing there aborts the attempt.
        forwarded, server2, states = advertise(params, stage1)
        ids = identities or {}
        stage2 = {
            s: states[s].receive(forwarded[s], randbytes, ids.get(s)) for s in alive(2) if s in forwarded
        }
        routed, server3 = server2.collect([m for m, _ in stage2.values()])
        stage3 = {s: stage2[s][1].receive(routed[s], inputs[s]) for s in alive(3) if s in routed}
        agree, server4 = server3.collect([m for m, _ in stage3.values()])
        stage4 = {s: stage3[s][1].receive(agree[s], ids.get(s)) for s in alive(4) if s in agree}
        requests, server5 = server4.collect([m for m, _ in stage4.values()])
        answers = [stage4[s][1].receive(requests[s], ids.get(s)) for s in alive(5) if s in requests]
        return server5.collect(answers)
    except ProtocolAbort as abort:
        return abort.aborted
