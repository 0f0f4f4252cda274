"""SecAgg+ over the real gRPC server and site agents on 127.0.0.1: a site killed during the
masked-input stage is recovered and the round completes with the survivors' exact mean."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from fedcore.client.agent import Outcome
from fedcore.privacy import distributed
from fedcore.tasks.bench import Bench
from tests.integration.test_grpc_rounds import PARAMS, SlowBench, agent, experiment, federation


def killed_while_training(in_round: int) -> Callable[[int], Awaitable[list[object]]]:
    """Five sites (four would tolerate no dropout: a neighbourhood of 3 needs all 3 shares
    under the malicious-server threshold); site-5's connection closes as it starts training
    in round `in_round`: after it shared its keys, before its masked input."""
    victim_task = SlowBench(signal_from=in_round)

    async def sites(port: int) -> list[object]:
        victim = asyncio.ensure_future(agent(port, "site-5", victim_task).run())
        others = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2, 3, 4)]
        await asyncio.to_thread(victim_task.training.wait, 30)
        victim.cancel()
        return [*await asyncio.gather(*others), await asyncio.gather(victim, return_exceptions=True)]

    return sites


def test_a_site_killed_during_masked_input_is_recovered(tmp_path: Path) -> None:
    sites = killed_while_training(in_round=1)
    exp = experiment(
        federation__start_sites=5,
        federation__min_sites=2,
        federation__rounds=2,
        secure_aggregation__enabled=True,
    )
    result, outcomes = asyncio.run(federation(exp, tmp_path, sites))
    first = result.records[0]
    assert first.sites == 4 and list(first.dropped) == ["site-5"]
    assert first.dropped["site-5"].exchange == "masked_input"
    assert first.secure_aggregation["recovered"] == 1
    assert result.records[1].sites == 4
    np.testing.assert_allclose(result.parameters["w"], np.full(PARAMS, 0.02), atol=1e-6)
    assert outcomes[:4] == [Outcome.COMPLETED] * 4


def test_distributed_dp_over_grpc_noises_the_sum_and_accounts_the_survivors(tmp_path: Path) -> None:
    """User-level distributed DP through real agents: each site adds discrete Gaussian noise
    before masking, a site killed mid-round takes its noise with it, and the accountant says so."""
    sites = killed_while_training(in_round=2)
    exp = experiment(
        federation__start_sites=5,
        federation__min_sites=2,
        federation__rounds=3,
        secure_aggregation__enabled=True,
        privacy__mode="user-distributed",
        privacy__noise_multiplier=0.5,
        privacy__clip_norm=1.0,
    )
    result, outcomes = asyncio.run(federation(exp, tmp_path, sites))
    assert [r.privacy["sites_noise"] for r in result.records] == [5, 4, 4]
    assert result.records[1].dropped["site-5"].exchange == "masked_input"
    rhos = [r.privacy["rho"] for r in result.records]
    assert rhos[1] > rhos[0]  # the lost site's noise shows as privacy spent
    assert result.records[-1].epsilon == pytest.approx(distributed.epsilon(rhos, 1e-5), rel=1e-12)
    # Bench sites each move every weight by 0.01 (norm 0.08 < clip): the noisy means stay near.
    sigma_mean = [0.5 * 1.0 / n for n in (5, 5, 4)]  # std of each round's mean noise, per coordinate
    error = result.parameters["w"] - 0.01 * np.array([1, 1, 4 / 5]).sum()
    assert np.abs(error).max() < 6 * float(np.sqrt(np.square(sigma_mean).sum())) + 1e-3
    assert outcomes[:4] == [Outcome.COMPLETED] * 4


def test_every_byte_the_server_receives_in_a_secure_round_hides_each_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capture, at the server's gRPC boundary, every reply a round brings: no site's update
    crosses in the clear (neither its float bytes nor its quantized integers), each masked
    vector is uniform although every site's input is the same constant, and only the sum
    comes out; no reply carries the site's example count."""
    from fedcore.server.sessions import SiteSession
    from fedcore.tasks.bench import STEP

    captured: list[tuple[str, bytes, dict[str, np.ndarray]]] = []
    counts: list[int] = []
    resolve = SiteSession.resolve

    def recording(session, result, assembler):  # type: ignore[no-untyped-def]
        arrays = assembler.arrays() if assembler.header.tensors else {}
        captured.append((session.name, result.SerializeToString(), {k: v.copy() for k, v in arrays.items()}))
        counts.append(result.num_examples)
        return resolve(session, result, assembler)

    monkeypatch.setattr(SiteSession, "resolve", recording)
    params = 20_000

    async def sites(port: int) -> list[object]:
        return list(
            await asyncio.gather(
                *(
                    agent(port, f"site-{k}", Bench(params), task_name=f"bench:{params}").run()
                    for k in range(1, 6)
                )
            )
        )

    exp = experiment(
        task__name=f"bench:{params}",
        federation__start_sites=5,
        federation__rounds=1,
        secure_aggregation__enabled=True,
    )
    result, _ = asyncio.run(federation(exp, tmp_path, sites))
    np.testing.assert_allclose(result.parameters["w"], np.full(params, STEP), atol=1e-6)  # the sum came out
    update = np.full(params, STEP, np.float32).tobytes()
    masked = [arrays for _, _, arrays in captured if arrays]
    assert len(masked) == 5  # one payload per site: its masked vector, nothing else
    assert len(counts) == 6 * 5 and set(counts) == {0}  # no reply of any exchange carries an example count
    everything = b"".join(raw + b"".join(a.tobytes() for a in arrays.values()) for _, raw, arrays in captured)
    assert update[:64] not in everything  # not even 16 of the update's float32 values in a row
    for arrays in masked:
        (vector,) = arrays.values()
        assert vector.dtype == np.uint32 and vector.size == params + 1
        # The quantized input is one constant; masked, it must look uniform (chi-square on the
        # top byte, 255 degrees of freedom: a uniform vector exceeds 400 with p < 1e-8).
        counts = np.bincount((vector >> np.uint32(24)).astype(np.int64), minlength=256)
        expected = vector.size / 256
        assert float(((counts - expected) ** 2 / expected).sum()) < 400
        assert np.unique(vector[:-1]).size > params * 0.99


