"""Fault injection at every point of a round: `fedcore simulate` is killed with SIGKILL at
each point in turn (before sampling, during fit, during each SecAgg+ stage, after
aggregation, before the round is stored), resumed with `fedcore simulate --resume DIR`,
and its final model compared with the uninterrupted run's. The rounds stored at the kill
are checked too: all completed rounds under DP; without DP the last may still have been
in its write (then it is redone).

    python simulations/fault_injection.py [--round 3] [--out simulations/results]

The suite runs a few of these points (tests/test_resume.py); this runs them all. Prints a
table and writes fault_injection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent
RUNS = {
    "plain": ["--rounds", "4", "--sites", "3", "--workers", "2"],
    "secure": ["--rounds", "4", "--sites", "3", "--workers", "2", "--secure-aggregation"],
    "user-central": ["--rounds", "4", "--sites", "4", "--workers", "2", "--privacy", "user-central"],
}
POINTS = {
    "plain": ["before_sampling", "fit", "after_aggregation", "before_commit"],
    "secure": [
        "before_sampling",
        "advertise",
        "share_keys",
        "masked_input",
        "unmask",
        "after_aggregation",
        "before_commit",
    ],
    "user-central": ["before_sampling", "fit", "after_aggregation", "before_commit"],
}
# Exact for a plain mean; a secure sum rounds stochastically (the suite's SecAgg tolerance).
TOLERANCE = {"plain": 0.0, "secure": 1e-6, "user-central": 0.0}


def simulate(args: list[str], crash_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "FEDCORE_CRASH_AT"}
    if crash_at:
        env["FEDCORE_CRASH_AT"] = crash_at
    done = subprocess.run(
        [sys.executable, "-m", "fedcore", "simulate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if done.returncode not in (0, -signal.SIGKILL):
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode


def rounds(out: Path) -> list[int]:
    path = out / "metrics.jsonl"  # absent: no round stored yet
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round", type=int, default=3, help="the round to kill the run in")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default: all)"
    )
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run, flags in ((r, RUNS[r]) for r in args.runs):
            # Reproducible DP noise for the comparison (tests only): see [privacy] secure_rng.
            config = Path(tmp) / f"{run}.toml"
            config.write_text(
                "[privacy]\nsecure_rng = false\nnoise_multiplier = 1.0\n" if "--privacy" in flags else ""
            )
            base = [str(config), *flags]
            whole = Path(tmp) / f"{run}-whole"
            assert simulate([*base, "--out", str(whole)]) == 0, f"the uninterrupted {run} run failed"
            want = load_file(str(whole / "model.safetensors"))
            for point in POINTS[run]:
                out = Path(tmp) / f"{run}-{point}"
                started = time.perf_counter()
                killed = simulate([*base, "--out", str(out)], f"{args.round}:{point}")
                stored = rounds(out)
                resumed = simulate(["--resume", str(out)])
                got = load_file(str(out / "model.safetensors"))
                diff = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
                # Without DP a round is written while the next runs: the last may be lost (and
                # redone); under DP every completed round is durable before the next starts.
                durable = [list(range(1, args.round))]
                if "--privacy" not in flags:
                    durable.append(list(range(1, args.round - 1)))
                ok = (
                    killed == -signal.SIGKILL
                    and stored in durable
                    and resumed == 0
                    and rounds(out) == [1, 2, 3, 4]
                    and diff <= TOLERANCE[run]
                )
                rows.append(
                    {
                        "run": run,
                        "point": point,
                        "killed_exit": killed,
                        "rounds_stored_at_kill": stored,
                        "resumed_exit": resumed,
                        "max_abs_difference": diff,
                        "ok": ok,
                        "seconds": time.perf_counter() - started,
                    }
                )
                console.print(f"{run:12} {point:18} {'ok' if ok else 'FAILED'}  max |diff| {diff:.2e}")
    table = Table(title=f"fault injection: killed in round {args.round} of 4, resumed")
    for column in ("run", "point", "killed", "stored", "resumed", "max |diff|", "ok"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["run"], r["point"], str(r["killed_exit"]), str(r["rounds_stored_at_kill"]),
            str(r["resumed_exit"]), f"{r['max_abs_difference']:.2e}", "yes" if r["ok"] else "NO",
        )  # fmt: skip
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fault_injection.json").write_text(json.dumps(rows, indent=1))
    console.print(f"wrote {args.out / 'fault_injection.json'}")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
