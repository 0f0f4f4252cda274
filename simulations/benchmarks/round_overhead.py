"""Per-round framework overhead: fedcore in-process, fedcore over gRPC + mutual TLS, Flower.

Sites do a fixed cheap update (``bench:PARAMS``: +0.01 on a float32 vector; Flower's client
adds 1.0), so a round's time is the framework's own cost: dispatch, (de)serialisation,
transport and aggregation. All three systems run in one invocation on the same machine.

- fedcore in-process: ``fedcore.run_simulation`` (in-process transport, one asyncio loop,
  ``--workers 1``: nothing to parallelise when sites do no work).
- fedcore gRPC: the real server (``fedcore.server.app.serve``) in this process on loopback
  with mutual TLS, and real ``SiteAgent`` objects hosted in 2 worker processes.
- Flower: its Simulation Runtime (Ray backend) via ``flower_workload.run_flower_simulation``.

Like for like: ``bench`` holds a one-example held-out split, so fedcore's evaluation is a
central no-op, as Flower's workload skips evaluation (``fraction_evaluate=0``).

Per-round figures are medians over rounds 2..R: round 1 is warm-up (first encodes, lazy
imports, connection setup) for every system alike.

    python simulations/benchmarks/round_overhead.py [--quick] [--skip-flower] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import fedcore
from fedcore import pki
from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
from fedcore.engine import RoundRecord, RunState
from fedcore.engine.run_store import SqliteRunStore
from fedcore.server.app import serve
from fedcore.tasks import build_task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling Flower helper
from environment import environment, rounds_progress
from flower_workload import run_flower_simulation

WORKLOADS = [(10, 100_000), (100, 100_000), (50, 1_000_000)]
WORKERS = 2  # site-hosting processes for the gRPC run
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "round_overhead.json"
QUICK_OUT = DEFAULT_OUT.with_suffix(".quick.json")  # a smoke test never overwrites the real report
STEP = 0.01  # bench task's per-round update; used to check that every round really ran

OnRound = Callable[[RoundRecord], None]


def experiment_for(sites: int, params: int, rounds: int) -> fedcore.Experiment:
    return fedcore.load_experiment().override(
        task__name=f"bench:{params}",
        simulation__sites=sites,
        federation__min_sites=sites,  # every round waits for, and uses, every site
        federation__rounds=rounds,
    )


def check_final(w: np.ndarray, rounds: int) -> None:
    """Every round ran and aggregated: identical +STEP updates add STEP per round."""
    if not np.allclose(w, STEP * rounds, atol=1e-4):
        raise RuntimeError(f"final model != {STEP} * {rounds}: got mean {float(np.mean(w))}")


def summarise(seconds: list[float]) -> dict[str, Any]:
    steady = seconds[1:] or seconds  # round 1 is warm-up
    return {"seconds_per_round": seconds, "median_seconds": statistics.median(steady)}


class RoundClock:
    """Timestamps round ends. RoundRecord.seconds covers sampling to evaluation; the wall
    time between round ends also includes the store's per-round checkpoint, so it is kept
    alongside as a cross-check."""

    def __init__(self, on_round: OnRound) -> None:
        self.on_round = on_round
        self.ends: list[float] = []

    def __call__(self, record: RoundRecord) -> None:
        self.ends.append(time.perf_counter())
        self.on_round(record)

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]


# ----- fedcore in-process -----


def run_inprocess(sites: int, params: int, rounds: int, on_round: OnRound) -> dict[str, Any]:
    clock = RoundClock(on_round)
    started = time.perf_counter()
    # One worker: the sites do no computation worth parallelising, and worker processes
    # would add a copy of the model each way per site (measured: 100 x 100K takes ~210 ms
    # per round with 2 forked workers against ~40 ms in-process).
    experiment = experiment_for(sites, params, rounds).override(simulation__workers=1)
    result, _ = fedcore.run_simulation(experiment, None, on_round=clock)
    total = time.perf_counter() - started
    check_final(result.parameters["w"], rounds)
    return {
        **summarise([r.seconds for r in result.records]),
        "round_end_intervals_seconds": clock.intervals(),
        "total_seconds": total,
    }


# ----- fedcore over gRPC -----


async def _host_sites(port: int, params: int, kits: list[Path]) -> int:
    """Worker mode: run one SiteAgent per kit in this loop until the server ends the run."""
    task = build_task(f"bench:{params}")  # stateless; one instance serves every agent
    agents = [
        SiteAgent(
            AgentSettings(
                server=f"localhost:{port}",
                task_name=f"bench:{params}",
                data_uri="builtin:1/1",
                tls=pki.site_files(kit),
                give_up_after=60.0,  # a broken run must fail the benchmark, not hang it
            ),
            task,
        )
        for kit in kits
    ]
    async with asyncio.TaskGroup() as group:
        runs = [group.create_task(agent.run()) for agent in agents]
    outcomes = [r.result() for r in runs]
    failed = [(k.name, o.value) for k, o in zip(kits, outcomes, strict=True) if o is not Outcome.COMPLETED]
    if failed:
        print(f"sites did not complete: {failed}", file=sys.stderr)
    return 1 if failed else 0


async def _grpc_run(sites: int, params: int, rounds: int, on_round: OnRound, tmp: Path) -> dict[str, Any]:
    pki_dir = tmp / "pki"
    pki.init(pki_dir, ["localhost"])
    kits = [pki.add_site(pki_dir, f"site-{k}") for k in range(1, sites + 1)]

    workers: list[asyncio.subprocess.Process] = []
    port_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    clock = RoundClock(on_round)
    start = time.perf_counter()

    async def spawn() -> None:
        port = await port_ready
        for part in np.array_split(np.arange(sites), WORKERS):
            argv = ["--host-sites", str(port), "--params", str(params), *(str(kits[i]) for i in part)]
            workers.append(await asyncio.create_subprocess_exec(sys.executable, __file__, *argv))

    spawner = asyncio.create_task(spawn())
    try:
        result = await serve(
            experiment_for(sites, params, rounds),
            listen="127.0.0.1:0",  # add_secure_port binds a free port and returns it
            state=tmp / "state",
            pki_dir=pki_dir,
            on_round=clock,
            on_listening=port_ready.set_result,
        )
        await spawner
        codes = [await asyncio.wait_for(w.wait(), timeout=30) for w in workers]
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()
    if any(codes):
        raise RuntimeError(f"site worker exit codes {codes}")
    check_final(result.parameters["w"], rounds)
    grpc = summarise([r.seconds for r in result.records])
    save = state_save_seconds(result.records, result.parameters, tmp / "save")
    # The rounds wait for the store only when the run accounts privacy (or a write is slower
    # than a round): a plain run's writes go on in a thread while the next round runs.
    blocking = result.commit_wait_seconds / len(result.records)
    return {
        **grpc,
        "state_save_median_seconds": save,
        "state_save_blocking_seconds_per_round": blocking,
        "state_save_fraction_of_round": save / grpc["median_seconds"],
        "state_save_blocking_fraction_of_round": blocking / grpc["median_seconds"],
        "round_end_intervals_seconds": clock.intervals(),
        # PKI, worker start-up (interpreter + imports) and TLS handshakes, plus round 1.
        "startup_and_first_round_seconds": clock.ends[0] - start,
        "total_seconds": time.perf_counter() - start,
    }


def state_save_seconds(
    records: list[RoundRecord], parameters: dict[str, np.ndarray], directory: Path
) -> float:
    """Median time to make one round durable, as the server does after each: the run's state
    (model, strategy, stages) and the round's record in one SQLite transaction (fsync'd),
    then the views (metrics.jsonl, sites.jsonl, model.safetensors) appended or replaced."""
    store = SqliteRunStore(directory)
    store.open_run(run_id="bench", experiment={})
    times = []
    try:
        for record in records:
            state = RunState("bench", record.round, parameters, roster=list(record.sampled))
            started = time.perf_counter()
            store.record(record, state)
            times.append(time.perf_counter() - started)
    finally:
        store.close()
    return statistics.median(times)


def run_grpc(sites: int, params: int, rounds: int, on_round: OnRound) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedcore-bench-") as tmp:
        return asyncio.run(_grpc_run(sites, params, rounds, on_round, Path(tmp)))


# ----- Flower -----


def run_flower(sites: int, params: int, rounds: int) -> dict[str, Any]:
    raw = run_flower_simulation(sites=sites, params=params, rounds=rounds)
    return {**raw, **summarise(raw["seconds_per_round"])}


# ----- driver -----


def _fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}K" if n % 1000 == 0 else str(n)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def benchmark(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    workloads = WORKLOADS[:1] if args.quick else WORKLOADS
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with rounds_progress(console) as progress:
        for sites, params in workloads:
            label = f"{sites} sites x {_count(params)} params"
            row: dict[str, Any] = {"sites": sites, "params": params}

            def ticker(description: str, label: str = label) -> OnRound:
                task_id = progress.add_task(f"{label}: {description}", total=args.rounds)
                return lambda _: progress.advance(task_id)

            row["fedcore_inprocess"] = run_inprocess(sites, params, args.rounds, ticker("fedcore in-process"))
            row["fedcore_grpc"] = run_grpc(sites, params, args.rounds, ticker("fedcore gRPC+mTLS"))
            if not args.skip_flower:
                # Flower runs in its own interpreter; progress moves only when it finishes.
                t = progress.add_task(f"{label}: Flower simulation", total=args.flower_rounds)
                row["flower"] = run_flower(sites, params, args.flower_rounds)
                progress.update(t, completed=args.flower_rounds)
            flower = row.get("flower", {}).get("median_seconds")
            row["flower_over_inprocess"] = _ratio(flower, row["fedcore_inprocess"]["median_seconds"])
            row["flower_over_grpc"] = _ratio(flower, row["fedcore_grpc"]["median_seconds"])
            rows.append(row)
    return {
        "benchmark": "round_overhead",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "statistic": "median seconds per round over rounds 2..R (round 1 is warm-up)",
        "rounds": {"fedcore": args.rounds, "flower": None if args.skip_flower else args.flower_rounds},
        "grpc_setup": f"server in the benchmark process, loopback, mutual TLS; sites in {WORKERS} worker processes",
        **environment(load_before),
        "workloads": rows,
    }


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Per-round overhead (median of rounds 2..R, {report['machine']['nproc']} CPUs)")
    names = (
        "workload", "fedcore in-proc", "fedcore gRPC", "Flower", "Flower/in-proc", "Flower/gRPC", "state save",
    )  # fmt: skip
    for name in names:
        table.add_column(name, justify="left" if name == names[0] else "right")
    for row in report["workloads"]:
        ratios = [row["flower_over_inprocess"], row["flower_over_grpc"]]
        grpc = row["fedcore_grpc"]
        table.add_row(
            f"{row['sites']} x {_count(row['params'])}",
            _fmt(row["fedcore_inprocess"]["median_seconds"]),
            _fmt(row["fedcore_grpc"]["median_seconds"]),
            _fmt(row.get("flower", {}).get("median_seconds")),
            *("—" if r is None else f"{r:.1f}x" for r in ratios),
            f"{_fmt(grpc['state_save_median_seconds'])} ({grpc['state_save_fraction_of_round']:.1%}); "
            f"rounds wait {_fmt(grpc['state_save_blocking_seconds_per_round'])} "
            f"({grpc['state_save_blocking_fraction_of_round']:.1%})",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="only 10 sites x 100K params")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--rounds", type=int, default=6, help="fedcore rounds (default 6)")
    ap.add_argument("--flower-rounds", type=int, default=5, help="Flower rounds (default 5)")
    ap.add_argument(
        "--out", type=Path, help=f"JSON report (default {DEFAULT_OUT.name}; {QUICK_OUT.name} with --quick)"
    )
    # Internal: worker mode for the gRPC run: PORT, then the site kits to host.
    ap.add_argument("--host-sites", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--params", type=int, help=argparse.SUPPRESS)
    ap.add_argument("kits", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.host_sites is not None:
        logging.basicConfig(level=logging.WARNING)
        sys.exit(asyncio.run(_host_sites(args.host_sites, args.params, args.kits)))
    if args.rounds < 2 or args.flower_rounds < 2:
        ap.error("need at least 2 rounds: round 1 is excluded as warm-up")

    console = Console()
    report = benchmark(args, console)
    render(report, console)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
