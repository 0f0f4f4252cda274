"""SecAgg+ stages run together in process: the result is the exact modular sum of the
survivors' inputs, or an abort with a reason; never a wrong sum."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.secagg.common import Aborted, AbortReason, ProtocolAbort, RoundParams
from fedcore.secagg.graph import default_degree, default_threshold, neighbour_graph
from fedcore.secagg.local import advertise, run_round
from fedcore.secagg.stages.advertise import ClientAdvertise
from fedcore.secagg.stages.messages import ConsistencyRequest, UnmaskRequest


def params(n: int, degree: int, threshold: int, length: int, bits: int = 32) -> RoundParams:
    sites = [f"site-{i:03d}" for i in range(n)]
    smallest = min(len(p) for p in neighbour_graph(sites, degree, session="").values())
    return RoundParams(1, tuple(sites), degree, min(threshold, smallest), length, bits)


def inputs_for(p: RoundParams, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    dtype = np.uint32 if p.bits == 32 else np.uint64
    return {s: g.integers(0, 2**p.bits, p.length, dtype=dtype) for s in p.participants}


def modular_sum(p: RoundParams, inputs: dict[str, np.ndarray], sites: set[str]) -> np.ndarray:
    total = np.zeros(p.length, dtype=np.uint32 if p.bits == 32 else np.uint64)
    for s in sites:
        total += inputs[s]
    return total


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 12),
    degree=st.integers(2, 11),
    threshold=st.integers(1, 11),
    length=st.integers(1, 50),
    bits=st.sampled_from([32, 64]),
    data=st.data(),
)
def test_the_result_is_the_survivors_exact_sum_or_an_abort(
    n: int, degree: int, threshold: int, length: int, bits: int, data: st.DataObject
) -> None:
    p = params(n, max(degree, default_degree(n)), threshold, length, bits)  # sites refuse sparser
    sites = list(p.participants)
    drop = {
        stage: set(data.draw(st.lists(st.sampled_from(sites), max_size=n // 2), label=f"drop {stage}"))
        for stage in (1, 2, 3, 4)
    }
    inputs = inputs_for(p, n * 1000 + length)
    result = run_round(p, inputs, drop_before=drop)
    if isinstance(result, Aborted):
        assert isinstance(result.reason, AbortReason)
        return
    survivors = set(sites) - drop[1] - drop[2] - drop[3]
    np.testing.assert_array_equal(result, modular_sum(p, inputs, survivors))


@pytest.mark.parametrize("n", [3, 10, 40])
def test_without_dropouts_the_round_completes_with_default_parameters(n: int) -> None:
    degree = default_degree(n)
    p = params(n, degree, default_threshold(degree), 100)
    inputs = inputs_for(p, n)
    result = run_round(p, inputs)
    assert isinstance(result, np.ndarray)
    np.testing.assert_array_equal(result, modular_sum(p, inputs, set(p.participants)))


def test_dropouts_below_each_neighbourhoods_tolerance_complete_exactly() -> None:
    p = params(20, default_degree(20), default_threshold(default_degree(20)), 64)
    inputs = inputs_for(p, 1)
    # Three scattered sites vanish at three different stages; each neighbourhood keeps >= t.
    result = run_round(p, inputs, drop_before={2: {"site-003"}, 3: {"site-011"}, 4: {"site-017"}})
    assert isinstance(result, np.ndarray)
    np.testing.assert_array_equal(
        result, modular_sum(p, inputs, set(p.participants) - {"site-003", "site-011"})
    )


def test_a_server_asking_for_both_shares_of_a_site_is_refused() -> None:
    p = params(6, 5, 4, 8)
    clients = {s: ClientAdvertise(p, s).start(bytes_source()) for s in p.participants}
    forwarded, server, states = advertise(p, clients)
    p = server.params  # with the beacon: its graph
    stage2 = {s: states[s].receive(forwarded[s], bytes_source()) for s in p.participants}
    routed, _ = server.collect([m for m, _ in stage2.values()])
    me = p.participants[0]
    _, consistency = stage2[me][1].receive(routed[me], np.zeros(8, np.uint32))
    cohort = frozenset(p.participants)
    _, unmask = consistency.receive(ConsistencyRequest(me, cohort))
    signed = {s: b"" for s in cohort}  # no identities here: the count of signers is what is checked
    peer = sorted(p.neighbours[me])[0]
    # A curious server claims a live neighbour both survived and dropped, to get its seed
    # share and its key share from the same site: that would unmask the peer's input.
    with pytest.raises(ProtocolAbort) as refused:
        unmask.receive(UnmaskRequest(me, frozenset({peer}), frozenset({peer}), cohort, signed))
    assert refused.value.aborted.reason is AbortReason.INCONSISTENT_REQUEST
    # Tampered shares do not stop the site: it complains about their senders, releases nothing of them.
    tampered = {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in routed[me].ciphertexts.items()}
    state = stage2[me][1].receive(
        dataclasses.replace(routed[me], ciphertexts=tampered), np.zeros(8, np.uint32)
    )
    _, unmask = state[1].receive(ConsistencyRequest(me, cohort))
    answer = unmask.receive(UnmaskRequest(me, frozenset(p.neighbours[me]), frozenset(), cohort, signed))
    assert answer.complaints == set(tampered) and not answer.seed_shares and not answer.key_shares


def bytes_source() -> Callable[[int], bytes]:
    return os.urandom
