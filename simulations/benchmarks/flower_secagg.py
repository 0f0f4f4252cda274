"""Flower SecAgg+ per-round cost benchmark.

Runs Flower's own Simulation Runtime (``flwr.simulation.run_simulation``, Ray backend, offline)
with Flower's documented SecAgg+ setup: a ``ServerApp`` whose main wraps the context in a
``LegacyContext`` (legacy ``FedAvg``) and runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``,
and a ``ClientApp(client_fn, mods=[secaggplus_mod])`` around a ``NumPyClient``. Clients do a fixed
cheap update (params + 0.01, num_examples = 1), so the measured per-round time is the four-stage
SecAgg+ protocol (setup, share keys, masked vectors, unmask) plus Flower's own message overhead.

Per-round time is measured inside the ServerApp: the fit workflow's ``__call__`` (one full SecAgg+
round, from ``configure_fit`` to ``aggregate_fit``) is timed. Ray/actor start-up is absorbed by a
warm-up ``get_properties`` to every node before round 1.

Run alone:  python simulations/benchmarks/flower_secagg.py --sites 20 --params 1000000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any

from environment import quiet_flower, run_json_child  # this directory is on sys.path

CLIPPING_RANGE = 8.0  # Flower's default
QUANTIZATION_RANGE = 4194304  # Flower's default (2**22)
MAX_WEIGHT = 1000.0  # Flower's default
UPDATE = 0.01  # what every client adds to the received parameters


def secagg_graph(sites: int) -> tuple[int, int]:
    """(num_shares, reconstruction_threshold) for a sparse SecAgg+ graph over `sites` clients.

    num_shares counts the client itself plus its ring neighbours, i.e. ``num_shares // 2`` on each
    side. Flower wants it odd (unless it equals the number of sampled clients) and > 2. Passing an
    even int makes Flower's server bump it by one *after* it has sent the even value to the
    clients, so it is made odd here.
    """
    if sites < 3:
        raise ValueError("SecAgg+ needs at least 3 sites")
    k = min(sites - 1, 3 * math.ceil(math.log2(sites)))
    if k % 2 == 0:
        k += 1  # <= sites; k == sites means the complete graph
    k = max(k, 3)
    return k, k // 2 + 1


def run_flower_secagg(*, sites: int, params: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Run one Flower SecAgg+ simulation in a fresh interpreter and return its measurements.

    Flower's SecAgg+ (``SecAggPlusWorkflow`` + client mod ``secaggplus_mod``) over `sites` virtual
    clients, all sampled every round, a model of `params` float32 values, each client's fit
    returning the received parameters + 0.01 (num_examples 1). Returns ``seconds_per_round``,
    ``setup_seconds``, ``total_seconds``, ``flower_version``, ``num_shares``,
    ``reconstruction_threshold``, ``clipping_range``, ``quantization_range`` (+ extras). The child
    checks the final parameters equal initial + 0.01 * rounds within the quantization error.
    """
    args = ["--sites", str(sites), "--params", str(params), "--rounds", str(rounds), "--seed", str(seed)]
    return run_json_child(__file__, args, what="Flower SecAgg+ simulation")


