"""Where a gRPC round's time goes: the server's event loop profiled over rounds 2..R.

The workload of `round_overhead.py` over gRPC with mutual TLS (default 50 sites x 1M
params: the one that stays at 1x Flower), with cProfile on the server's loop thread from the
end of round 1 to the end of the run. fedcore's steps are read as cumulative time (their
numpy work included); gRPC's reads and writes as the own time of the functions that make
them (they run inline: TLS and the socket); the time the loop waited for the network and
the sites is epoll's; the rest is asyncio, gRPC's Python glue and the engine. Site processes are not profiled (their CPU
time is reported).

    python simulations/benchmarks/round_profile.py [--sites 50] [--params 1000000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import pstats
import resource
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment
from round_overhead import run_grpc

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "round_profile.json"

# (label, file suffix, function, own): a step's time, its callees included (own=False), or
# the function's own time (own=True: gRPC's Cython calls made from it count there, since
# they are not Python functions; a chunk's TLS encryption and socket write run inline).
STEPS = [
    ("gRPC writes (TLS, socket), in the loop's thread", "server/transport.py", "_send", True),
    ("gRPC reads (TLS, socket), in the loop's thread", "server/inbound.py", "_read", True),
    ("fold into the exact sum", "aggregation/exact_sum.py", "add", False),
    ("the exact total and the mean", "aggregation/exact_sum.py", "total", False),
    ("check an update: finite", "tensors/codec.py", "check_finite", False),
    ("check an update: names, shapes", "tensors/codec.py", "check_like", False),
    ("assemble payloads from chunks", "tensors/codec.py", "add", False),
    ("decode chunk frames", "fedcore/wire.py", "chunk_data", False),
    ("build chunk frames", "fedcore/wire.py", "chunk_frame", False),
    ("next model (FedAvg)", "strategies/fedavg.py", "apply", False),
    ("waiting (epoll: the network, the sites)", "~", "<method 'poll' of 'select.epoll' objects>", True),
]


def seconds(stats: pstats.Stats, suffix: str, function: str, own: bool) -> float:
    total = 0.0
    for (file, _, name), (_, _, tottime, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and file.endswith(suffix):
            total += tottime if own else cum
    return total


def profile(sites: int, params: int, rounds: int) -> dict[str, Any]:
    profiler = cProfile.Profile()
    window: dict[str, float] = {}

    def on_round(record: Any) -> None:
        if record.round == 1:
            window["start"] = time.perf_counter()
            profiler.enable()

    result = run_grpc(sites, params, rounds, on_round)
    profiler.disable()
    wall = time.perf_counter() - window["start"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = pstats.Stats(profiler)
    profiled = rounds - 1
    steps = [(label, seconds(stats, suffix, fn, own)) for label, suffix, fn, own in STEPS]
    rest = wall - sum(s for _, s in steps)
    rows = [*steps, ("the rest: asyncio, gRPC's Python glue, the engine, profiling", rest)]
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]  # type: ignore[attr-defined]
    return {
        "sites": sites,
        "params": params,
        "rounds_profiled": profiled,
        "median_round_seconds": result["median_seconds"],
        "profiled_wall_seconds": wall,
        "steps_seconds_per_round": {label: s / profiled for label, s in rows},
        "site_processes_cpu_seconds_per_round": (children.ru_utime + children.ru_stime) / rounds,
        "top_functions_by_own_time": [
            {"function": f"{Path(file).name}:{line} {name}", "seconds_per_round": own / profiled}
            for (file, line, name), (_, _, own, _, _) in top
        ],
    }


def render(report: dict[str, Any], console: Console) -> None:
    per_round = report["profiled_wall_seconds"] / report["rounds_profiled"]
    table = Table(
        title=f"A gRPC round, {report['sites']} sites x {report['params']:,} params: "
        f"{per_round:.3f} s (the server's loop, cProfile)"
    )
    table.add_column("step")
    table.add_column("s / round", justify="right")
    table.add_column("share", justify="right")
    for label, seconds in report["steps_seconds_per_round"].items():
        table.add_row(label, f"{seconds:.3f}", f"{seconds / per_round:.0%}")
    console.print(table)
    console.print(
        f"site processes' CPU: {report['site_processes_cpu_seconds_per_round']:.2f} s a round "
        "(2 processes on the same 2 cores; their start-up included, spread over the rounds)"
    )
    top = Table(title="Top functions by own time (server loop)")
    top.add_column("function")
    top.add_column("s / round", justify="right")
    for row in report["top_functions_by_own_time"]:
        top.add_row(row["function"], f"{row['seconds_per_round']:.3f}")
    console.print(top)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=6, help="rounds (default 6; round 1 is not profiled)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    console = Console()
    load_before = os.getloadavg()
    console.print(
        f"profiling {args.sites} sites x {args.params:,} params over gRPC, {args.rounds} rounds ..."
    )
    report = {
        "benchmark": "round_profile",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(load_before),
        **profile(args.sites, args.params, args.rounds),
    }
    render(report, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
