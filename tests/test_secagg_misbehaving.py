"""Misbehaving sites in a SecAgg+ round: a malformed, repeated or misaddressed message, a
low-order key, unverifiable keys, a crafted share or a wrongly dealt one leaves its sender
out or names it (never an honest site), and the round completes with the exact sum of the
inputs it holds; garbage ciphertexts are passed over; when a site's secret can no longer
be rebuilt the round aborts, naming that site when the fault is its own. Never a wrong sum."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedcore.secagg.common import AbortReason, ProtocolAbort, RoundParams
from fedcore.secagg.graph import default_degree, default_threshold, neighbour_graph
from fedcore.secagg.identity import LocalAuthority
from fedcore.secagg.local import advertise
from fedcore.secagg.shamir import PRIME, SHARE_BYTES
from fedcore.secagg.stages import share_keys
from fedcore.secagg.stages.advertise import ClientAdvertise, ServerAdvertise
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    MaskedInput,
    NeighbourKeys,
    NonceReveal,
    RevealRequest,
    RoutedShares,
    ShareKeys,
    UnmaskShares,
    seed_commitment,
)
from fedcore.secagg.wire import from_wire, to_wire

LENGTH = 32
ORDER_EIGHT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
Tamper = Callable[[list[Any]], list[Any]]
Change = Callable[[str, bytes], bytes]  # (the secret's owner, a share of it) -> the share sent


def setup(n: int = 10) -> tuple[RoundParams, dict[str, np.ndarray], LocalAuthority]:
    sites = [f"site-{i:02d}" for i in range(n)]
    graph = neighbour_graph(sites, default_degree(n), session="run/1/1")
    t = default_threshold(min(len(p) for p in graph.values()))
    p = RoundParams(1, tuple(sites), default_degree(n), t, LENGTH, 32, "run/1/1")
    rng = np.random.default_rng(3)
    return p, {s: rng.integers(0, 2**32, LENGTH, dtype=np.uint32) for s in sites}, LocalAuthority(5)


def exact(inputs: dict[str, np.ndarray], sites: set[str] | frozenset[str]) -> np.ndarray:
    total = np.zeros(LENGTH, np.uint32)
    for s in sites:
        total += inputs[s]
    return total


@dataclass
class Outcome:
    total: np.ndarray
    rejected: dict[str, str]  # every site named, at any stage
    cohort: frozenset[str]  # the sites whose masked inputs are in the sum
    declined: frozenset[str]  # routed no shares: left out without blame
    params: RoundParams | None = None  # with the beacon: its graph
    vanished: frozenset[str] = frozenset()


def run(
    p: RoundParams,
    inputs: dict[str, np.ndarray],
    ids: LocalAuthority,
    *,
    tamper: dict[str, Tamper] | None = None,
    vanish: frozenset[str] | Callable[[RoundParams], frozenset[str]] = frozenset(),
    dropped: frozenset[str] = frozenset(),
    silent: frozenset[str] = frozenset(),
    seeds: dict[str, bytes] | None = None,
) -> Outcome:
    """An honest round whose messages of each stage pass through `tamper[stage]` (a liar's
    doing) on their way to the server; `vanish` before sharing keys (or a function of the
    parameters with the beacon: the graph is drawn after advertise), `dropped` before their
    masked input, `silent` after it; `seeds`: self-mask seeds sites share and mask with
    instead of the one they committed to. A site routed no shares declines the stage (an
    honest one aborts for itself: `declined`)."""
    t: dict[str, Tamper] = {"advertise": list, "share_keys": list, "masked_input": list, "consistency": list}
    t |= {"unmask": list, **(tamper or {})}
    stage1 = {s: ClientAdvertise(p, s, ids.identity(s)).start(os.urandom) for s in p.participants}
    stage1 |= {
        s: (m, dataclasses.replace(c, self_seed=(seeds or {}).get(s, c.self_seed)))
        for s, (m, c) in stage1.items()
    }
    requests, reveal = ServerAdvertise(p).collect(t["advertise"]([m for m, _ in stage1.values()]))
    revealed = {s: stage1[s][1].receive(requests[s]) for s in requests}  # `vanish` too: keys first
    forwarded, server2 = reveal.collect([m for m, _ in revealed.values()])
    vanish = vanish(server2.params) if callable(vanish) else vanish
    stage2 = {
        s: revealed[s][1].receive(forwarded[s], os.urandom, ids.identity(s))
        for s in forwarded
        if s not in vanish
    }
    routed, server3 = server2.collect(t["share_keys"]([m for m, _ in stage2.values()]))
    declined = frozenset(s for s, r in routed.items() if not r.ciphertexts)
    stage3 = {
        s: stage2[s][1].receive(routed[s], inputs[s].copy()) for s in routed if s not in dropped | declined
    }
    agree, server4 = server3.collect(t["masked_input"]([m for m, _ in stage3.values()]))
    stage4 = {s: stage3[s][1].receive(agree[s], ids.identity(s)) for s in agree if s not in silent}
    requests, server5 = server4.collect(t["consistency"]([m for m, _ in stage4.values()]))
    answers = [stage4[s][1].receive(requests[s], ids.identity(s)) for s in requests]
    total = server5.collect(t["unmask"](answers))
    rejected = {**server4.rejected, **server5.rejected}
    return Outcome(total, rejected, server4.cohort, declined, server2.params, vanish)


def by(liar: str, change: Callable[[Any], Any]) -> Tamper:
    """The liar's message of a stage replaced by `change(message)`."""
    return lambda messages: [change(m) if m.site == liar else m for m in messages]


