"""Whole simulations, fedcore vs Flower: wall time, peak memory and final accuracy.

One run, the same workloads in both frameworks, one after the other:

- A. ``digits`` CNN: 100 sites, 10 per round, 1 local epoch, 20 rounds, ``dirichlet:0.5``.
- B. ``synthetic`` (FedProx's Synthetic(1,1), logistic regression): 1,000 devices, 100 per
  round, 5 rounds, ``--synthetic-epochs`` local epochs (default 1; fedcore's task default
  is FedProx's 20, which would take roughly 20x as long: ~10 min per framework on 2 cores).

Both use FedAvg with centralised evaluation on the task's test split, the same initial
model, the same sites each round and the same per-site work, since the Flower ClientApp
trains with fedcore's own task objects (see ``flower_tasks.py``).

- fedcore: ``fedcore.run_simulation`` (in-process transport, ``workers`` = number of cores,
  spawned worker processes), writing its outputs to a temporary directory.
- Flower: its Simulation Runtime (``flwr.simulation.run_simulation``, Ray backend,
  ``num_cpus`` = number of cores, one CPU per client actor) with the message-API ``FedAvg``.

Each framework runs in its own fresh interpreter. This process samples the summed RSS of
that interpreter and all its descendants (fedcore's workers; Ray's GCS, raylet and actors)
every 0.2 s: the same measurement for both. Wall time is the ``run_simulation`` call itself
(setup, every round, evaluation and teardown; not interpreter start-up and imports, which
are reported separately as ``process_seconds``).

    python simulations/benchmarks/simulation_vs_flower.py [--quick] [--only digits|synthetic]
        [--synthetic-epochs N] [--out PATH]

writes results/simulation_vs_flower.json (``--quick``: results/simulation_vs_flower.quick.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from environment import environment, rounds_progress  # this directory is sys.path[0]
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from fedcore.simulation.memory import PeakMemory

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "simulation_vs_flower.json"
# A smoke test must not replace the real report.
QUICK_OUT = HERE / "results" / "simulation_vs_flower.quick.json"
FRAMEWORKS = ("fedcore", "flower")
TARGET_SPEEDUP = 3.0  # issue 3: fedcore >= 3x faster than Flower ...
TARGET_MEMORY = 0.5  # ... with at most half its peak memory, at equal accuracy
ACCURACY_TOLERANCE = 0.02  # "equal accuracy": within 2 percentage points

Emit = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    task: str
    sites: int
    per_round: int
    rounds: int
    local_epochs: int
    partition: str | None  # None: the task's default

    def overrides(self) -> dict[str, Any]:
        """``Experiment.override`` keywords; both frameworks build the same Experiment."""
        return {
            "task__name": self.task,
            "simulation__sites": self.sites,
            "federation__sites_per_round": self.per_round,
            "federation__min_sites": self.per_round,
            "task__local_epochs": self.local_epochs,
            "federation__rounds": self.rounds,
            "data__partition": self.partition,
        }


def workloads(*, quick: bool, synthetic_epochs: int) -> list[Workload]:
    def make(
        key: str, task: str, sites: int, per_round: int, rounds: int, epochs: int, part: str | None
    ) -> Workload:
        return Workload(key, task, sites, per_round, rounds, epochs, part)

    if quick:
        return [
            make("digits", "digits", 10, 3, 2, 1, "dirichlet:0.5"),
            make("synthetic", "synthetic", 20, 5, 2, synthetic_epochs, None),
        ]
    return [
        make("digits", "digits", 100, 10, 20, 1, "dirichlet:0.5"),
        make("synthetic", "synthetic", 1000, 100, 5, synthetic_epochs, None),
    ]


# ----- children: one framework's run in a fresh interpreter -----


def _fedcore_child(overrides: dict[str, Any], emit: Emit) -> dict[str, Any]:
    import fedcore
    from fedcore.engine import RoundRecord
    from fedcore.simulation.runners import cores

    experiment = fedcore.load_experiment().override(**overrides)

    def on_round(record: RoundRecord) -> None:
        emit({"event": "round", "round": record.round, "accuracy": record.accuracy})

    with tempfile.TemporaryDirectory(prefix="fedcore-vs-flower-") as out:
        emit({"event": "start"})
        started = time.perf_counter()
        result, summary = fedcore.run_simulation(experiment, Path(out), on_round=on_round)
        seconds = time.perf_counter() - started
    return {
        "run_seconds": seconds,
        "final_accuracy": summary["final_accuracy"],
        "final_loss": summary["final_loss"],
        "accuracy_per_round": [r.accuracy for r in result.records],
        "sampled_per_round": [[int(s.removeprefix("site-")) for s in r.sampled] for r in result.records],
        "workers": experiment.simulation.workers or cores(),
        "own_peak_memory_bytes": summary["peak_memory_bytes"],  # fedcore's own sampler, a cross-check
    }


def _child(framework: str, overrides: dict[str, Any], events_fd: int) -> None:
    with os.fdopen(events_fd, "w", buffering=1) as events:

        def emit(event: dict[str, Any]) -> None:
            events.write(json.dumps(event) + "\n")

        if framework == "fedcore":
            result = _fedcore_child(overrides, emit)
        else:
            import flower_tasks  # by name, not __main__: see its docstring

            result = flower_tasks.simulate(overrides, emit)
        emit({"event": "result", **result})


# ----- parent: run a child, sample its process tree, follow its progress -----


def run_framework(framework: str, workload: Workload, on_round: Callable[[int], None]) -> dict[str, Any]:
    """Run `workload` in `framework` in a fresh interpreter; its output goes to a log file
    (printed on failure), its progress events come through a pipe."""
    from environment import QUIET_ENV  # this directory is sys.path[0]

    read_fd, write_fd = os.pipe()
    env = {
        **os.environ,
        **QUIET_ENV,  # set before flwr/ray are imported, and inherited by Ray's processes
        # Ray's workers import flower_tasks (the ClientApp's helpers) by name.
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [
        sys.executable, str(Path(__file__).resolve()),
        "--child", framework, "--overrides", json.dumps(workload.overrides()), "--events-fd", str(write_fd),
    ]  # fmt: skip
    result: dict[str, Any] | None = None
    run_start: float | None = None
    round_ends: list[float] = []  # seconds since the child's run_simulation call began
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(write_fd,))
        os.close(write_fd)
        memory = PeakMemory(proc.pid)
        memory.start()
        try:
            events: IO[str]
            with os.fdopen(read_fd) as events:
                for line in events:
                    event = json.loads(line)
                    if event["event"] == "start":
                        run_start = time.perf_counter()
                    elif event["event"] == "round" and event["round"] >= 1:
                        round_ends.append(time.perf_counter() - (run_start or started))
                        on_round(event["round"])
                    elif event["event"] == "result":
                        result = event
            code = proc.wait()
        finally:
            memory.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        process_seconds = time.perf_counter() - started
        if code != 0 or result is None:
            log.seek(0)
            tail = log.read()[-4000:]
            raise RuntimeError(f"{framework} run of {workload.key} failed (exit {code}); log tail:\n{tail}")
    result.pop("event")
    return {
        **result,
        "peak_memory_bytes": memory.bytes,
        "peak_rss_bytes": memory.rss_bytes,
        "peak_process_count": memory.processes,
        "process_seconds": process_seconds,
        # Setup + round 1, then each round; what is left of run_seconds is teardown.
        "round_end_seconds": round_ends,
    }


# ----- driver -----


def compare(fedcore_run: dict[str, Any], flower_run: dict[str, Any]) -> dict[str, Any]:
    speedup = flower_run["run_seconds"] / fedcore_run["run_seconds"]
    memory = fedcore_run["peak_memory_bytes"] / flower_run["peak_memory_bytes"]
    accuracy_gap = fedcore_run["final_accuracy"] - flower_run["final_accuracy"]
    equal_accuracy = abs(accuracy_gap) <= ACCURACY_TOLERANCE
    return {
        "flower_over_fedcore_time": speedup,
        "flower_over_fedcore_process_time": flower_run["process_seconds"] / fedcore_run["process_seconds"],
        "fedcore_over_flower_memory": memory,
        "accuracy_gap": accuracy_gap,
        "same_sites_every_round": fedcore_run["sampled_per_round"] == flower_run["sampled_per_round"],
        "target_met": speedup >= TARGET_SPEEDUP and memory <= TARGET_MEMORY and equal_accuracy,
    }


def _set_completed(progress: Progress, task_id: TaskID, rounds: int) -> None:
    progress.update(task_id, completed=rounds)


def benchmark(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    chosen = [
        w
        for w in workloads(quick=args.quick, synthetic_epochs=args.synthetic_epochs)
        if args.only in (None, w.key)
    ]
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with rounds_progress(console) as progress:
        for workload in chosen:
            row: dict[str, Any] = {"workload": dataclasses.asdict(workload)}
            for framework in FRAMEWORKS:
                name = "fedcore" if framework == "fedcore" else "Flower"
                task_id = progress.add_task(f"{workload.key}: {name}", total=workload.rounds)
                advance = functools.partial(_set_completed, progress, task_id)
                row[framework] = run_framework(framework, workload, advance)
            row["comparison"] = compare(row["fedcore"], row["flower"])
            rows.append(row)
    return {
        "benchmark": "simulation_vs_flower",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "target": {
            "flower_over_fedcore_time_at_least": TARGET_SPEEDUP,
            "fedcore_over_flower_memory_at_most": TARGET_MEMORY,
            "accuracy_gap_at_most": ACCURACY_TOLERANCE,
        },
        "measurement": {
            "run_seconds": "the run_simulation call (setup, rounds, central evaluation, teardown)",
            "process_seconds": "the child interpreter from spawn to exit (adds imports)",
            "peak_memory_bytes": "max over 0.2 s samples of summed PSS of the child and all descendants (shared pages split)",
            "peak_rss_bytes": "the same with RSS (shared pages counted once per process: an upper bound)",
        },
        "strategy": "FedAvg, central evaluation on the task's test split",
        **environment(load_before),
        "workloads": rows,
    }


def render(report: dict[str, Any], console: Console) -> None:
    title = f"Simulation, fedcore vs Flower ({report['machine']['nproc']} CPUs{', quick' if report['quick'] else ''})"
    table = Table(title=title, caption="ratio rows: Flower/fedcore time, fedcore/Flower memory, accuracy gap")
    for name in ("workload", "framework", "wall s", "process s", "peak MiB", "accuracy"):
        table.add_column(name, justify="left" if name in ("workload", "framework") else "right")
    for i, row in enumerate(report["workloads"]):
        w = row["workload"]
        for framework in FRAMEWORKS:
            run = row[framework]
            table.add_row(
                w["task"] if framework == "fedcore" else "",
                "fedcore" if framework == "fedcore" else f"Flower {run['flower_version']}",
                f"{run['run_seconds']:.1f}",
                f"{run['process_seconds']:.1f}",
                f"{run['peak_memory_bytes'] / 2**20:,.0f}",
                f"{run['final_accuracy']:.3f}",
            )
        c = row["comparison"]
        table.add_row(
            "",
            "ratio " + ("[green]target met[/green]" if c["target_met"] else "[red]target not met[/red]"),
            f"{c['flower_over_fedcore_time']:.2f}x",
            f"{c['flower_over_fedcore_process_time']:.2f}x",
            f"{c['fedcore_over_flower_memory']:.2f}",
            f"{c['accuracy_gap']:+.3f}",
            end_section=i < len(report["workloads"]) - 1,
        )
    console.print(table)
    for row in report["workloads"]:
        w, c = row["workload"], row["comparison"]
        console.print(
            f"{w['task']}: {w['sites']} sites, {w['per_round']} per round, {w['rounds']} rounds, "
            f"{w['local_epochs']} local epoch(s), partition {w['partition'] or 'natural'}; "
            f"same sites every round: {c['same_sites_every_round']}"
        )
    console.print(
        f"target (issue 3): Flower/fedcore time >= {TARGET_SPEEDUP:g}x, fedcore/Flower memory <= "
        f"{TARGET_MEMORY:g}, |accuracy gap| <= {ACCURACY_TOLERANCE:g}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    ap.add_argument("--only", choices=("digits", "synthetic"), help="run one workload only")
    ap.add_argument(
        "--synthetic-epochs",
        type=int,
        default=1,
        help="local epochs for the synthetic workload (default 1; FedProx's setting is 20)",
    )
    ap.add_argument(
        "--out", type=Path, help=f"JSON report (default {DEFAULT_OUT.name}; with --quick, {QUICK_OUT.name})"
    )
    # Internal: child mode, one framework's run.
    ap.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    ap.add_argument("--events-fd", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        _child(args.child, json.loads(args.overrides), args.events_fd)
        return
    if args.synthetic_epochs < 1:
        ap.error("--synthetic-epochs must be >= 1")

    console = Console()
    report = benchmark(args, console)
    render(report, console)
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