def _simulate(*, sites: int, params: int, rounds: int, seed: int) -> dict[str, Any]:
    """Run the simulation in this process. Call only in a fresh interpreter (see above)."""
    quiet_flower()
    from collections.abc import Callable

    import flwr
    import flwr.compat.common.recorddict_compat as compat
    import numpy as np
    from flwr.client import Client, ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import (
        Config,
        Context,
        GetPropertiesIns,
        Message,
        NDArrays,
        Scalar,
        ndarrays_to_parameters,
    )
    from flwr.common.constant import MessageTypeLegacy
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)

    Stage = Callable[[Grid, LegacyContext, WorkflowState], bool]
    num_shares, threshold = secagg_graph(sites)
    initial = np.random.default_rng(seed).standard_normal(params, dtype=np.float32)
    timings: dict[str, Any] = {"start": {}, "end": {}, "stages": {}}

    class TimedSecAggPlus(SecAggPlusWorkflow):
        """SecAggPlusWorkflow that timestamps each round (one ``__call__``) and each stage."""

        def __call__(self, grid: Grid, context: Context) -> None:
            rnd = len(timings["start"]) + 1
            timings["start"][rnd] = time.perf_counter()
            super().__call__(grid, context)
            timings["end"][rnd] = time.perf_counter()

        def _timed(self, name: str, stage: Stage, grid: Grid, ctx: LegacyContext, st: WorkflowState) -> bool:
            t0 = time.perf_counter()
            ok = stage(grid, ctx, st)
            timings["stages"].setdefault(name, []).append(time.perf_counter() - t0)
            return ok

        def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
            return self._timed("setup", super().setup_stage, grid, context, state)

        def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
            return self._timed("share_keys", super().share_keys_stage, grid, context, state)

        def collect_masked_vectors_stage(
            self, grid: Grid, context: LegacyContext, state: WorkflowState
        ) -> bool:
            return self._timed(
                "collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state
            )

        def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
            return self._timed("unmask", super().unmask_stage, grid, context, state)

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        # Warm-up so round 1 does not absorb ray.init() and actor-pool creation.
        while len(node_ids := list(grid.get_node_ids())) < sites:
            time.sleep(0.05)
        t0 = time.perf_counter()
        ping = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
        pings = [
            Message(content=ping, dst_node_id=n, message_type=MessageTypeLegacy.GET_PROPERTIES)
            for n in node_ids
        ]
        pongs = list(grid.send_and_receive(pings, timeout=600))
        if len(pongs) != sites or any(m.has_error() for m in pongs):
            raise RuntimeError(f"warm-up failed: {[m.error for m in pongs if m.has_error()]}")
        timings["warmup_query_seconds"] = time.perf_counter() - t0

        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=sites,
            min_evaluate_clients=0,
            min_available_clients=sites,
            initial_parameters=ndarrays_to_parameters([initial]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit_workflow = TimedSecAggPlus(
            num_shares=num_shares,
            reconstruction_threshold=threshold,
            max_weight=MAX_WEIGHT,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
        )
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        timings["final"] = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()

    class _Client(NumPyClient):
        def get_properties(self, config: Config) -> dict[str, Scalar]:
            return {}

        def fit(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            return [p + UPDATE for p in parameters], 1, {}

    def client_fn(context: Context) -> Client:
        return _Client().to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])

    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "ERROR",
            "log_to_driver": True,
            "include_dashboard": False,
        },
    }

    from fedcore.simulation.memory import PeakMemory

    mem = PeakMemory()
    mem.start()
    t_begin = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=sites,
        backend_name="ray",
        backend_config=backend_config,
    )
    t_done = time.perf_counter()
    mem.stop()

    starts, ends = timings["start"], timings["end"]
    if "final" not in timings or len(ends) != rounds:
        raise RuntimeError("ServerApp did not finish every round (see Flower errors on stderr)")
    # Each client uploads quantize(w * x) with w = round(1/max_weight * Q) / Q; stochastic rounding
    # errs by < one step 2*clip/Q per client, so the weighted mean errs by < 2*clip/q_w per round.
    q_w = round(1 / MAX_WEIGHT * QUANTIZATION_RANGE)
    bound = rounds * 2 * CLIPPING_RANGE / q_w
    (final,) = timings["final"]
    err = np.abs(final.astype(np.float64) - (initial.astype(np.float64) + UPDATE * rounds))
    if not float(err.max()) <= bound + 1e-6:
        raise RuntimeError(
            f"final params != initial + {UPDATE * rounds}: max err {float(err.max())} > {bound}"
        )

    return {
        "seconds_per_round": [ends[r] - starts[r] for r in range(1, rounds + 1)],
        "setup_seconds": starts[1] - t_begin,
        "total_seconds": t_done - t_begin,
        "flower_version": flwr.__version__,
        "num_shares": num_shares,
        "reconstruction_threshold": threshold,
        "clipping_range": CLIPPING_RANGE,
        "quantization_range": QUANTIZATION_RANGE,
        # Extras:
        "timing_method": "inside ServerApp: SecAggPlusWorkflow.__call__ per round",
        "stage_seconds": timings["stages"],
        "max_weight": MAX_WEIGHT,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "error_bound": bound,
        "warmup_query_seconds": timings["warmup_query_seconds"],
        "teardown_seconds": t_done - ends[rounds],
        "peak_memory_bytes": mem.bytes,
        "peak_rss_bytes": mem.rss_bytes,
        "peak_process_count": mem.processes,
        "sites": sites,
        "params": params,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sites", type=int, required=True)
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    res = _simulate(sites=a.sites, params=a.params, rounds=a.rounds, seed=a.seed)
    sys.stdout.flush()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