def flip(y: bytes) -> bytes:
    return y[:-1] + bytes([y[-1] ^ 1])  # still a field element: a share that looks right


def test_a_lying_site_is_left_out_by_name_and_the_sum_is_the_honest_sites_exact_sum() -> None:
    p, inputs, ids = setup()
    liar = p.participants[3]
    honest = set(p.participants) - {liar}
    lies: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "short key": ("advertise", lambda k: dataclasses.replace(k, mask_public=b"short")),
        "commitment": ("advertise", lambda k: dataclasses.replace(k, seed_commitment=b"short")),
        "zero key": ("advertise", lambda k: dataclasses.replace(k, cipher_public=bytes(32))),
        "order-8 key": ("advertise", lambda k: dataclasses.replace(k, mask_public=ORDER_EIGHT)),
        # The server does not check signatures: the neighbours leave the liar out, and the
        # server names a site that most of its neighbours did not exchange shares with.
        "bad signature": ("advertise", lambda k: dataclasses.replace(k, signature=b"forged")),
        "misaddressed": ("share_keys", lambda m: ShareKeys(m.site, {"nobody": b"x"})),
        "short input": ("masked_input", lambda m: MaskedInput(m.site, m.vector[:-1])),
    }
    for lie, (stage, change) in lies.items():
        out = run(p, inputs, ids, tamper={stage: by(liar, change)})
        assert set(out.rejected) == {liar} and out.cohort == honest, lie
        np.testing.assert_array_equal(out.total, exact(inputs, honest), err_msg=lie)
    # After its masked input a liar stays in the sum, named: a garbled consistency message.
    garbled = by(liar, lambda m: ConsistencyRequest(m.site, frozenset()))
    out = run(p, inputs, ids, tamper={"consistency": garbled})
    assert set(out.rejected) == {liar} and out.cohort == set(p.participants)
    np.testing.assert_array_equal(out.total, exact(inputs, out.cohort))


def with_mask(key: bytes, keys: AdvertiseKeys) -> AdvertiseKeys:
    return dataclasses.replace(keys, mask_public=key)


def test_low_order_keys_are_named_at_advertise_and_left_out_by_honest_sites() -> None:
    p, inputs, ids = setup()
    liar = p.participants[3]
    for key in (bytes(32), ORDER_EIGHT, (1).to_bytes(32, "little"), bytes([0xFF]) * 32):
        out = run(p, inputs, ids, tamper={"advertise": by(liar, functools.partial(with_mask, key))})
        assert out.rejected == {liar: "a low-order or non-canonical X25519 key"}
        np.testing.assert_array_equal(out.total, exact(inputs, set(p.participants) - {liar}))
    # A server that forwards such a key anyway (unsigned sites trust it): the site leaves
    # that neighbour out rather than crash on the all-zero agreement.
    stage1 = {s: ClientAdvertise(p, s).start(os.urandom) for s in p.participants}
    me = p.participants[0]
    forwarded, _, states = advertise(p, stage1)
    keys = dict(forwarded[me].keys)
    keys[liar] = dataclasses.replace(keys[liar], mask_public=ORDER_EIGHT)
    shares, _ = states[me].receive(NeighbourKeys(me, keys, forwarded[me].nonces), os.urandom)
    assert set(shares.ciphertexts) == set(p.neighbours[me]) - {liar}


