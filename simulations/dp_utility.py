"""What differential privacy costs in accuracy: the utility table of simulations/README.md.

Two federations, every run through `fedcore simulate`'s own code path (run_simulation):
- digits, 10 sites, dirichlet:0.5, 30 rounds: no DP (the CNN and the linear model, the task's
  defaults), and sample-level DP-SGD at epsilon 1, 3 and 8 (delta 1e-5, add-remove, PLD)
  with nothing but the target set: the task's private defaults (a linear model on centred
  pixels, one full-batch step per round at lr 4, clip 1, the average of the global models);
  the replace-one epsilon of the same run beside each;
- breast_cancer logistic regression, 100 virtual sites, 10 per round, 30 rounds: no DP, and
  user-level DP at epsilon 1 and 8, central (DP-FedAvg, server noise) and distributed
  (discrete Gaussian added by the sites under SecAgg+, each site accounted for its own
  rounds), the latter with its default 20-bit rotated secure sum and with 64-bit integers
  (what the small modulus costs), and at epsilon 1 with all 100 sites in every round.

    python simulations/dp_utility.py [--rounds R] [--only digits|breast_cancer] [--out DIR]

Writes results/dp_utility.json and results/dp_utility.png and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedcore import load_experiment, run_simulation
from fedcore.config import Experiment

HERE = Path(__file__).resolve().parent
DELTA = 1e-5


def digits_runs(rounds: int) -> dict[str, Experiment]:
    base = load_experiment().override(
        task__name="digits",
        simulation__sites=10,
        data__partition="dirichlet:0.5",
        federation__rounds=rounds,
        privacy__delta=DELTA,
        privacy__max_grad_norm=1.0,
    )
    runs = {"no DP, CNN (task defaults)": base, "no DP, linear": base.override(task__model="linear")}
    for eps in (8, 3, 1):  # the task's private defaults: what a user gets without tuning
        runs[f"sample eps={eps}"] = base.override(privacy__mode="sample", privacy__target_epsilon=float(eps))
    return runs


def breast_cancer_runs(rounds: int) -> dict[str, Experiment]:
    base = load_experiment().override(
        task__name="breast_cancer",
        simulation__sites=100,
        federation__sites_per_round=10,
        federation__min_sites=1,
        data__partition="iid",
        federation__rounds=rounds,
        privacy__delta=DELTA,
        privacy__clip_norm=0.5,
    )
    runs = {"no DP": base}
    for eps in (8, 1):
        runs[f"user-central eps={eps}"] = base.override(
            privacy__mode="user-central", privacy__target_epsilon=float(eps)
        )
    for bits in (20, 64):
        for eps in (8, 1):
            runs[f"user-distributed {bits} bits eps={eps}"] = base.override(
                privacy__mode="user-distributed",
                privacy__target_epsilon=float(eps),
                secure_aggregation__enabled=True,
                secure_aggregation__bits=bits,
            )
    # The server knows who took part, so sampling buys no amplification: the noise on the sum
    # is the same whoever is in it, and the most signal per noise is every site in every round.
    runs["user-distributed 20 bits eps=1, all 100 sites a round"] = runs[
        "user-distributed 20 bits eps=1"
    ].override(federation__sites_per_round=100)
    return runs


def run_all(
    groups: dict[str, dict[str, Experiment]], repeats: int, console: Console
) -> dict[str, list[dict[str, Any]]]:
    """Each run `repeats` times: DP noise comes from the secure source, so runs differ."""
    results: dict[str, list[dict[str, Any]]] = {}
    total = sum(len(g) for g in groups.values()) * repeats
    with Progress(console=console) as progress:
        bar = progress.add_task("runs", total=total)
        for group, runs in groups.items():
            for label, experiment in runs.items():
                finals, bests, curves, seconds = [], [], [], []
                for k in range(repeats):
                    progress.update(bar, description=f"{group}: {label} ({k + 1}/{repeats})")
                    started = time.perf_counter()
                    result, summary = run_simulation(experiment, None)
                    seconds.append(time.perf_counter() - started)
                    finals.append(summary["final_accuracy"])
                    bests.append(summary["best_accuracy"])
                    curves.append([r.accuracy for r in result.records])
                    progress.advance(bar)
                privacy = summary.get("privacy", {})
                results.setdefault(group, []).append(
                    {
                        "run": label,
                        "final_accuracy": statistics.mean(finals),
                        "final_accuracy_runs": finals,
                        "best_accuracy": statistics.mean(bests),
                        "epsilon": privacy.get("epsilon"),
                        "epsilon_replace_one": privacy.get("epsilon_replace_one"),
                        "adjacency": privacy.get("adjacency"),
                        "accountant": privacy.get("accountant"),
                        "delta": privacy.get("delta"),
                        "noise_multiplier": privacy.get("noise_multiplier")
                        or max(privacy.get("site_noise_multiplier", {}).values(), default=None),
                        "accuracy_per_round": [statistics.mean(a) for a in zip(*curves, strict=True)],
                        "epsilon_per_round": [r.epsilon for r in result.records],
                        "seconds": statistics.mean(seconds),
                    }
                )
    return results


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, (group, rows) in zip(axes[0], results.items(), strict=True):
        for row in rows:
            eps = f" (eps {row['epsilon']:.2f})" if row["epsilon"] is not None else ""
            ax.plot(
                range(1, len(row["accuracy_per_round"]) + 1),
                row["accuracy_per_round"],
                label=row["run"] + eps,
            )
        ax.set(xlabel="round", ylabel="test accuracy", title=group, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (the noise differs each run)")
    parser.add_argument("--only", choices=["digits", "breast_cancer"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    groups = {}
    if args.only in (None, "digits"):
        groups["digits, 10 sites, dirichlet:0.5, sample-level DP"] = digits_runs(args.rounds)
    if args.only in (None, "breast_cancer"):
        groups["breast_cancer, 100 sites (10 per round), user-level DP"] = breast_cancer_runs(args.rounds)
    console = Console(stderr=True)
    results = run_all(groups, args.repeats, console)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        "dp_utility"
        if args.only is None and args.rounds == 30
        else f"dp_utility-{args.only or 'all'}-{args.rounds}"
    )
    (args.out / f"{stem}.json").write_text(
        json.dumps({"rounds": args.rounds, "results": results}, indent=1) + "\n"
    )
    plot(results, args.out / f"{stem}.png")
    for group, rows in results.items():
        table = Table(title=f"{group}, {args.rounds} rounds, mean of {args.repeats} runs")
        for column in (
            "run",
            "epsilon (delta 1e-5)",
            "replace-one epsilon",
            "noise multiplier",
            "final accuracy (min-max)",
            "best accuracy",
            "s per run",
        ):
            table.add_column(column, justify="left" if column == "run" else "right")
        for row in rows:
            table.add_row(
                row["run"],
                f"{row['epsilon']:.3f} ({row['adjacency']}, {row['accountant']})"
                if row["epsilon"] is not None
                else "-",
                f"{row['epsilon_replace_one']:.3f}" if row.get("epsilon_replace_one") else "-",
                f"{row['noise_multiplier']:.3f}" if row["noise_multiplier"] else "-",
                f"{row['final_accuracy']:.3f} ({min(row['final_accuracy_runs']):.3f}-{max(row['final_accuracy_runs']):.3f})",
                f"{row['best_accuracy']:.4f}",
                f"{row['seconds']:.1f}",
            )
        Console(width=150).print(table)
    print(f"wrote {args.out / (stem + '.json')} and {stem}.png")


if __name__ == "__main__":
    main()
