"""What secure aggregation costs: fedcore plain round vs fedcore SecAgg+ round vs Flower's
SecAgg+ (SecAggPlusWorkflow), sites doing a fixed cheap update, plus each party's time per
stage and the speed of mask expansion.

- fedcore plain / secure: `fedcore simulate` rounds of `bench:PARAMS` (plain: one worker;
  secure: one worker per core): every site's protocol work runs on this machine's cores.
- per party: the SecAgg+ stages timed directly, client work per site (each site does its
  own in a deployment, in parallel) and the server's work per stage. A deployment's secure
  round adds about one site's client time plus the server's time to a plain round.
- Flower: its SecAgg+ workflow in its simulation runtime (`flower_secagg.py`).
- distributed DP's upload: what one site's masked input takes on the wire (the tensor codec's
  payload) at 64 bits (plain integers) and at 32, 20 and 16 bits (rotated, wrapping, packed),
  and what the smaller modulus costs in accuracy: the decoded mean's error at the same noise
  multiplier (so the same epsilon), over the 64-bit one's.

    python simulations/benchmarks/secagg_cost.py [--quick] [--skip-flower] [--uploads-only] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import fedcore
from fedcore.privacy import distributed
from fedcore.privacy.randomness import SecureRandom
from fedcore.secagg.common import RoundParams
from fedcore.secagg.contribution import quantized_contribution, step_for_round
from fedcore.secagg.graph import default_degree, neighbour_graph, safe_threshold
from fedcore.secagg.identity import LocalAuthority
from fedcore.secagg.packing import pack, packed
from fedcore.secagg.primitives import add_mask
from fedcore.secagg.stages.advertise import ClientAdvertise, ServerAdvertise
from fedcore.simulation.runners import cores
from fedcore.tensors import codec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment

WORKLOADS = [(20, 1_000_000), (50, 1_000_000), (100, 100_000)]
# breast_cancer's logistic regression, digits' linear model and CNN, then 1M parameters
UPLOAD_MODELS = [31, 650, 18_410, 1_000_000]
UPLOAD_BITS = [64, 32, 20, 16]
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "secagg_cost.json"
QUICK_OUT = DEFAULT_OUT.with_suffix(".quick.json")
UPLOADS_OUT = DEFAULT_OUT.with_suffix(".uploads.json")


def simulated_round(sites: int, params: int, rounds: int, *, secure: bool, workers: int) -> dict[str, Any]:
    experiment = fedcore.load_experiment().override(
        task__name=f"bench:{params}",
        simulation__sites=sites,
        federation__min_sites=sites,
        federation__rounds=rounds,
        simulation__workers=workers,
        secure_aggregation__enabled=secure,
        federation__max_examples_per_site=1,  # a bench site holds 1 example: weight 1, full precision
    )
    result, _ = fedcore.run_simulation(experiment, None)
    w = result.parameters["w"]
    if not np.allclose(w, 0.01 * rounds, atol=1e-4):
        raise RuntimeError(f"the model is wrong after {rounds} rounds: mean {float(w.mean())}")
    seconds = [r.seconds for r in result.records]
    out: dict[str, Any] = {
        "seconds_per_round": seconds,
        "median_seconds": statistics.median(seconds[1:] or seconds),
    }
    if secure:
        out["stages"] = [r.secure_aggregation["stages"] for r in result.records]
    return out


def per_party(sites: int, params: int, bits: int = 32) -> dict[str, Any]:
    """Client seconds per site and server seconds, per stage, for one round without transport
    (arithmetic modulo 2**bits: 32, fedcore's default for plain and sample-level DP rounds).
    A site's masked-input stage includes clipping and quantizing its float update."""
    names = [f"site-{i:04d}" for i in range(sites)]
    degree = default_degree(sites)
    graph = neighbour_graph(names, degree, session="bench/1/1")
    # What the server asks for and sites accept by default (5% colluding participants).
    threshold = safe_threshold(sites, min(len(p) for p in graph.values()), 0.05, attempts=10)
    assert threshold is not None
    p = RoundParams(1, tuple(names), degree, threshold, params + 1, bits, "bench/1/1")
    authority = LocalAuthority(0)  # every site signs, and checks its neighbours' signatures
    ids = {s: authority.identity(s) for s in names}
    dtype = np.uint64 if bits == 64 else np.uint32
    g = np.random.default_rng(0)
    updates = {s: {"w": g.normal(0, 0.01, params).astype(np.float32)} for s in names}
    template = {"w": np.zeros(params, np.float32)}
    step = step_for_round(sites, clip=1.0, bits=bits)
    client: dict[str, float] = {}
    server: dict[str, float] = {}

    def timed(bucket: dict[str, float], stage: str, fn: Any) -> Any:
        started = time.perf_counter()
        value = fn()
        bucket[stage] = time.perf_counter() - started
        return value

    s1 = timed(
        client, "advertise", lambda: {s: ClientAdvertise(p, s, ids[s]).start(os.urandom) for s in names}
    )
    reveal, server1b = timed(
        server, "advertise", lambda: ServerAdvertise(p).collect([m for m, _ in s1.values()])
    )
    s1b = timed(client, "reveal", lambda: {s: s1[s][1].receive(reveal[s]) for s in names})
    forwarded, server2 = timed(server, "reveal", lambda: server1b.collect([m for m, _ in s1b.values()]))
    s2 = timed(
        client, "share_keys", lambda: {s: s1b[s][1].receive(forwarded[s], os.urandom, ids[s]) for s in names}
    )
    routed, server3 = timed(server, "share_keys", lambda: server2.collect([m for m, _ in s2.values()]))
    inputs: dict[str, np.ndarray] = {}

    def masked_input(s: str) -> Any:  # what a site does in stage 3: quantize its update, mask it
        inputs[s] = quantized_contribution(
            updates[s], template, weight=1.0, clip=1.0, step=step, bits=bits, rng=SecureRandom()
        )
        return s2[s][1].receive(routed[s], inputs[s])

    s3 = timed(client, "masked_input", lambda: {s: masked_input(s) for s in names})
    agree, server4 = timed(server, "masked_input", lambda: server3.collect([m for m, _ in s3.values()]))
    s4 = timed(client, "consistency", lambda: {s: s3[s][1].receive(agree[s], ids[s]) for s in names})
    requests, server5 = timed(server, "consistency", lambda: server4.collect([m for m, _ in s4.values()]))
    answers = timed(client, "unmask", lambda: [s4[s][1].receive(requests[s], ids[s]) for s in names])
    total = timed(server, "unmask", lambda: server5.collect(answers))
    expected = np.zeros(params + 1, dtype)
    for v in inputs.values():
        expected += v
    if not np.array_equal(total, expected):
        raise RuntimeError("the secure sum is wrong")
    per_site = {stage: seconds / sites for stage, seconds in client.items()}
    return {
        "bits": bits,
        "degree": degree,
        "threshold": threshold,
        "client_seconds_per_site": per_site,
        "server_seconds": server,
        "client_total_per_site": sum(per_site.values()),
        "server_total": sum(server.values()),
    }


def distributed_upload(dimension: int, *, sites: int = 10, z: float = 1.0) -> dict[str, Any]:
    """One site's masked input on the wire at each modulus, and the decoded mean's error (RMS
    over the coordinates, at the same noise multiplier) relative to 64 bits. The masks are
    left out: they cancel exactly in the sum (tests/test_distributed_modular.py) and do not
    change a vector's size."""
    g = np.random.default_rng(dimension)
    updates = g.normal(0, 1, (sites, dimension))
    updates *= 0.5 / np.linalg.norm(updates, axis=1, keepdims=True)  # within the clip norm 1
    out: dict[str, Any] = {"params": dimension, "sites": sites, "noise_multiplier": z}
    for bits in UPLOAD_BITS:
        try:
            noise = distributed.DistributedNoise.for_model(
                dimension=dimension,
                clip_norm=1.0,
                noise_multiplier=z,
                sites=sites,
                bits=bits,
                rotation_seed=7,
            )
        except ValueError:
            out[str(bits)] = None  # too few bits for this model: the round refuses to start
            continue
        squares = []
        for _ in range(max(1, min(50, 20_000 // dimension))):  # small models: enough coordinates
            encoded = [distributed.encode(u, noise, SecureRandom()) for u in updates]
            total = np.sum(encoded, axis=0)  # what the unmasked sum is (modulo 2**bits, read signed)
            decoded, _ = distributed.decode(total.astype(np.uint64), noise, dimension)
            squares.append(np.mean(np.square(decoded / sites - updates.mean(axis=0))))
        vector = encoded[0].astype(np.uint32) if bits <= 32 else encoded[0].view(np.uint64)
        wire = pack(vector, bits) if packed(bits) else vector
        header, views = codec.encode({"masked": wire})
        out[str(bits)] = {
            "bytes": header.ByteSize() + sum(v.nbytes for v in views),
            "rms_error": float(np.sqrt(np.mean(squares))),
            "rounding_slack": float(np.sqrt(noise.length(dimension)) / noise.scale),
        }
    return out


def mask_throughput() -> float:
    seed, count = os.urandom(32), 10_000_000
    buffer = np.zeros(count, np.uint32)
    best = min(_timed(lambda: add_mask(buffer, seed)) for _ in range(3))
    return count * 4 / best / 1e6


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 20 sites x 100K params")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=8, help="fedcore rounds per setting (median of all but the first)"
    )
    parser.add_argument(
        "--uploads-only", action="store_true", help="only distributed DP's upload table (seconds)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    load_before = os.getloadavg()
    rows = []
    for sites, params in [] if args.uploads_only else [(20, 100_000)] if args.quick else WORKLOADS:
        console.print(f"[bold]{sites} sites x {params:,} params[/bold]: fedcore plain, secure, per party ...")
        row: dict[str, Any] = {"sites": sites, "params": params}
        # Each at its best setting on this machine: a plain round has nothing to parallelise
        # (one worker); a secure round's masking is real work, spread over every core, as
        # Flower's simulation spreads its clients.
        row["plain"] = simulated_round(sites, params, args.rounds, secure=False, workers=1)
        row["secure"] = simulated_round(sites, params, args.rounds, secure=True, workers=cores())
        row["per_party"] = per_party(sites, params)
        if not args.skip_flower:
            console.print("  Flower SecAgg+ ...")
            from flower_secagg import run_flower_secagg

            row["flower_secagg"] = run_flower_secagg(sites=sites, params=params, rounds=3)
        rows.append(row)
    throughput = mask_throughput()
    console.print("distributed DP uploads ...")
    uploads = [distributed_upload(d) for d in UPLOAD_MODELS]
    if rows:
        render(rows, throughput, console)
    render_uploads(uploads, console)
    report = {
        "benchmark": "secagg_cost",
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "mask_expansion_mb_per_s": throughput,
        **environment(load_before),
        "workloads": rows,
        "distributed_uploads": uploads,
    }
    out = args.out or (UPLOADS_OUT if args.uploads_only else QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {out}")


def render(rows: list[dict[str, Any]], throughput: float, console: Console) -> None:
    table = Table(title="Secure aggregation cost per round (median, seconds)")
    for column in (
        "workload",
        "plain",
        "secure (simulated)",
        "site (per party)",
        "server (per party)",
        "deployment est.",
        "Flower SecAgg+",
        "Flower / simulated",
        "Flower / deployment",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        plain, secure, party = (
            row["plain"]["median_seconds"],
            row["secure"]["median_seconds"],
            row["per_party"],
        )
        deployment = plain + party["client_total_per_site"] + party["server_total"]
        flower = row.get("flower_secagg")
        flower_s = (
            statistics.median(flower["seconds_per_round"][1:] or flower["seconds_per_round"])
            if flower
            else None
        )
        row["deployment_estimate_seconds"] = deployment
        if flower_s:
            row["flower_over_simulated"] = flower_s / secure
            row["flower_over_deployment"] = flower_s / deployment
        table.add_row(
            f"{row['sites']} x {row['params']:,}",
            f"{plain:.3f}",
            f"{secure:.3f}",
            f"{party['client_total_per_site']:.3f}",
            f"{party['server_total']:.3f}",
            f"{deployment:.3f}",
            f"{flower_s:.2f}" if flower_s else "-",
            f"{flower_s / secure:.1f}x" if flower_s else "-",
            f"{flower_s / deployment:.1f}x" if flower_s else "-",
        )
    console.print(table)
    stages = ("advertise", "reveal", "share_keys", "masked_input", "consistency", "unmask")
    per_stage = Table(
        title="Per party and stage, milliseconds (signing and checking: advertise, consistency, unmask)"
    )
    per_stage.add_column("workload")
    per_stage.add_column("party")
    for stage in stages:
        per_stage.add_column(stage, justify="right")
    for row in rows:
        party = row["per_party"]
        for who, times in (
            ("one site", party["client_seconds_per_site"]),
            ("server", party["server_seconds"]),
        ):
            cells = [f"{1000 * times[s]:.1f}" if s in times else "-" for s in stages]
            per_stage.add_row(f"{row['sites']} x {row['params']:,}", who, *cells)
    console.print(per_stage)
    console.print(
        f"mask expansion and addition in place (AES-256-CTR, uint32): {throughput:,.0f} MB/s on one core"
    )


def render_uploads(uploads: list[dict[str, Any]], console: Console) -> None:
    table = Table(
        title="Distributed DP: one site's masked input per round (bytes on the wire), and the noise "
        "on the decoded mean at the same epsilon over 64 bits' (10 sites, noise multiplier 1)"
    )
    table.add_column("params", justify="right")
    for bits in UPLOAD_BITS:
        table.add_column(f"{bits} bits", justify="right")
    for bits in UPLOAD_BITS[2:]:
        table.add_column(f"{bits} / 64 bytes", justify="right")
    for bits in UPLOAD_BITS[2:]:
        table.add_column(f"{bits}-bit noise / 64 (exact; measured RMS)", justify="right")
    for row in uploads:
        base = row["64"]
        cells = [f"{row[str(b)]['bytes']:,}" if row[str(b)] else "refused" for b in UPLOAD_BITS]
        cells += [
            f"{row[str(b)]['bytes'] / base['bytes']:.3f}" if row[str(b)] else "-" for b in UPLOAD_BITS[2:]
        ]
        for b in UPLOAD_BITS[2:]:
            got = row[str(b)]
            # The noise is z x Delta_2 = z x (clip x scale + sqrt(d)): over the update's units,
            # z x clip x (1 + rounding slack), so the ratio is the slacks' (clip 1).
            exact = (1 + got["rounding_slack"]) / (1 + base["rounding_slack"]) if got else None
            cells.append(f"{exact:.4f}; {got['rms_error'] / base['rms_error']:.3f}" if got else "-")
        table.add_row(f"{row['params']:,}", *cells)
    console.print(table)


if __name__ == "__main__":
    main()