def test_garbage_ciphertexts_do_not_stop_the_round() -> None:
    """Shares that do not decrypt, or not to what their dealer published, are complained
    about instead of stopping the round. A complaint alone names nobody (it is one site's
    word against another's: naming on it would let a liar exclude its neighbours); garbage
    for enough neighbours that fewer than t can read theirs loses the dealer's secret, and the
    abort names the dealer."""
    p, inputs, ids = setup()
    liar = p.participants[3]
    victims = sorted(p.neighbours[liar])[:3]

    def garble(m: ShareKeys, to: list[str]) -> ShareKeys:
        # Short; tampered; a valid ciphertext whose digests are not of what it holds; random.
        junk = {
            victims[0]: b"x",
            victims[1]: flip(m.ciphertexts[victims[1]]),
            victims[2]: m.ciphertexts[victims[2]],
        }
        ciphertexts = {r: junk.get(r, os.urandom(200)) if r in to else c for r, c in m.ciphertexts.items()}
        digests = {**m.digests, victims[2]: bytes(64)}
        return dataclasses.replace(m, ciphertexts=ciphertexts, digests=digests)

    out = run(p, inputs, ids, tamper={"share_keys": by(liar, lambda m: garble(m, victims))})
    assert out.rejected == {} and out.cohort == set(p.participants)  # its seed is rebuilt
    np.testing.assert_array_equal(out.total, exact(inputs, out.cohort))
    near = sorted(p.neighbours[liar])
    # All its neighbours, or just enough of them (k - t + 1) that fewer than t can read theirs.
    for garbled in (near, near[: len(near) - p.threshold + 1]):
        with pytest.raises(ProtocolAbort) as aborted:
            run(p, inputs, ids, tamper={"share_keys": by(liar, lambda m, to=garbled: garble(m, to))})
        assert aborted.value.aborted.reason is AbortReason.NOT_ENOUGH_SHARES
        assert aborted.value.aborted.culprit == liar
        assert f"self-mask seed of {liar}" in aborted.value.aborted.detail


def test_a_site_with_too_few_live_neighbours_declines_without_blame() -> None:
    """Enough of a site's neighbours vanish before sharing keys that fewer than threshold are
    left, so its secrets could not be rebuilt. It is routed nothing (it declines the stage,
    as a site whose neighbours dropped always did), not named; its neighbours do not mask
    against it, and the round completes with the others' exact sum."""
    p, inputs, ids = setup(24)
    lonely = p.participants[0]

    def pick(q: RoundParams) -> frozenset[str]:  # in the graph the beacon drew
        near, draw = sorted(q.neighbours[lonely]), np.random.default_rng(0)

        def others_keep_enough(vanish: frozenset[str]) -> bool:
            gone = vanish | {lonely}
            return all(len(q.neighbours[s] - gone) >= q.threshold for s in set(q.participants) - gone)

        # Leave it threshold - 1 neighbours, and every other site enough.
        candidates = (
            frozenset(draw.choice(near, len(near) - q.threshold + 1, replace=False)) for _ in range(500)
        )
        vanish = next(v for v in candidates if others_keep_enough(v))
        assert len(q.neighbours[lonely] - vanish) < q.threshold
        return vanish

    out = run(p, inputs, ids, vanish=pick)
    assert out.declined == {lonely} and out.rejected == {}
    assert out.cohort == set(p.participants) - out.vanished - {lonely}
    np.testing.assert_array_equal(out.total, exact(inputs, out.cohort))


