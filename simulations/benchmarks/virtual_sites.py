"""Virtual sites: a federation's size should cost neither memory nor time per round.

Runs `synthetic` (one device per site, each device's data generated from the seed when it
is sampled) with 200 and with 10,000 sites, 100 sampled per round, and reports seconds per
round and the peak memory of the whole process tree. Target: the 10,000-site run stays
under 3 GiB and within 20% of the 200-site run's time per round.

    python simulations/benchmarks/virtual_sites.py [--rounds 5] [--epochs 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedcore import load_experiment, run_simulation

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "virtual_sites.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--epochs", type=int, default=1, help="local epochs (the FedProx default, 20, is 20x slower)"
    )
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    console = Console()
    rows = []
    with Progress(console=console) as progress:
        for sites in (200, 10_000):
            experiment = load_experiment().override(
                task__name="synthetic",
                task__local_epochs=args.epochs,
                simulation__sites=sites,
                federation__sites_per_round=args.per_round,
                federation__min_sites=args.per_round,
                federation__rounds=args.rounds,
            )
            bar = progress.add_task(f"{sites:,} sites", total=args.rounds)
            result, summary = run_simulation(experiment, None, on_round=lambda r, b=bar: progress.advance(b))
            seconds = [r.seconds for r in result.records]
            # Devices differ in size (lognormal), so the sampled devices' work differs too:
            # compare time per thousand training examples as well as per round.
            per_k = [1000 * r.seconds / (r.examples * args.epochs) for r in result.records]
            rows.append(
                {
                    "sites": sites,
                    "sites_per_round": args.per_round,
                    "seconds_per_round": seconds,
                    "median_seconds": statistics.median(seconds[1:] or seconds),
                    "examples_per_round": [r.examples for r in result.records],
                    "median_seconds_per_1k_examples": statistics.median(per_k[1:] or per_k),
                    "peak_memory_bytes": summary["peak_memory_bytes"],
                    "final_accuracy": summary["final_accuracy"],
                }
            )
    small, large = rows
    ratio = large["median_seconds"] / small["median_seconds"]
    work_ratio = large["median_seconds_per_1k_examples"] / small["median_seconds_per_1k_examples"]
    table = Table(title=f"synthetic, {args.per_round} sites per round, {args.epochs} local epoch(s)")
    for column in (
        "sites",
        "s/round",
        "examples/round",
        "s per 1k examples",
        "peak memory (tree)",
        "accuracy",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            f"{row['sites']:,}",
            f"{row['median_seconds']:.2f}",
            f"{statistics.median(row['examples_per_round']):,.0f}",
            f"{row['median_seconds_per_1k_examples']:.3f}",
            f"{row['peak_memory_bytes'] / 2**30:.2f} GiB",
            f"{row['final_accuracy']:.4f}",
        )
    console.print(table)
    console.print(
        f"time per round, 10,000 / 200 sites: {ratio:.2f}x; per training example: {work_ratio:.2f}x (target <= 1.20)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "virtual_sites",
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "runs": rows,
        "ratio": ratio,
        "ratio_per_example": work_ratio,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