def test_a_site_in_a_secure_run_refuses_to_evaluate_for_the_server(tmp_path: Path) -> None:
    """The server withholds federated evaluation under SecAgg; a dishonest one that asks
    anyway, after a secure round, gets a refusal: no per-site metric or count leaves."""
    from fedcore.aggregation.site import SiteStages
    from fedcore.engine import Instruction, InstructionKind
    from fedcore.engine.site import Site
    from fedcore.secagg.common import RoundParams
    from fedcore.secagg.stages.messages import AdvertiseKeys

    task = Bench(PARAMS)
    site = Site(
        name="site-1",
        task=task,
        data=task.site_data("builtin:1/1", partition="iid", seed=0, partitions=1),
        stages=SiteStages("site-1"),
    )
    model = task.initial_parameters(0)
    ask = Instruction(InstructionKind.EVALUATE, 1, model, exchange="evaluate")
    assert site.handle(ask).refusal is None  # no secure round yet: it evaluates
    params = RoundParams(1, ("site-1", "site-2", "site-3"), 2, 2, PARAMS + 1, 32, "run/1/1")
    keys = site.handle(Instruction(InstructionKind.STAGE, 1, {}, message=params, exchange="advertise"))
    assert isinstance(keys.message, AdvertiseKeys)  # it took part in round 1's secure sum
    refused = site.handle(ask)
    assert refused.refusal is not None and "secure-aggregation" in refused.refusal
    assert refused.num_examples == 0 and not refused.metrics