def test_a_dealer_of_a_wrong_share_is_named_not_its_holder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dealer publishes the digest of the wrong share it deals, so the holder releases
    it: the share is the dealer's, the dealer is named, its seed rebuilt from the others."""
    p, inputs, ids = setup()
    liar, victim = p.participants[3], p.participants[1]
    committed: set[bytes] = set()
    honest = share_keys._shares

    def note(keys: list[AdvertiseKeys]) -> list[AdvertiseKeys]:
        committed.update(k.seed_commitment for k in keys if k.site == liar)
        return keys

    def lying(secret: bytes, xs: dict[str, int], threshold: int, randbytes: Any) -> dict[str, bytes]:
        shares = honest(secret, xs, threshold, randbytes)
        mine = seed_commitment(p, liar, secret) in committed
        return {q: flip(y) if mine and q == victim else y for q, y in shares.items()}

    monkeypatch.setattr(share_keys, "_shares", lying)
    out = run(p, inputs, ids, tamper={"advertise": note})
    assert out.rejected == {liar: "dealt shares that do not fit its self-mask seed"}
    np.testing.assert_array_equal(out.total, exact(inputs, set(p.participants)))


def test_a_dropped_dealer_of_another_key_is_named_in_the_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    """A site that shares another mask key than the one it advertised, then drops: its
    neighbours' masks against it cannot be removed, and the abort names it; never a sum
    with a wrong key's masks removed."""
    p, inputs, ids = setup()
    liar = p.participants[3]
    advertised: set[bytes] = set()

    def note(keys: list[AdvertiseKeys]) -> list[AdvertiseKeys]:
        advertised.update(k.mask_public for k in keys if k.site == liar)
        return keys

    monkeypatch.setattr(
        share_keys,
        "private_bytes",
        lambda pair: os.urandom(32) if pair.public in advertised else pair.private,
    )
    with pytest.raises(ProtocolAbort) as aborted:
        run(p, inputs, ids, tamper={"advertise": note}, dropped=frozenset({liar}))
    assert aborted.value.aborted.culprit == liar and f"mask key of {liar}" in aborted.value.aborted.detail


def shifted(p: RoundParams, liar: str, gone: frozenset[str] = frozenset()) -> Change:
    """The liar's share of an owner's secret changed so that the first threshold shares the
    server holds (every other live site's, in x order) rebuild that secret plus one: a
    wrong secret of the right size, which only the check of the secret catches."""

    def change(owner: str, y: bytes) -> bytes:
        xs = [p.index(h) for h in p.participants if h not in gone | {owner}][: p.threshold]
        x = p.index(liar)
        if x not in xs:
            return flip(y)
        others = [xj for xj in xs if xj != x]
        basis = math.prod(others) * pow(math.prod(xj - x for xj in others), -1, PRIME) % PRIME
        return ((int.from_bytes(y, "big") + pow(basis, -1, PRIME)) % PRIME).to_bytes(SHARE_BYTES, "big")

    return change


def crafted(
    kind: str, change: Change, owners: set[str] | None = None
) -> Callable[[UnmaskShares], UnmaskShares]:
    """The liar's shares of `kind` ("seed" or "key") of `owners` (all: None) replaced by
    `change(owner, share)`."""

    def craft(m: UnmaskShares) -> UnmaskShares:
        shares = m.seed_shares if kind == "seed" else m.key_shares
        lied = {q: change(q, y) if owners is None or q in owners else y for q, y in shares.items()}
        if kind == "seed":
            return dataclasses.replace(m, seed_shares=lied)
        return dataclasses.replace(m, key_shares=lied)

    return craft


# Two survivors fall silent before unmask: most secrets have threshold + 1 shares, one to
# spare, and a plausible wrong share among the first threshold goes unnoticed by anything
# but the check of the secret.
SILENT = frozenset({"site-08", "site-09"})


def test_a_crafted_seed_share_is_passed_over_and_its_sender_named() -> None:
    p, inputs, ids = setup()
    liar = p.participants[1]  # its x is among the first threshold: the first try fails
    for change in (shifted(p, liar, SILENT), lambda _, y: y[:5]):  # a plausible share; a malformed one
        out = run(p, inputs, ids, silent=SILENT, tamper={"unmask": by(liar, crafted("seed", change))})
        assert set(out.rejected) == {liar} and "self-mask seed" in out.rejected[liar]
        np.testing.assert_array_equal(out.total, exact(inputs, set(p.participants)))


