"""SecAgg+ against a malicious server: a scripted dishonest server drives honest site states
(`SecAggClient`, what every site runs, with signing identities) and tries, one attack per
test, to recover one site's exact input. Each test runs the attack to its end, hands
everything the server collected to `recover` (which knows how masks are made) and checks
that the input cannot be rebuilt; the honest round beside it recovers nothing either but
sums exactly. With the new checks switched off (`python tests/support/secagg_mutations.py`),
these attacks recover the input."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import pytest

from fedcore.secagg import shamir
from fedcore.secagg.client import SecAggClient
from fedcore.secagg.common import SEED_BYTES, AbortReason, ProtocolAbort, RoundParams
from fedcore.secagg.graph import default_degree, default_threshold, neighbour_graph, safe_threshold
from fedcore.secagg.identity import LocalAuthority
from fedcore.secagg.primitives import KeyPair, add_masks
from fedcore.secagg.stages.advertise import ServerAdvertise
from fedcore.secagg.stages.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    NeighbourKeys,
    NonceReveal,
    RevealRequest,
    RoutedShares,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    pairwise_mask,
)

LENGTH = 16
ROUND = 1


def majority(n: int) -> int:
    """The smallest threshold sites accept from a server with no colluding site."""
    graph = neighbour_graph([f"site-{i:03d}" for i in range(n)], default_degree(n), session="")
    return default_threshold(min(len(p) for p in graph.values()))


def params(n: int, *, threshold: int | None = None, session: str = "run/1/1") -> RoundParams:
    sites = [f"site-{i:03d}" for i in range(n)]
    graph = neighbour_graph(sites, default_degree(n), session=session)  # its degrees: any draw's
    degree = min(len(p) for p in graph.values())
    t = threshold if threshold is not None else safe_threshold(n, degree, 0.05, attempts=10)
    assert t is not None
    return RoundParams(ROUND, tuple(sites), default_degree(n), t, LENGTH, 32, session)


@dataclass
class Loot:
    """Everything the dishonest server holds at the end of its attack."""

    keys: dict[str, AdvertiseKeys] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    seed_shares: dict[str, list[shamir.Share]] = field(default_factory=dict)  # site -> shares of its seed
    key_shares: dict[str, list[shamir.Share]] = field(default_factory=dict)  # site -> shares of its mask key
    private_keys: dict[str, bytes] = field(default_factory=dict)  # mask keys the server made itself

    def take(self, p: RoundParams, answer: UnmaskShares) -> None:
        x = p.index(answer.site)
        for peer, y in answer.seed_shares.items():
            self.seed_shares.setdefault(peer, []).append(shamir.Share(x, y))
        for peer, y in answer.key_shares.items():
            self.key_shares.setdefault(peer, []).append(shamir.Share(x, y))


def recover(p: RoundParams, loot: Loot, target: str, used: dict[str, AdvertiseKeys]) -> np.ndarray | None:
    """The target's input, if the server's loot rebuilds it: its self-mask seed and, for
    every neighbour it masked against, the mask key of one end of the pair. `used`: the
    keys the target masked with (what the server forwarded to it)."""
    if target not in loot.masked or len(loot.seed_shares.get(target, [])) < p.threshold:
        return None
    seed = shamir.combine(loot.seed_shares[target], threshold=p.threshold, length=SEED_BYTES)
    masks: list[tuple[bytes, bool]] = [(seed, True)]

    def mask_key(site: str) -> KeyPair | None:
        if site in loot.private_keys:
            return KeyPair.from_private(loot.private_keys[site])
        shares = loot.key_shares.get(site, [])
        if len(shares) < p.threshold:
            return None
        return KeyPair.from_private(shamir.combine(shares, threshold=p.threshold, length=SEED_BYTES))

    for peer in sorted(set(used) & p.neighbours[target]):
        mine, theirs = mask_key(target), mask_key(peer)
        if theirs is not None and theirs.public == used[peer].mask_public:
            masks.append(pairwise_mask(p, theirs.key(), peer, target, loot.keys[target].mask_public))
        elif mine is not None:
            masks.append(pairwise_mask(p, mine.key(), target, peer, used[peer].mask_public, negate=True))
        else:
            return None
    result = loot.masked[target].copy()
    add_masks(result, masks)
    return result


class Federation:
    """Honest sites with identities (`signed=False`: without, the positive control), and
    the first two stages run honestly. `p`: the parameters before the beacon, then (after
    `reveal`) with it: the graph the sites' nonces drew."""

    def __init__(
        self,
        p: RoundParams,
        authority: LocalAuthority | None = None,
        *,
        signed: bool = True,
        colluding_fraction: float = 0.05,
    ) -> None:
        self.p = self.base = p
        self.authority = authority or LocalAuthority(seed=11)
        self.clients = {
            s: SecAggClient(
                s, self.authority.identity(s) if signed else None, colluding_fraction=colluding_fraction
            )
            for s in p.participants
        }
        rng = np.random.default_rng(5)
        self.inputs = {s: rng.integers(0, 2**32, LENGTH, dtype=np.uint32) for s in p.participants}
        self.loot = Loot()
        self.refused: dict[str, AbortReason] = {}

    def advertise(self) -> dict[str, AdvertiseKeys]:
        keys = {s: c.step(self.p, ROUND) for s, c in self.clients.items()}
        self.loot.keys = dict(keys)  # type: ignore[arg-type]
        return keys  # type: ignore[return-value]

    def reveal(self, keys: dict[str, AdvertiseKeys]) -> dict[str, NeighbourKeys]:
        """The reveal, honestly: every site's nonce, and the keys in the graph they draw."""
        requests, server = ServerAdvertise(self.base).collect(list(keys.values()))
        nonces = [self.clients[s].step(requests[s], ROUND) for s in requests]
        forwarded, server2 = server.collect(nonces)  # type: ignore[arg-type]
        self.p = server2.params
        return forwarded

    def share(self, forwarded: dict[str, NeighbourKeys]) -> dict[str, ShareKeys]:
        return {s: self.clients[s].step(forwarded[s], ROUND) for s in forwarded}  # type: ignore[misc]

    def mask(self, shares: dict[str, ShareKeys]) -> None:
        for site in self.clients:
            senders = [sender for sender, m in shares.items() if site in m.ciphertexts]
            routed = RoutedShares(
                site,
                {sender: shares[sender].ciphertexts[site] for sender in senders},
                {sender: shares[sender].digests[site] for sender in senders},
            )
            try:
                masked = self.clients[site].mask(routed, ROUND, self.inputs[site].copy())
            except ProtocolAbort as refused:
                self.refused[site] = refused.aborted.reason
                continue
            self.loot.masked[site] = masked.vector

    def honest_start(self) -> dict[str, NeighbourKeys]:
        forwarded = self.reveal(self.advertise())
        self.mask(self.share(forwarded))
        return forwarded

    def sign(self, cohorts: dict[str, frozenset[str]]) -> dict[str, bytes]:
        """Consistency: each site is shown its cohort (the server may show different ones);
        the signatures of the sites that agreed (`self.refused`: why the others did not)."""
        out = {}
        for site, cohort in cohorts.items():
            try:
                reply = self.clients[site].step(ConsistencyRequest(site, cohort), ROUND)
            except ProtocolAbort as refused:
                self.refused[site] = refused.aborted.reason
                continue
            assert isinstance(reply, ConsistencySignature)
            out[site] = reply.signature
        return out

    def unmask(self, site: str, request: UnmaskRequest) -> AbortReason | None:
        try:
            answer = self.clients[site].step(request, ROUND)
        except ProtocolAbort as refused:
            return refused.aborted.reason
        assert isinstance(answer, UnmaskShares)
        self.loot.take(self.p, answer)
        return None


