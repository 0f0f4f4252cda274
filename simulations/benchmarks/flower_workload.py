"""Flower half of the per-round overhead benchmark.

Runs Flower's own Simulation Runtime (``flwr.simulation.run_simulation``, Ray backend, offline)
with the message-API ``ServerApp`` (``@app.main()`` + ``Grid``) and the message-API
``FedAvg`` strategy. Clients do a fixed cheap update (params + 1.0, num-examples = 1), so the
measured per-round time is the framework's own overhead: message construction, LinkState,
Ray actor dispatch, (de)serialisation and aggregation.

Run alone:  python simulations/benchmarks/flower_workload.py --sites 10 --params 100000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from environment import quiet_flower, run_json_child  # this directory is on sys.path


def run_flower_simulation(
    *, sites: int, params: int, rounds: int, seed: int = 0, client_num_cpus: float = 1.0
) -> dict[str, Any]:
    """Run one Flower simulation in a fresh interpreter and return its measurements.

    A fresh process is used because Ray and Flower keep process-global state (``ray.init``,
    logger handlers, telemetry threads), and so that peak RSS covers only this run's tree.
    The child prints the result as the last JSON line on stdout; its stderr (Flower/Ray
    warnings and errors) is passed through.
    """
    args = ["--sites", str(sites), "--params", str(params), "--rounds", str(rounds), "--seed", str(seed)]
    return run_json_child(
        __file__, [*args, "--client-num-cpus", str(client_num_cpus)], what="Flower simulation"
    )


def _simulate(*, sites: int, params: int, rounds: int, seed: int, client_num_cpus: float) -> dict[str, Any]:
    """Run the simulation in this process. Call only in a fresh interpreter (see above)."""
    quiet_flower()
    from collections.abc import Iterable

    import flwr
    import numpy as np
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        ConfigRecordValues,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    # Per-round INFO lines (sampling, aggregation) would dominate the output; keep WARNING+.
    logging.getLogger("flwr").setLevel(logging.WARNING)

    initial = np.random.default_rng(seed).standard_normal(params, dtype=np.float32)
    timings: dict[str, Any] = {}

    class TimedFedAvg(FedAvg):
        """FedAvg that timestamps round boundaries on the real strategy path."""

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            timings.setdefault("start", {})[server_round] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            out = super().aggregate_train(server_round, replies)
            timings.setdefault("end", {})[server_round] = time.perf_counter()
            return out

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        # Nodes are registered before Ray starts, so without a warm-up round 1 would absorb
        # ray.init() and actor-pool creation. A tiny QUERY to every node waits for that.
        while len(node_ids := list(grid.get_node_ids())) < sites:
            time.sleep(0.05)
        t0 = time.perf_counter()
        pings = [
            Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids
        ]
        pongs = list(grid.send_and_receive(pings, timeout=600))
        if len(pongs) != sites or any(m.has_error() for m in pongs):
            raise RuntimeError(f"warm-up failed: {[m.error for m in pongs if m.has_error()]}")
        timings["warmup_query_seconds"] = time.perf_counter() - t0

        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # no federated evaluation
            min_train_nodes=sites,
            min_evaluate_nodes=0,
            min_available_nodes=sites,
        )
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord([initial.copy()]), num_rounds=rounds)
        timings["final"] = result.arrays.to_numpy_ndarrays()

    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
        content = RecordDict(
            {
                "arrays": ArrayRecord([a + np.float32(1.0) for a in arrays]),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        return Message(content=content, reply_to=msg)

    @client_app.query()
    def _ping(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict(), reply_to=msg)

    backend_config: dict[str, dict[str, ConfigRecordValues]] = {
        # One actor per `client_num_cpus` share of Ray's CPUs (default 2 CPUs → 1 actor).
        "client_resources": {"num_cpus": client_num_cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "ERROR",
            "log_to_driver": True,  # keep ClientApp tracebacks visible
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

    if "final" not in timings:
        raise RuntimeError("ServerApp did not finish (see Flower errors on stderr)")
    # Every round must have run: FedAvg of identical (x + 1) updates adds exactly 1 per round,
    # up to float32 rounding in the weighted sum.
    (final,) = timings["final"]
    if not np.allclose(final, initial + np.float32(rounds), rtol=1e-5, atol=1e-4):
        raise RuntimeError(
            f"final params != initial + {rounds}: max err {float(np.max(np.abs(final - initial - rounds)))}"
        )

    starts, ends = timings["start"], timings["end"]
    return {
        "seconds_per_round": [ends[r] - starts[r] for r in range(1, rounds + 1)],
        "setup_seconds": starts[1] - t_begin,
        "total_seconds": t_done - t_begin,
        "peak_memory_bytes": mem.bytes,
        "peak_rss_bytes": mem.rss_bytes,
        "flower_version": flwr.__version__,
        # Extras (not part of the cross-framework contract):
        "warmup_query_seconds": timings["warmup_query_seconds"],
        "teardown_seconds": t_done - ends[rounds],
        "peak_process_count": mem.processes,
        "client_num_cpus": client_num_cpus,
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
    ap.add_argument("--client-num-cpus", type=float, default=1.0)
    a = ap.parse_args(argv)
    # Invoked as a script this *is* a fresh interpreter, so run in-process.
    res = _simulate(
        sites=a.sites,
        params=a.params,
        rounds=a.rounds,
        seed=a.seed,
        client_num_cpus=a.client_num_cpus,
    )
    sys.stdout.flush()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
