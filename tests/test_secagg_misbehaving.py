"""Misbehaving sites in a SecAgg+ round: one site's malformed, repeated or misaddressed
message leaves that site out, by name, and the round completes with the honest sites' exact
sum; it never aborts the round for everyone, and never gives a wrong sum."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fedcore.secagg.common import RoundParams
from fedcore.secagg.graph import default_degree, default_threshold, neighbour_graph
from fedcore.secagg.identity import LocalAuthority
from fedcore.secagg.stages.advertise import ClientAdvertise, ServerAdvertise
from fedcore.secagg.stages.messages import MaskedInput, ShareKeys

LENGTH = 32


def setup(n: int = 10) -> tuple[RoundParams, dict[str, np.ndarray], LocalAuthority]:
    sites = [f"site-{i}" for i in range(n)]
    graph = neighbour_graph(sites, default_degree(n), seed=1, round_number=1)
    t = default_threshold(min(len(p) for p in graph.values()))
    p = RoundParams(1, tuple(sites), graph, t, LENGTH, 32, "run/1/1")
    rng = np.random.default_rng(3)
    return p, {s: rng.integers(0, 2**32, LENGTH, dtype=np.uint32) for s in sites}, LocalAuthority(5)


def exact(inputs: dict[str, np.ndarray], sites: set[str]) -> np.ndarray:
    total = np.zeros(LENGTH, np.uint32)
    for s in sites:
        total += inputs[s]
    return total


def run(
    p: RoundParams, inputs: dict[str, np.ndarray], ids: LocalAuthority, *, liar: str, stage: str
) -> tuple[np.ndarray, dict[str, str]]:
    """An honest round in which `liar` sends garbage at `stage`; the sum and who was left out."""
    stage1 = {s: ClientAdvertise(p, s, ids.identity(s)).start(os.urandom) for s in p.participants}
    keys = [m for m, _ in stage1.values()]
    if stage == "advertise":
        keys = [dataclasses.replace(k, mask_public=b"short") if k.site == liar else k for k in keys]
    forwarded, server2 = ServerAdvertise(p).collect(keys)
    stage2 = {s: stage1[s][1].receive(forwarded[s], os.urandom, ids.identity(s)) for s in forwarded}
    shares = [m for m, _ in stage2.values()]
    if stage == "share_keys":
        shares = [ShareKeys(m.site, {"nobody": b"x"}) if m.site == liar else m for m in shares]
    routed, server3 = server2.collect(shares)
    stage3 = {s: stage2[s][1].receive(routed[s], inputs[s].copy()) for s in routed}
    masked = [m for m, _ in stage3.values()]
    if stage == "masked_input":
        masked = [MaskedInput(m.site, m.vector[:-1]) if m.site == liar else m for m in masked]
    agree, server4 = server3.collect(masked)
    stage4 = {s: stage3[s][1].receive(agree[s], ids.identity(s)) for s in agree}
    requests, server5 = server4.collect([m for m, _ in stage4.values()])
    answers = [stage4[s][1].receive(requests[s], ids.identity(s)) for s in requests]
    return server5.collect(answers), server4.rejected


def test_a_lying_site_is_left_out_by_name_and_the_sum_is_the_honest_sites_exact_sum() -> None:
    p, inputs, ids = setup()
    liar = p.participants[3]
    honest = set(p.participants) - {liar}
    for stage in ("advertise", "share_keys", "masked_input"):
        total, rejected = run(p, inputs, ids, liar=liar, stage=stage)
        assert set(rejected) == {liar}, stage
        np.testing.assert_array_equal(total, exact(inputs, honest), err_msg=stage)