def target_of(p: RoundParams) -> str:
    return p.participants[0]


def rebuilt(fed: Federation, target: str, used: dict[str, AdvertiseKeys] | None = None) -> bool:
    """Whether the server's loot gives back the target's exact input."""
    result = recover(fed.p, fed.loot, target, fed.loot.keys if used is None else used)
    return result is not None and np.array_equal(result, fed.inputs[target])


def test_an_honest_round_sums_exactly_and_leaks_no_input() -> None:
    p = params(16)
    fed = Federation(p)
    fed.honest_start()
    p = fed.p  # with the beacon: its graph
    cohort = frozenset(p.participants)
    signatures = fed.sign(dict.fromkeys(p.participants, cohort))
    for site in p.participants:
        request = UnmaskRequest(site, frozenset(p.neighbours[site]), frozenset(), cohort, signatures)
        assert fed.unmask(site, request) is None
    target = target_of(p)
    assert not rebuilt(fed, target)  # its seed, but no pairwise key


def attack_with_views(fed: Federation, views: dict[str, frozenset[str]]) -> dict[str, AbortReason | None]:
    """Show each site its own survivor set, collect what signatures come, then ask each
    site for the shares its set implies: seeds of its surviving neighbours, mask keys of
    the others (what an honest site would give under that set)."""
    p = fed.p
    signatures = fed.sign(views)
    everyone = frozenset(p.participants)
    return {
        site: fed.unmask(
            site,
            UnmaskRequest(
                site,
                frozenset(p.neighbours[site] & views[site]),
                frozenset(p.neighbours[site] & (everyone - views[site])),
                views[site],
                signatures,
            ),
        )
        for site in sorted(views)
        if site not in fed.refused
    }