def test_a_crafted_key_share_of_a_dropped_site_is_passed_over_and_its_sender_named() -> None:
    p, inputs, ids = setup()
    liar, gone = p.participants[1], frozenset({p.participants[0]})
    lie = crafted("key", shifted(p, liar, gone | SILENT))
    out = run(p, inputs, ids, dropped=gone, silent=SILENT, tamper={"unmask": by(liar, lie)})
    assert set(out.rejected) == {liar} and f"mask key of {p.participants[0]}" in out.rejected[liar]
    np.testing.assert_array_equal(out.total, exact(inputs, set(p.participants) - gone))


def test_too_many_crafted_shares_abort_naming_the_site_whose_secret_is_lost() -> None:
    """More liars than the shares beyond the threshold: no subset passes the commitment,
    and the round aborts with the site whose self mask cannot be removed; never a sum with
    a wrong seed in it."""
    p, inputs, ids = setup()
    target = p.participants[0]
    holders = sorted(p.neighbours[target], key=p.index)
    liars = holders[: len(holders) - p.threshold + 1]
    lies = [by(liar, crafted("seed", shifted(p, liar), {target})) for liar in liars]

    def lie(messages: list[UnmaskShares]) -> list[UnmaskShares]:
        for one in lies:
            messages = one(messages)
        return messages

    with pytest.raises(ProtocolAbort) as aborted:
        run(p, inputs, ids, tamper={"unmask": lie})
    assert aborted.value.aborted.reason is AbortReason.NOT_ENOUGH_SHARES
    assert f"self-mask seed of {target}" in aborted.value.aborted.detail


def test_a_site_sharing_another_seed_than_it_committed_to_is_named() -> None:
    """A dealer whose shares rebuild a seed other than its commitment: the server cannot
    trust any self mask it would remove, and aborts naming it."""
    p, inputs, ids = setup()
    liar = p.participants[2]
    with pytest.raises(ProtocolAbort) as aborted:
        run(p, inputs, ids, seeds={liar: os.urandom(32)})
    assert aborted.value.aborted.reason is AbortReason.NOT_ENOUGH_SHARES
    assert f"self-mask seed of {liar}" in aborted.value.aborted.detail


def test_the_commitment_digests_and_complaints_travel_on_the_wire() -> None:
    p, _, ids = setup()
    a, b, c, d = p.participants[:4]
    keys, _ = ClientAdvertise(p, a, ids.identity(a)).start(os.urandom)
    assert from_wire(to_wire(keys), site=a) == keys
    forwarded = NeighbourKeys(b, {a: keys}, {a: b"n" * 32, c: b"m" * 32})
    assert from_wire(to_wire(forwarded), site=b) == forwarded
    assert keys.nonce_commitment and keys.seed_commitment
    for message in (RevealRequest(b, {a: b"1" * 32, b: b"2" * 32}), NonceReveal(a, b"3" * 32)):
        assert from_wire(to_wire(message), site=message.site) == message
    for kind in (ShareKeys, RoutedShares):
        shares = kind(a, {b: b"c", c: b"d"}, {b: b"1", c: b"2"})
        assert from_wire(to_wire(shares), site=a) == shares
    answer = UnmaskShares(a, {b: b"s"}, {c: b"k"}, frozenset({c, d}))
    assert from_wire(to_wire(answer), site=a) == answer


def test_the_server_sum_is_the_same_in_any_arrival_order_and_a_second_masked_input_is_named() -> None:
    """The server folds masked inputs as they arrive (`MaskedSum`): any order gives the exact
    sum. A site that sends two cannot be taken back out of the sum: the attempt fails, named."""
    p, inputs, ids = setup()
    for seed in range(3):
        shuffled = lambda messages, seed=seed: random.Random(seed).sample(messages, len(messages))  # noqa: E731
        out = run(p, inputs, ids, tamper={"masked_input": shuffled})
        assert out.rejected == {} and out.cohort == set(p.participants)
        np.testing.assert_array_equal(out.total, exact(inputs, out.cohort))
    liar = p.participants[2]
    twice = lambda messages: [*messages, *(m for m in messages if m.site == liar)]  # noqa: E731
    with pytest.raises(ProtocolAbort) as abort:
        run(p, inputs, ids, tamper={"masked_input": twice})
    assert abort.value.aborted.reason is AbortReason.BAD_MESSAGE and abort.value.aborted.culprit == liar
