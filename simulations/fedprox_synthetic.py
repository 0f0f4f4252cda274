"""Reproduce FedProx's Synthetic(1,1) comparison under 50% stragglers (Li et al. 2020, fig. 1).

Runs `fedprox_synthetic.toml` twice, FedAvg (stragglers dropped) and FedProx (mu = 1,
stragglers' partial work kept), and plots, per round, the global model's training loss
(f(w) = sum_k p_k F_k(w) over all 30 devices' training data, as in the paper) and its test
accuracy (the devices' pooled held-out 20%).

    python simulations/fedprox_synthetic.py [--rounds R] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedcore import build_task, load_experiment, run_simulation
from fedcore.config import Experiment
from fedcore.engine import RoundRecord
from fedcore.tasks import Dataset
from fedcore.tasks.synthetic import Synthetic
from fedcore.tensors import Arrays

HERE = Path(__file__).resolve().parent


class TrainingLoss:
    """A round observer: the global model's loss on every device's training data."""

    def __init__(self, experiment: Experiment) -> None:
        task = build_task(experiment.task.name, experiment.task.model)
        assert isinstance(task, Synthetic)
        self.task = task
        parts = [task.device_data(k, experiment.seed)[0] for k in range(experiment.simulation.sites)]
        self.train = Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
        self.losses: list[float] = []

    def record(self, record: RoundRecord, parameters: Arrays) -> None:
        self.losses.append(self.task.evaluate(parameters, self.train).loss)


def run(experiment: Experiment, label: str, progress: Progress) -> dict[str, object]:
    observer = TrainingLoss(experiment)
    bar = progress.add_task(label, total=experiment.federation.rounds)
    result, summary = run_simulation(
        experiment, None, observers=[observer], on_round=lambda r: progress.advance(bar)
    )
    return {
        "label": label,
        "train_loss": observer.losses,
        "test_accuracy": [r.accuracy for r in result.records],
        "sites": [r.sites for r in result.records],
        "wall_seconds": summary["wall_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="override the experiment's rounds")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    base = load_experiment(HERE / "fedprox_synthetic.toml").override(federation__rounds=args.rounds)
    runs = [
        (base.override(strategy__name="fedavg"), "FedAvg (stragglers dropped)"),
        (base, f"FedProx (mu = {base.strategy.proximal_mu:g}, partial work kept)"),
    ]
    console = Console()
    with Progress(console=console) as progress:
        results = [run(e, label, progress) for e, label in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fedprox_synthetic.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "fedprox_synthetic.png", base)
    table = Table(title="Synthetic(1,1), 30 devices, 10 per round, 50% stragglers")
    for column in (
        "run",
        "final train loss",
        "min train loss",
        "final test acc.",
        "best test acc.",
        "sites/round",
    ):
        table.add_column(column, justify="right")
    for r in results:
        losses, accs = r["train_loss"], r["test_accuracy"]
        assert isinstance(losses, list) and isinstance(accs, list) and isinstance(r["sites"], list)
        table.add_row(
            str(r["label"]), f"{losses[-1]:.4f}", f"{min(losses):.4f}", f"{accs[-1]:.4f}", f"{max(accs):.4f}",
            f"{np.mean(r['sites']):.1f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"wrote {args.out / 'fedprox_synthetic.png'} and fedprox_synthetic.json")


def plot(results: list[dict[str, object]], path: Path, experiment: Experiment) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        losses, accs = r["train_loss"], r["test_accuracy"]
        assert isinstance(losses, list) and isinstance(accs, list)
        rounds = range(1, len(losses) + 1)
        loss_ax.plot(rounds, losses, label=str(r["label"]))
        acc_ax.plot(rounds, accs, label=str(r["label"]))
    loss_ax.set(xlabel="round", ylabel="training loss f(w)", title="global training loss")
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="global test accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Synthetic(1,1): {experiment.simulation.sites} devices, {experiment.federation.sites_per_round} per round, "
        f"{experiment.task.local_epochs} local epochs, {experiment.simulation.stragglers:.0%} stragglers"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
