"""What hiding example counts costs in precision. Under secure aggregation a site's weight
travels inside its masked vector as w = min(n, max_examples) / max_examples (a public bound),
so w x keeps log2(max_examples / n) fewer significant bits than x at the round's fixed
quantization step. This measures the error of the securely computed weighted mean against
the exact one, for site counts, bounds and 32/64-bit arithmetic, with the real encoder
(stochastic rounding) and decoder.

    python simulations/benchmarks/secagg_weight_precision.py [--dimension N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedcore.privacy.randomness import SecureRandom
from fedcore.secagg.contribution import quantized_contribution, step_for_round, weight
from fedcore.secagg.quantize import dequantize

CLIP = 10.0  # [secure_aggregation] clip_range's default
UPDATE_STD = 0.01  # a typical per-round parameter change


def error(sites: int, max_examples: int, bits: int, dimension: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(50, 5000, size=sites)
    updates = [{"w": rng.normal(0, UPDATE_STD, dimension)} for _ in range(sites)]
    template = {"w": np.zeros(dimension)}
    step = step_for_round(sites, clip=CLIP, bits=bits)
    total = np.zeros(dimension + 1, np.uint32 if bits == 32 else np.uint64)
    for n, update in zip(counts, updates, strict=True):
        w = weight(int(n), max_examples)
        total += quantized_contribution(
            update, template, weight=w, clip=CLIP, step=step, bits=bits, rng=SecureRandom()
        )
    flat = dequantize(total, step=step)
    secure = flat[:-1] / flat[-1]
    capped = np.minimum(counts, max_examples)
    exact = sum(c * u["w"] for c, u in zip(capped, updates, strict=True)) / capped.sum()
    rms = float(np.sqrt(np.mean((secure - exact) ** 2)))
    return {
        "rms_error": rms,
        "relative": rms / float(np.sqrt(np.mean(exact**2))),
        "max_error": float(np.abs(secure - exact).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimension", type=int, default=100_000)
    parser.add_argument("--out", default="simulations/benchmarks/results/secagg_weight_precision.json")
    args = parser.parse_args()
    rows = []
    table = Table(
        title=f"secure weighted mean vs exact (site counts 50-5000, update std {UPDATE_STD}, clip {CLIP})"
    )
    for column in ("sites", "max_examples", "bits", "rms error", "relative rms", "max error"):
        table.add_column(column, justify="right")
    for sites in (10, 100):
        for max_examples in (10_000, 100_000, 1_000_000):
            for bits in (32, 64):
                e = error(sites, max_examples, bits, args.dimension, seed=sites)
                rows.append({"sites": sites, "max_examples": max_examples, "bits": bits, **e})
                table.add_row(
                    str(sites),
                    f"{max_examples:,}",
                    str(bits),
                    f"{e['rms_error']:.2e}",
                    f"{e['relative']:.2e}",
                    f"{e['max_error']:.2e}",
                )
                print(
                    f"  {sites} sites, max_examples {max_examples}, {bits} bits: relative {e['relative']:.1e}",
                    flush=True,
                )
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dimension": args.dimension, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
