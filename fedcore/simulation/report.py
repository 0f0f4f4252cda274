"""What a person looks at after a run: report.png, summary.json and a table."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcore.engine import RoundRecord


def plot_report(records: Sequence[RoundRecord], path: Path, *, title: str) -> None:
    """Accuracy and loss of the global model per round, and epsilon when the run is private."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    private = any(r.epsilon is not None for r in records)
    fig, axes = plt.subplots(1, 3 if private else 2, figsize=(15 if private else 10, 4))
    acc_ax, loss_ax = axes[0], axes[1]
    if private:
        eps_ax = axes[2]
        eps_ax.plot(rounds, [r.epsilon for r in records], marker="o", markersize=3, color="tab:red")
        delta = next(r.delta for r in records if r.delta is not None)
        mode = next((r.privacy.get("mode") for r in records if r.privacy), "")
        eps_ax.set(xlabel="round", ylabel="epsilon", title=f"privacy spent ({mode}, delta {delta:g})")
        eps_ax.set_ylim(bottom=0)
    acc_ax.plot(rounds, [r.accuracy for r in records], marker="o", markersize=3)
    acc_ax.set(xlabel="round", ylabel="accuracy", title="global model accuracy", ylim=(0, 1.02))
    loss_ax.plot(rounds, [r.loss for r in records], marker="o", markersize=3, label="test loss")
    if any(r.train_loss is not None for r in records):
        loss_ax.plot(
            rounds,
            [r.train_loss for r in records],
            marker=".",
            alpha=0.7,
            label="sites' train loss",
        )
    loss_ax.set(xlabel="round", ylabel="loss", title="loss")
    loss_ax.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy_summary(privacy: dict[str, Any]) -> str:
    """The lines `fedcore simulate` prints about the privacy a run spent."""
    lines = [
        f"privacy: mode {privacy['mode']}, epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:g} "
        f"(unit: one {privacy['unit']}, {privacy['adjacency']} neighbours; {privacy['accountant']} accountant)"
    ]
    if privacy.get("epsilon_replace_one") is not None:
        lines.append(f"  for replace-one neighbours: epsilon {privacy['epsilon_replace_one']:.3f}")
    if privacy.get("noise_multiplier") is not None:
        lines.append(f"  noise multiplier {privacy['noise_multiplier']:.4g}")
    if privacy.get("site_noise_multiplier"):
        noise = sorted(privacy["site_noise_multiplier"].values())
        what = "DP-SGD noise multipliers" if privacy["mode"] == "sample" else "own noise (in their ledgers)"
        lines.append(f"  sites' {what}: {noise[0]:.4g} to {noise[-1]:.4g}")
    if privacy.get("site_epsilon"):
        values = sorted(privacy["site_epsilon"].values())
        lines.append(
            f"  sites' own epsilon: min {values[0]:.3f}, median {values[len(values) // 2]:.3f}, max {values[-1]:.3f} "
            f"({len(values)} sites)"
        )
    if privacy.get("refused"):
        lines.append(f"  rounds refused by a site's privacy budget: {privacy['refused']}")
    if privacy.get("stopped_early"):
        lines.append(f"  stopped before the last round: {privacy['stopped_early']}")
    if privacy.get("secure_rng") is False:
        lines.append(
            "  WARNING: secure_rng = false: the noise was reproducible; these figures mean NO privacy"
        )
    return "\n".join(lines)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    """The rounds recorded in DIR/metrics.jsonl."""
    path = directory / "metrics.jsonl"
    if not path.is_file():
        from fedcore.errors import ConfigError

        raise ConfigError(
            f"{directory} holds no metrics.jsonl; give directories written by fedcore simulate or server"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_runs(directories: list[Path], out: Path | None) -> Path:
    """Plot the curves of earlier runs in one figure (OUT/compare.png) and print their ends."""
    runs = {d.name or str(d): read_metrics(d) for d in directories}
    out = out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    plot_compare(runs, out / "compare.png")
    for label, rows in runs.items():
        last = rows[-1] if rows else {}
        print(f"{label}: {len(rows)} rounds, final accuracy {last.get('accuracy')}, loss {last.get('loss')}")
    print(f"wrote {out / 'compare.png'}")
    return out / "compare.png"


def plot_compare(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Accuracy and loss per round of several runs in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        rounds = [r["round"] for r in rows]
        acc_ax.plot(rounds, [r.get("accuracy") for r in rows], label=label)
        loss_ax.plot(rounds, [r.get("loss") for r in rows], label=label)
    acc_ax.set(xlabel="round", ylabel="accuracy", title="global model accuracy")
    loss_ax.set(xlabel="round", ylabel="loss", title="global model loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_results(records: list[RoundRecord], summary: dict[str, Any], out: Path) -> None:
    """The table `fedcore simulate` prints at the end of a run, and where its files are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedcore simulate: {summary['task']} ({summary['model']}), {summary['strategy']}")
    table.add_column("round", justify="right")
    table.add_column("sites", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("seconds", justify="right")
    private = any(r.epsilon is not None for r in records)
    if private:
        table.add_column("epsilon", justify="right")
    shown = records if len(records) <= 12 else [*records[:5], None, *records[-5:]]
    for r in shown:
        if r is None:
            table.add_row(*["..."] + [""] * (5 if private else 4))
            continue
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        loss = f"{r.loss:.4f}" if r.loss is not None else "-"
        eps = [f"{r.epsilon:.3f}" if r.epsilon is not None else "-"] if private else []
        table.add_row(str(r.round), str(r.sites), acc, loss, f"{r.seconds:.2f}", *eps)
    out_console = Console()
    out_console.print(table)
    final = summary["final_accuracy"]
    out_console.print(
        f"final accuracy {'-' if final is None else f'{final:.4f}'} after {summary['rounds']} rounds "
        f"in {summary['wall_seconds']:.1f} s; wrote {out}/metrics.jsonl, summary.json, report.png"
    )
    if summary.get("skipped_rounds"):
        out_console.print(
            f"[bold red]WARNING[/]: rounds {summary['skipped_rounds']} were skipped (the model did not move): "
            "every attempt's secure sum was out of range, a site lying under the mask (see metrics.jsonl)"
        )
    if "privacy" in summary:
        out_console.print(privacy_summary(summary["privacy"]))