def drop_plan(p: RoundParams, target: str) -> dict[str, frozenset[str]]:
    """Per-site views that would rebuild the target's input if every site answered its own:
    each site but the target "sees" some of the target's neighbours dropped (as many as it
    can while still seeing threshold - 1 of its neighbours survive), so that every neighbour
    of the target has its mask key revealed by a threshold of sites, while the target's
    neighbours still reveal its self-mask seed."""
    near, everyone = p.neighbours[target], frozenset(p.participants)
    draw = np.random.default_rng(0)
    for _ in range(1000):  # greedy over random orders: the graph is the beacon's, not ours
        room = {s: len(p.neighbours[s]) - (p.threshold - 1) for s in everyone - {target}}
        drops: dict[str, set[str]] = {s: set() for s in room}
        tie = {s: draw.random() for s in everyone}
        for j in sorted(near, key=lambda j: tie[j]):
            holders = sorted(
                (h for h in p.neighbours[j] - {target} if room[h] > 0), key=lambda h: (-room[h], tie[h])
            )
            if len(holders) < p.threshold:
                break
            for h in holders[: p.threshold]:
                drops[h].add(j)
                room[h] -= 1
        else:
            return {target: everyone, **{s: everyone - frozenset(d) for s, d in drops.items()}}
    raise AssertionError("the plan must be able to succeed")


@pytest.mark.parametrize("n", [16, 64])
def test_without_signatures_the_attack_rebuilds_the_input(n: int) -> None:
    """The positive control: sites without identities trust the server's count of
    signatures, and the different-views attack below gives back the target's input (at the
    majority threshold: the one that needs the most of the signatures' defence)."""
    p = params(n, threshold=majority(n))
    fed = Federation(p, signed=False, colluding_fraction=0.0)
    fed.honest_start()
    p = fed.p  # with the beacon: its graph
    target = target_of(p)
    attack_with_views(fed, drop_plan(p, target))
    assert rebuilt(fed, target)


@pytest.mark.parametrize("n", [16, 64])
def test_different_views_of_the_survivors(n: int) -> None:
    """The split of the review: every neighbour of the target is "dropped" for enough sites
    to reveal its mask key, while the target "survived" for its neighbours, who reveal its
    self-mask seed. Each view is signed by one site only: no site answers."""
    p = params(n, threshold=majority(n))
    fed = Federation(p, colluding_fraction=0.0)
    fed.honest_start()
    p = fed.p  # with the beacon: its graph
    target = target_of(p)
    views = drop_plan(p, target)
    refusals = attack_with_views(fed, views)
    assert not rebuilt(fed, target)
    lying = {site for site, view in views.items() if len(view) < n}
    assert lying and {refusals.get(site, fed.refused.get(site)) for site in lying} == {
        AbortReason.BAD_SIGNATURES
    }


