"""What a curious server sees in a SecAgg+ round, and what forged, replayed or misrouted
messages do: every byte the server receives is recorded and attacked."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from fedcore.errors import SecurityError
from fedcore.secagg import shamir
from fedcore.secagg.common import ProtocolAbort, RoundParams
from fedcore.secagg.local import advertise
from fedcore.secagg.primitives import agree, decrypt
from fedcore.secagg.stages.advertise import ClientAdvertise, ServerAdvertise
from fedcore.secagg.stages.messages import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskShares

N, DEGREE, THRESHOLD, LENGTH = 8, 7, 5, 20_000


def params(round_number: int = 1) -> RoundParams:
    sites = [f"site-{i}" for i in range(N)]
    return RoundParams(round_number, tuple(sites), DEGREE, THRESHOLD, LENGTH)


def full_round(p: RoundParams, inputs: dict[str, np.ndarray], dropped_at_3: set[str]) -> dict[str, object]:
    """Run a round and keep everything the server received, stage by stage."""
    seen: dict[str, object] = {}
    stage1 = {s: ClientAdvertise(p, s).start(os.urandom) for s in p.participants}
    seen["keys"] = [m for m, _ in stage1.values()]
    forwarded, server2, states = advertise(p, stage1)
    stage2 = {s: states[s].receive(forwarded[s], os.urandom) for s in p.participants}
    seen["shares"] = [m for m, _ in stage2.values()]
    routed, server3 = server2.collect(seen["shares"])  # type: ignore[arg-type]
    live = [s for s in p.participants if s not in dropped_at_3]
    stage3 = {s: stage2[s][1].receive(routed[s], inputs[s]) for s in live}
    seen["masked"] = [m for m, _ in stage3.values()]
    agree, server4 = server3.collect(seen["masked"])  # type: ignore[arg-type]
    stage4 = {s: stage3[s][1].receive(agree[s]) for s in live}
    requests, server5 = server4.collect([m for m, _ in stage4.values()])
    seen["unmask"] = [stage4[s][1].receive(requests[s]) for s in live]
    seen["sum"] = server5.collect(seen["unmask"])  # type: ignore[arg-type]
    seen["server3"], seen["server4"] = server3, server5
    return seen


def test_each_masked_vector_looks_uniform_even_for_a_constant_input() -> None:
    p = params()
    inputs = {s: np.zeros(LENGTH, np.uint32) for s in p.participants}
    seen = full_round(p, inputs, set())
    for m in seen["masked"]:  # type: ignore[attr-defined]
        top = (m.vector >> 24).astype(np.int64)
        counts = np.bincount(top, minlength=256)
        expected = LENGTH / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 400, chi2  # 255 degrees of freedom: p < 1e-8 for a uniform vector to exceed this
    np.testing.assert_array_equal(seen["sum"], np.zeros(LENGTH, np.uint32))


def test_the_server_never_holds_both_secrets_of_a_site() -> None:
    p = params()
    g = np.random.default_rng(0)
    inputs = {s: g.integers(0, 2**32, LENGTH, dtype=np.uint32) for s in p.participants}
    dropped = {"site-2"}
    seen = full_round(p, inputs, dropped)
    for answer in seen["unmask"]:  # type: ignore[attr-defined]
        assert isinstance(answer, UnmaskShares)
        assert not set(answer.seed_shares) & set(answer.key_shares)
        assert set(answer.key_shares) <= dropped  # mask-key shares only of dropped sites
        assert not set(answer.seed_shares) & dropped  # seed shares only of survivors


def test_shares_addressed_to_one_site_open_for_no_one_else() -> None:
    p = params()
    sites = list(p.participants)
    stage1 = {s: ClientAdvertise(p, s).start(os.urandom) for s in sites}
    keys = {s: m for s, (m, _) in stage1.items()}
    forwarded, _, states = advertise(p, stage1)
    sender = sites[0]
    message, _ = states[sender].receive(forwarded[sender], os.urandom)
    recipient, ciphertext = next(iter(message.ciphertexts.items()))
    intruders = [s for s in sites if s not in (sender, recipient)]
    for intruder in intruders:  # another site, with its own key pair, cannot open it
        state = stage1[intruder][1]
        key = agree(state.cipher.private, keys[sender].cipher_public, info=p.info("share encryption"))
        with pytest.raises(SecurityError):
            decrypt(key, ciphertext, associated=p.associated(sender, recipient))
    # The intended recipient can, and only for this round, sender and recipient.
    state = stage1[recipient][1]
    key = agree(state.cipher.private, keys[sender].cipher_public, info=p.info("share encryption"))
    assert len(decrypt(key, ciphertext, associated=p.associated(sender, recipient))) == 2 * shamir.SHARE_BYTES
    for wrong in (p.associated(intruders[0], recipient), params(2).associated(sender, recipient)):
        with pytest.raises(SecurityError):
            decrypt(key, ciphertext, associated=wrong)


def test_forged_replayed_and_out_of_stage_messages_leave_their_sender_out() -> None:
    """A lying site's malformed, repeated or copied message leaves it out of the round, by
    name; it cannot abort the round for everyone. A sender outside the round is refused."""
    p = params()
    sites = list(p.participants)
    stage1 = {s: ClientAdvertise(p, s).start(os.urandom) for s in sites}
    keys = [m for m, _ in stage1.values()]
    server = ServerAdvertise(p)

    def left_out(messages: list[AdvertiseKeys]) -> dict[str, str]:
        return server.collect(messages)[1].rejected

    assert left_out([*keys, keys[0]]) == {sites[0]: "keys sent twice"}  # replayed
    copied = left_out([*keys[1:], dataclasses.replace(keys[0], mask_public=keys[1].mask_public)])
    assert set(copied) == {sites[0], sites[1]}  # neither copy is trusted
    with pytest.raises(ProtocolAbort):  # not a participant of the round
        server.collect([*keys, AdvertiseKeys("mallory", keys[0].cipher_public, keys[0].mask_public)])
    requests, reveal = server.collect(keys)
    revealed = {s: stage1[s][1].receive(requests[s]) for s in sites}
    forwarded, server2 = reveal.collect([m for m, _ in revealed.values()])
    stage2 = {s: revealed[s][1].receive(forwarded[s], os.urandom) for s in sites}
    shares = [m for m, _ in stage2.values()]
    _, wrong_stage = server2.collect([*shares[1:], MaskedInput(sites[0], np.zeros(LENGTH, np.uint32))])  # type: ignore[list-item]
    assert set(wrong_stage.rejected) == {sites[0]}
    misrouted = ShareKeys(sites[0], {sites[1]: b"x" * 60})
    if p.neighbours[sites[0]] != {sites[1]}:
        _, state = server2.collect([misrouted, *shares[1:]])
        assert set(state.rejected) == {sites[0]}
    # None of the refusals changed the server's state: the honest round still sums exactly.
    routed, server3 = server2.collect(shares)
    g = np.random.default_rng(1)
    inputs = {s: g.integers(0, 2**32, LENGTH, dtype=np.uint32) for s in sites}
    stage3 = {s: stage2[s][1].receive(routed[s], inputs[s]) for s in sites}
    agree, server4 = server3.collect([m for m, _ in stage3.values()])
    stage4 = {s: stage3[s][1].receive(agree[s]) for s in sites}
    requests, server5 = server4.collect([m for m, _ in stage4.values()])
    total = server5.collect([stage4[s][1].receive(requests[s]) for s in sites])
    np.testing.assert_array_equal(total, sum(inputs.values()).astype(np.uint32))
