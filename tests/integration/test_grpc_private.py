"""Differential privacy over the real gRPC server and site agents on 127.0.0.1: what crosses
the server's boundary under DP. Sites of different sizes send no example count, no training
statistic, and an epsilon that is the same at every site (the mechanism is public); the
sites build the model the job names (the task's private default)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedcore import load_experiment
from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
from fedcore.tasks import build_task
from tests.integration.test_grpc_rounds import federation

PRIVACY_METRICS = {"epsilon", "epsilon_total", "noise_multiplier"}


@pytest.mark.parametrize("mode", ["sample", "user-central"])
def test_no_count_or_training_statistic_crosses_the_boundary_under_dp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    from fedcore.server.sessions import SiteSession

    replies: list[tuple[str, int, dict[str, float]]] = []
    resolve = SiteSession.resolve

    def recording(session, result, assembler):  # type: ignore[no-untyped-def]
        if assembler.header.tensors:  # a fit reply (an update came with it)
            metrics = {k: getattr(v, v.WhichOneof("value")) for k, v in result.metrics.items()}
            replies.append((session.name, result.num_examples, metrics))
        return resolve(session, result, assembler)

    monkeypatch.setattr(SiteSession, "resolve", recording)

    async def sites(port: int) -> list[object]:
        def agent(k: int) -> SiteAgent:
            settings = AgentSettings(
                server=f"127.0.0.1:{port}",
                task_name="digits",
                data_uri=f"builtin:{k}/3",
                tls=None,
                site_name=f"site-{k}",
                heartbeat_interval=0.5,
                give_up_after=5.0,
            )
            return SiteAgent(settings, build_task("digits"))

        return list(await asyncio.gather(*(agent(k).run() for k in (1, 2, 3))))

    exp = load_experiment().override(
        task__name="digits",
        federation__rounds=2,
        federation__start_sites=3,
        federation__round_timeout=60.0,
        privacy__mode=mode,
        privacy__target_epsilon=3.0,
    )
    result, outcomes = asyncio.run(federation(exp, tmp_path, sites))
    assert outcomes == [Outcome.COMPLETED] * 3 and len(result.records) == 2
    sizes = {
        len(
            build_task("digits")
            .site_data(f"builtin:{k}/3", partition="dirichlet:0.5", seed=exp.seed, partitions=3)
            .train
        )
        for k in (1, 2, 3)
    }
    assert len(sizes) == 3  # the sites differ in size ...
    assert len(replies) == 6 and {count for _, count, _ in replies} == {1}  # ... and no count says so
    for _, _, metrics in replies:
        assert set(metrics) <= PRIVACY_METRICS  # no train_loss, no dp_steps
    if mode == "sample":
        per_round = [{m["epsilon"] for _, _, m in replies[i : i + 3]} for i in (0, 3)]
        assert all(len(values) == 1 for values in per_round)  # one public mechanism, one epsilon
        assert sum(a.size for a in result.parameters.values()) == 64 * 10 + 10  # the job's linear model