@pytest.mark.parametrize("n", [16, 64])
def test_neighbours_claimed_dropped_while_the_target_survived(n: int) -> None:
    """Two views: the target's neighbours see everyone survive, every other site sees the
    target's neighbours dropped. The second view is too small to sign, or unsigned by a
    threshold: the neighbours' keys never come out."""
    p = params(n)
    fed = Federation(p)
    fed.honest_start()
    p = fed.p  # with the beacon: its graph
    target = target_of(p)
    near, everyone = p.neighbours[target], frozenset(p.participants)
    views = {s: (everyone if s in near else everyone - near) for s in p.participants}
    attack_with_views(fed, views)
    assert not rebuilt(fed, target)


def test_an_unmask_request_outside_the_signed_set_is_refused() -> None:
    """Everyone signs the true survivor set; the server then asks sites for the mask keys of
    neighbours that set says survived."""
    p = params(16)
    fed = Federation(p)
    fed.honest_start()
    p = fed.p  # with the beacon: its graph
    target = target_of(p)
    everyone = frozenset(p.participants)
    signatures = fed.sign(dict.fromkeys(p.participants, everyone))
    views = drop_plan(p, target)
    refusals = [
        fed.unmask(site, UnmaskRequest(site, frozenset(p.neighbours[site] & views[site]),
                                       frozenset(p.neighbours[site] - views[site]), everyone, signatures))
        for site in sorted(views)
    ]  # fmt: skip
    assert not rebuilt(fed, target)
    assert AbortReason.INCONSISTENT_REQUEST in refusals


