"""What sample-level DP-SGD costs at a site: local training time per round (one local
epoch) with and without DP-SGD, in the same process, for the built-in tasks.

Four variants per workload, each `TorchClassifierTask.fit` with the task's default batch
size, learning rate and weight decay, one local epoch and `secure_rng = true` (noise and
Poisson batches from the AES-CTR CSPRNG, as deployed):
- plain: non-private SGD (shuffled batches of `batch_size`);
- dp-sgd: what fedcore runs by default: one-pass book-keeping clipping
  (fedcore/privacy/book_keeping.py) for models of Linear and Conv2d layers;
- opacus: DP-SGD through Opacus's per-sample gradients (ExpandedWeights for convolutional
  models, GradSampleModule's hooks otherwise), fedcore's default before book-keeping;
- ghost: DP-SGD through Opacus's ghost clipping (per-sample norms only).
DP-SGD runs ceil(n / batch_size) Poisson-sampled steps per epoch, as many as plain SGD has
batches, so the per-step figures compare like with like.

Workloads: digits (small CNN) at 10 sites (~144 examples a site) and at 1 site (the whole
~1,400-example training split, where per-step costs dominate); breast_cancer (logistic
regression, and its MLP) at 3 sites. torch runs on one thread, as in fedcore's simulation
workers. Each variant is warmed up once (Opacus import, hooks), then the variants are
timed round-robin (plain, dp-sgd, opacus, ghost, plain, ...) so that noise from a shared
machine hits all of them alike; medians and p90 are reported, and the DP / plain ratio of
medians (target: at most 2.5x). "noise share" is the time `SecureRandom.gaussian_tensor` takes
to draw one round's noise (every parameter, every step), over the DP round's median; the
JSON also has the Poisson sampling draws.

    python simulations/benchmarks/dp_cost.py [--quick] [--repeats R] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.dpsgd import SampleDP
from fedcore.privacy.randomness import SecureRandom
from fedcore.tasks import build_task
from fedcore.tasks.base import SiteData, TrainSettings
from fedcore.tasks.torch_task import TorchClassifierTask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment, version

# (task, model, sites): site 1 of `sites` iid parts of the task's training split.
WORKLOADS: list[tuple[str, str | None, int]] = [
    ("digits", None, 10),
    ("digits", None, 1),
    ("breast_cancer", "logreg", 3),
    ("breast_cancer", "mlp", 3),
]
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0  # fedcore's default
VARIANTS: dict[str, SampleDP | None] = {
    "plain": None,
    "dp_sgd": SampleDP(NOISE_MULTIPLIER, MAX_GRAD_NORM),
    "opacus": SampleDP(NOISE_MULTIPLIER, MAX_GRAD_NORM, book_keeping=False),
    "ghost": SampleDP(NOISE_MULTIPLIER, MAX_GRAD_NORM, ghost_clipping=True),
}
TARGET_RATIO = 2.5
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "dp_cost.json"
QUICK_OUT = DEFAULT_OUT.with_suffix(".quick.json")

# Opacus's hooks fire on the first layer, whose input needs no gradient: harmless, once.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def settings_for(task: TorchClassifierTask, dp: SampleDP | None) -> TrainSettings:
    d = task.defaults
    return TrainSettings(
        local_epochs=1,
        batch_size=d["batch_size"],
        lr=d["lr"],
        weight_decay=d.get("weight_decay", 0.0),
        seed=0,
        dp=dp,
        secure_rng=True,
    )


def csprng_seconds(dimension: int, examples: int, steps: int) -> dict[str, float]:
    """One round's CSPRNG draws, as dpsgd makes them: the Gaussian noise of every step in
    one draw, and the Poisson sampling's uniforms in another (best of 5, a fresh generator
    each time)."""
    noise, sampling = [], []
    for _ in range(5):
        random = SecureRandom()
        started = time.perf_counter()
        random.gaussian_tensor(steps * dimension, NOISE_MULTIPLIER * MAX_GRAD_NORM)
        noise.append(time.perf_counter() - started)
        started = time.perf_counter()
        random.uniform(steps * examples)
        sampling.append(time.perf_counter() - started)
    return {"noise_seconds": min(noise), "sampling_seconds": min(sampling)}


def measure(name: str, model: str | None, sites: int, repeats: int, console: Console) -> dict[str, Any]:
    task = build_task(name, model)
    assert isinstance(task, TorchClassifierTask)
    data: SiteData = task.site_data(f"builtin:1/{sites}", partition="iid", seed=0, partitions=sites)
    parameters = task.initial_parameters(0)
    n, batch_size = len(data.train), task.defaults["batch_size"]
    steps = max(1, math.ceil(n / batch_size))  # DP-SGD runs as many steps as plain SGD's epoch
    settings = {
        variant: settings_for(task, dp and dataclasses.replace(dp, sample_rate=1 / steps, local_steps=steps))
        for variant, dp in VARIANTS.items()
    }
    mechanism = Mechanism(NOISE_MULTIPLIER, 1 / steps, steps)
    shapes = [p.numel() for p in task.build_model().parameters()]
    label = f"{name}/{task.model} x{sites}"
    console.print(
        f"[bold]{label}[/bold]: {n} examples, {sum(shapes):,} params, "
        f"{mechanism.steps} steps of batch {batch_size}, {repeats} repeats ..."
    )
    for s in settings.values():  # warm-up: imports, Opacus hooks, allocator
        task.fit(parameters, data, s)
    seconds: dict[str, list[float]] = {variant: [] for variant in settings}
    dp_steps: dict[str, float] = {}
    for i in range(repeats):
        for variant, s in settings.items():
            started = time.perf_counter()
            outcome = task.fit(parameters, data, s)
            seconds[variant].append(time.perf_counter() - started)
            if "dp_steps" in outcome.metrics:
                dp_steps[variant] = outcome.metrics["dp_steps"]
        if (i + 1) % max(1, repeats // 4) == 0 or i + 1 == repeats:
            medians = ", ".join(f"{v} {statistics.median(t) * 1e3:.1f} ms" for v, t in seconds.items())
            console.print(f"  {i + 1}/{repeats}: {medians}")
    for variant, steps in dp_steps.items():
        if steps != mechanism.steps:
            raise RuntimeError(f"{variant} ran {steps} steps, expected {mechanism.steps}")
    draws = csprng_seconds(sum(shapes), n, mechanism.steps)
    plain_median = statistics.median(seconds["plain"])
    variants: dict[str, Any] = {}
    for variant, times in seconds.items():
        median = statistics.median(times)
        entry: dict[str, Any] = {
            "seconds": times,
            "median_seconds": median,
            "p90_seconds": p90(times),
            "median_ms_per_step": median / mechanism.steps * 1e3,
            "ratio_to_plain": median / plain_median,
        }
        if variant != "plain":
            entry["noise_share"] = draws["noise_seconds"] / median
            entry["sampling_share"] = draws["sampling_seconds"] / median
        variants[variant] = entry
    return {
        "task": name,
        "model": task.model,
        "sites": sites,
        "examples": n,
        "params": sum(shapes),
        "param_tensors": len(shapes),
        "batch_size": batch_size,
        "lr": settings["plain"].lr,
        "weight_decay": settings["plain"].weight_decay,
        "local_epochs": 1,
        "steps": mechanism.steps,
        "sample_rate": mechanism.sample_rate,
        "csprng": draws,
        "variants": variants,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats; writes the .quick.json")
    parser.add_argument("--repeats", type=int, help="timed rounds per variant (default 20)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 20)
    torch.set_num_threads(1)  # as fedcore's simulation workers run
    console = Console(width=None if sys.stdout.isatty() else 120)
    load_before = os.getloadavg()
    rows = [measure(name, model, sites, repeats, console) for name, model, sites in WORKLOADS]
    render(rows, console)
    report = {
        "benchmark": "dp_cost",
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "repeats": repeats,
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "secure_rng": True,
        "torch_threads": torch.get_num_threads(),
        "target_ratio": TARGET_RATIO,
        **environment(load_before),
        "opacus": version("opacus"),
        "workloads": rows,
    }
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {out}")


def render(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title=f"Local training per round, 1 epoch (ms; target DP/plain <= {TARGET_RATIO}x)")
    for column in ("workload", "n", "steps", "variant", "median", "p90", "per step", "DP/plain", "noise"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        for i, (variant, v) in enumerate(row["variants"].items()):
            ratio = v["ratio_to_plain"]
            over = variant != "plain" and ratio > TARGET_RATIO
            table.add_row(
                f"{row['task']} {row['model']} x{row['sites']}" if i == 0 else "",
                str(row["examples"]) if i == 0 else "",
                str(row["steps"]) if i == 0 else "",
                variant.replace("_", "-"),
                f"{v['median_seconds'] * 1e3:.1f}",
                f"{v['p90_seconds'] * 1e3:.1f}",
                f"{v['median_ms_per_step']:.2f}",
                "-" if variant == "plain" else (f"[red]{ratio:.2f}x[/red]" if over else f"{ratio:.2f}x"),
                f"{v['noise_share']:.1%}" if "noise_share" in v else "-",
            )
        table.add_section()
    console.print(table)


if __name__ == "__main__":
    main()