@pytest.mark.parametrize("threshold", ["one", "half"])
def test_a_threshold_too_low_is_refused_before_any_key_exists(threshold: str) -> None:
    base = params(16)
    k = min(len(peers) for peers in base.neighbours.values())
    p = replace(base, threshold=1 if threshold == "one" else k // 2)
    client = SecAggClient(target_of(p), LocalAuthority(seed=11).identity(target_of(p)))
    with pytest.raises(ProtocolAbort) as refused:
        client.step(p, ROUND)
    assert refused.value.aborted.reason is AbortReason.UNSAFE_PARAMETERS
    with pytest.raises(ProtocolAbort):  # nor a cohort of two
        SecAggClient("a").step(RoundParams(ROUND, ("a", "b"), 1, 1, 4), ROUND)


def forge(genuine: dict[str, AdvertiseKeys]) -> tuple[dict[str, AdvertiseKeys], dict[str, bytes]]:
    """Keys the server makes for these sites (it knows their private parts), carrying the
    genuine signatures, certificates and commitments alongside."""
    forged, privates = {}, {}
    for i, (peer, real) in enumerate(sorted(genuine.items()), start=1):
        mask, cipher = KeyPair.from_private(bytes([i]) * 32), KeyPair.from_private(bytes([i + 100]) * 32)
        forged[peer] = replace(real, cipher_public=cipher.public, mask_public=mask.public)
        privates[peer] = mask.private
    return forged, privates


def test_substituted_neighbour_keys_are_not_used() -> None:
    """The server forwards keys it made itself as the target's neighbours': it would know
    every pairwise mask. Unsigned by the neighbours, they are left out: with all of them
    substituted the target stops; with some, it masks against the genuine ones only."""
    p = params(16)
    target = target_of(p)
    fed = Federation(p)
    forwarded = fed.reveal(fed.advertise())
    forged, _ = forge(forwarded[target].keys)
    with pytest.raises(ProtocolAbort) as stopped:
        fed.clients[target].step(NeighbourKeys(target, forged, forwarded[target].nonces), ROUND)
    assert stopped.value.aborted.reason is AbortReason.TOO_FEW_NEIGHBOURS

    fed = Federation(p)
    forwarded = fed.reveal(fed.advertise())
    p = fed.p
    spare = len(forwarded[target].keys) - p.threshold  # forgeries the target can leave out
    some = dict(sorted(forwarded[target].keys.items())[:spare])
    forged, privates = forge(some)
    fed.loot.private_keys = privates
    mixed = NeighbourKeys(target, {**forwarded[target].keys, **forged}, forwarded[target].nonces)
    shares = fed.share({**forwarded, target: mixed})
    assert set(shares[target].ciphertexts) == set(forwarded[target].keys) - set(forged)
    fed.mask(shares)
    cohort = frozenset(p.participants)
    signatures = fed.sign(dict.fromkeys(p.participants, cohort))
    refusals = [
        fed.unmask(site, UnmaskRequest(site, frozenset(p.neighbours[site]), frozenset(), cohort, signatures))
        for site in sorted(p.neighbours[target])
    ]
    assert len(fed.loot.seed_shares.get(target, [])) >= p.threshold, (refusals, fed.refused)
    assert not rebuilt(fed, target, mixed.keys)  # it did not mask with the forgeries


@pytest.mark.parametrize("n", [4, 6, 32])
def test_an_odd_neighbourhood_cannot_be_split_in_two(n: int) -> None:
    """A review's attack: with k = 2t - 1 neighbours, the target's neighbourhood (itself
    included) splits into two halves of t that each sign their own survivor set; each half
    reveals the target's seed and the other half's keys. Sites now need 2t >= k + 2, and
    the default threshold meets it: the old one is refused, the split gathers no threshold."""
    p = params(n)
    target = target_of(p)
    k = len(p.neighbours[target])
    old = replace(p, threshold=k // 2 + 1)
    if 2 * old.threshold < k + 2:  # odd k: the old default is refused before any key exists
        with pytest.raises(ProtocolAbort) as refused:
            SecAggClient(target, LocalAuthority(seed=11).identity(target)).step(old, ROUND)
        assert refused.value.aborted.reason is AbortReason.UNSAFE_PARAMETERS
    fed = Federation(p)
    fed.honest_start()
    p = fed.p  # with the beacon: its graph
    near = sorted(p.neighbours[target])
    first = frozenset(near[: p.threshold]) | {target}
    second = frozenset(near[p.threshold :]) | {target}
    views = {s: first if s in first - {target} else second for s in near} | {target: second}
    others = frozenset(p.participants) - first - second
    views |= dict.fromkeys(others, frozenset(p.participants))
    attack_with_views(fed, views)
    assert not rebuilt(fed, target)


def test_a_site_claimed_dropped_after_its_masked_input_reveals_no_self_mask() -> None:
    """The server holds the target's masked input and claims it dropped, for its mask key;
    the target's self-mask seed is then never released (it signs no set without itself)."""
    p = params(16)
    fed = Federation(p)
    fed.honest_start()
    p = fed.p  # with the beacon: its graph
    target = target_of(p)
    without = frozenset(p.participants) - {target}
    signatures = fed.sign(dict.fromkeys(sorted(without), without))
    for site in sorted(p.neighbours[target]):
        fed.unmask(
            site,
            UnmaskRequest(
                site, frozenset(p.neighbours[site] & without), frozenset({target}), without, signatures
            ),
        )
    assert len(fed.loot.key_shares.get(target, [])) >= p.threshold  # its mask key: yes
    assert not rebuilt(fed, target)  # its self mask: no
    with pytest.raises(ProtocolAbort) as refused:  # and the target signs no set without itself
        fed.clients[target].step(ConsistencyRequest(target, without), ROUND)
    assert refused.value.aborted.reason is AbortReason.INCONSISTENT_REQUEST


def test_signatures_from_an_earlier_attempt_do_not_verify() -> None:
    """Replay: keys and consistency signatures of attempt 1 handed to the sites of attempt 2
    (another session) verify against nothing."""
    first, second = params(16, session="run/1/1"), params(16, session="run/1/2")
    authority = LocalAuthority(seed=11)
    old = Federation(first, authority)
    old_keys = old.advertise()
    fed = Federation(second, authority)
    forwarded = fed.reveal(fed.advertise())
    target = target_of(second)
    replayed = NeighbourKeys(
        target, {p: old_keys[p] for p in forwarded[target].keys}, forwarded[target].nonces
    )
    with pytest.raises(ProtocolAbort) as refused:
        fed.clients[target].step(replayed, ROUND)
    assert refused.value.aborted.reason is AbortReason.TOO_FEW_NEIGHBOURS
    # Consistency signatures of another execution of the same session are bound to its keys.
    old.mask(old.share(old.reveal(old_keys)))
    cohort = frozenset(first.participants)
    stale = old.sign(dict.fromkeys(first.participants, cohort))
    redo = Federation(first, authority)  # the same session again (a server redoing the round)
    redo.honest_start()
    redo.sign({target: cohort})
    request = UnmaskRequest(target, frozenset(redo.p.neighbours[target]), frozenset(), cohort, stale)
    assert redo.unmask(target, request) is AbortReason.BAD_SIGNATURES


def test_masked_inputs_mask_only_with_signed_keys_over_real_mtls_kits(tmp_path: object) -> None:
    """Deployment identities: keys signed with the site's certificate key verify against the
    federation's CA; a certificate from another CA with the same name does not."""
    from pathlib import Path

    from fedcore import pki
    from fedcore.secagg.identity import certificate_identity, signed_bytes

    root = Path(str(tmp_path))
    pki.init(root / "ours", ["localhost"])
    pki.init(root / "theirs", ["localhost"])
    ours, theirs = pki.add_site(root / "ours", "site-a"), pki.add_site(root / "theirs", "site-a")
    a = certificate_identity(
        (ours / "site.key").read_bytes(), (ours / "site.crt").read_bytes(), (ours / "ca.crt").read_bytes()
    )
    impostor = certificate_identity(
        (theirs / "site.key").read_bytes(), (theirs / "site.crt").read_bytes(), (ours / "ca.crt").read_bytes()
    )
    data = signed_bytes("advertise", "run/1/1", b"keys")
    assert a.verifier.verify("site-a", a.signer.credential, a.signer.sign(data), data)
    assert not a.verifier.verify("site-b", a.signer.credential, a.signer.sign(data), data)  # another name
    assert not a.verifier.verify("site-a", impostor.signer.credential, impostor.signer.sign(data), data)
    # The server's own certificate (the CA's, for the server's name) cannot sign as a site:
    # a server posing as a made-up participant would be one colluder for free.
    server = certificate_identity(
        (root / "ours" / "server.key").read_bytes(),
        (root / "ours" / "server.crt").read_bytes(),
        (ours / "ca.crt").read_bytes(),
    )
    assert not a.verifier.verify("localhost", server.signer.credential, server.signer.sign(data), data)


def test_a_reveal_request_without_the_sites_own_commitment_is_refused() -> None:
    """The server fixes the set of sites after it has every commitment: a set that leaves a
    site's own commitment out, or shows another in its place (one whose nonce the server
    chose), gets no nonce from it, so the server cannot draw the beacon without it."""
    p = params(16)
    fed = Federation(p)
    requests, _ = ServerAdvertise(p).collect(list(fed.advertise().values()))
    target = target_of(p)
    without = {s: c for s, c in requests[target].commitments.items() if s != target}
    for shown in (without, {**without, target: bytes(32)}):
        with pytest.raises(ProtocolAbort) as refused:
            fed.clients[target].step(RevealRequest(target, shown), ROUND)
        assert refused.value.aborted.reason is AbortReason.BAD_REVEAL
    assert isinstance(fed.clients[target].step(requests[target], ROUND), NonceReveal)


def test_a_forged_nonce_is_refused_at_share_keys_and_names_its_sender() -> None:
    """The server forwards a nonce of its own for an honest site (to steer the beacon), or
    leaves one out: the site checks every nonce against the commitments it was shown, and
    makes no share. A site revealing a nonce that does not match its commitment is named; a
    missing reveal aborts the attempt without a culprit (it is retried)."""
    p = params(16)
    fed = Federation(p)
    requests, server = ServerAdvertise(p).collect(list(fed.advertise().values()))
    nonces = {s: fed.clients[s].step(requests[s], ROUND) for s in requests}
    forwarded, _ = server.collect(list(nonces.values()))  # type: ignore[arg-type]
    target, victim = p.participants[0], p.participants[1]
    honest = forwarded[target].nonces
    others = {s: n for s, n in honest.items() if s != victim}
    for changed in ({**honest, victim: bytes(32)}, others):
        with pytest.raises(ProtocolAbort) as refused:
            fed.clients[target].step(replace(forwarded[target], nonces=changed), ROUND)
        assert refused.value.aborted.reason is AbortReason.BAD_REVEAL
    lying = [*[m for s, m in nonces.items() if s != victim], NonceReveal(victim, bytes(32))]
    with pytest.raises(ProtocolAbort) as named:
        server.collect(lying)  # type: ignore[arg-type]
    assert named.value.aborted.reason is AbortReason.BAD_REVEAL and named.value.aborted.culprit == victim
    with pytest.raises(ProtocolAbort) as missing:
        server.collect([m for s, m in nonces.items() if s != victim])  # type: ignore[misc]
    assert (
        missing.value.aborted.reason is AbortReason.MISSING_REVEAL and missing.value.aborted.culprit is None
    )


def test_different_commitments_to_two_groups_give_signatures_that_do_not_verify_across() -> None:
    """The server shows half the sites the set without one site (so their beacon, and graph,
    differ from the other half's). Both halves go on to sign the survivor set, but each
    signature binds its signer's beacon: neither half reaches a threshold with the other's
    signatures, and no site answers the unmask request."""
    p = params(10)  # a complete graph: both halves reach the consistency check
    fed = Federation(p)
    requests, server = ServerAdvertise(p).collect(list(fed.advertise().values()))
    sites = list(p.participants)
    first, second = sites[:5], sites[5:]
    gone = first[0]  # left out of what the second half is shown
    shown = {s: requests[s] for s in first} | {
        s: RevealRequest(s, {q: c for q, c in requests[s].commitments.items() if q != gone}) for s in second
    }
    nonces = [fed.clients[s].step(shown[s], ROUND) for s in sites]
    forwarded, _ = server.collect(nonces)  # type: ignore[arg-type]
    for s in second:
        f = forwarded[s]
        forwarded[s] = NeighbourKeys(
            s,
            {q: k for q, k in f.keys.items() if q != gone},
            {q: n for q, n in f.nonces.items() if q != gone},
        )
    fed.mask(fed.share(forwarded))
    assert fed.refused == {gone: AbortReason.TOO_FEW_NEIGHBOURS}  # the second half left it out
    cohort = frozenset(sites) - {gone}
    signatures = fed.sign(dict.fromkeys(cohort, cohort))
    assert set(signatures) == cohort  # everyone signed: each half over its own beacon
    refusals = {
        site: fed.unmask(site, UnmaskRequest(site, cohort - {site}, frozenset(), cohort, signatures))
        for site in cohort
    }
    assert set(refusals.values()) == {AbortReason.BAD_SIGNATURES}


def test_a_site_takes_part_in_at_most_max_attempts_of_a_round() -> None:
    """A server that aborts after the reveal draws the beacon again with the next attempt:
    each site advertises at most max_attempts times for a round (a redone session draws a
    fresh nonce: it counts too; so does coming back to the round after another), which
    bounds the draws the server can choose from."""
    p = params(16)
    site = target_of(p)
    assert SecAggClient(site).max_attempts == 10
    client = SecAggClient(site, LocalAuthority(seed=11).identity(site), max_attempts=3)
    for attempt in (1, 2):
        assert isinstance(client.step(replace(p, session=f"run/1/{attempt}"), ROUND), AdvertiseKeys)
    later = replace(p, round=ROUND + 1, session="run/2/1")
    assert isinstance(client.step(later, ROUND + 1), AdvertiseKeys)  # another round meanwhile
    assert isinstance(client.step(replace(p, session="run/1/2"), ROUND), AdvertiseKeys)  # a redo counts
    for session in ("run/1/2", "run/1/4"):
        with pytest.raises(ProtocolAbort) as refused:
            client.step(replace(p, session=session), ROUND)
        assert refused.value.aborted.reason is AbortReason.UNSAFE_PARAMETERS
    assert isinstance(client.step(replace(p, round=ROUND + 1, session="run/2/1"), ROUND + 1), AdvertiseKeys)


def test_a_degree_below_the_default_is_refused_before_any_key_exists() -> None:
    """A sparser graph needs fewer colluders to fill a site's neighbourhood: refused. The
    parameters carry no graph at all (only its degree): the beacon draws it."""
    assert "neighbours" not in {f.name for f in fields(RoundParams)}
    p = params(64)
    sparse = replace(p, degree=4, threshold=default_threshold(4))
    for site in p.participants:
        with pytest.raises(ProtocolAbort) as refused:
            SecAggClient(site, LocalAuthority(seed=11).identity(site)).step(sparse, ROUND)
        assert refused.value.aborted.reason is AbortReason.UNSAFE_PARAMETERS


def test_a_site_refuses_a_cohort_smaller_than_its_policy() -> None:
    """A server colluding with sites can run a round of the target and its colluders only:
    the sum minus the colluders' inputs is the target's. No protocol check can tell an
    honest site from a colluding one, so a site sets the fewest participants it joins
    ([privacy] min_secure_cohort), which keeps that many minus the colluders honest inputs
    beside its own."""
    small = params(6)
    for site in small.participants:
        with pytest.raises(ProtocolAbort) as refused:
            SecAggClient(site, LocalAuthority(seed=11).identity(site), min_cohort=10).step(small, ROUND)
        assert refused.value.aborted.reason is AbortReason.UNSAFE_PARAMETERS
    large = params(12)
    assert isinstance(SecAggClient(large.participants[0], min_cohort=10).step(large, ROUND), AdvertiseKeys)


@pytest.mark.parametrize("n", [64, 256])
def test_a_threshold_short_of_the_colluding_fraction_is_refused(n: int) -> None:
    """A majority threshold keeps a site's secrets from a server with no colluding site; a
    site whose policy allows for 5% colluding participants refuses it at advertise, before
    any key leaves, and accepts the threshold `safe_threshold` derives. A site assuming no
    colluders (the check off) takes the weaker one."""
    weak = params(n, threshold=majority(n))
    target = target_of(weak)
    with pytest.raises(ProtocolAbort) as refused:
        SecAggClient(target, LocalAuthority(seed=11).identity(target)).step(weak, ROUND)
    assert refused.value.aborted.reason is AbortReason.UNSAFE_PARAMETERS
    assert "colluding" in refused.value.aborted.detail
    assert SecAggClient(target, colluding_fraction=0.0).step(weak, ROUND) is not None
    assert SecAggClient(target).step(params(n), ROUND) is not None
    assert params(n).threshold > weak.threshold


def test_the_safe_threshold_bounds_the_chance_of_a_split_neighbourhood() -> None:
    """An independent check of the bound: place floor(5% n) colluders at random, draw the
    graph many times, count honest sites with at least 2t - k - 1 colluding neighbours (what a
    split needs). At the majority threshold it happens often; at the safe one, never."""
    n = 100
    sites = [f"site-{i:03d}" for i in range(n)]
    draw = np.random.default_rng(3)
    bad = set(draw.choice(sites, size=5, replace=False))
    weak, strong = majority(n), params(n).threshold
    degree = default_degree(n)
    hits = {weak: 0, strong: 0}
    for session in range(200):
        graph = neighbour_graph(sites, degree, session=f"draw/{session}")
        for t in hits:
            need = 2 * t - degree - 1
            hits[t] += any(len(graph[s] & bad) >= need for s in sites if s not in bad)
    assert hits[weak] > 100 and hits[strong] == 0, hits
