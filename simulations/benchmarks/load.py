"""Load: many concurrent sites against one real `fedcore server` on loopback with mutual TLS.

The server is its own process (`python -m fedcore server --pki ...`), so its memory is its
own: the peak is the kernel's high-water mark (VmHWM in /proc/PID/status), and the baseline
is its resident memory once it listens, before any site connects (the interpreter, imports
and the model; the sites' processes start then), so the rest includes
every session's buffers as well as the rounds; "connected" is the memory once every site
holds its session, before round 1, so that the rounds' own share shows apart. What a round adds on top of it is
reported in model copies (float32 bytes of the model). Sites are real `SiteAgent`s on the
`bench:PARAMS` task (a fixed +0.01 update), many to a process: `round_overhead.py`'s site
host. Progress and the baseline come from the server's own Prometheus endpoint.

    python simulations/benchmarks/load.py [--quick] [--workload 1000x100000 ... [--secure]] [--rounds R]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fedcore import pki

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from environment import environment, rounds_progress  # noqa: E402

# (sites, params, SecAgg+); 128 << 20 params: 512 MiB
WORKLOADS = [
    (1000, 100_000, False),
    (1000, 1_000_000, False),
    (200, 1_000_000, False),
    (3, 128 << 20, False),
    (100, 1_000_000, True),
]
QUICK = [(50, 100_000, False)]
DEFAULT_OUT = HERE / "results" / "load.json"
STEP = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def scrape(port: int, ca: Path) -> dict[str, float]:
    """The server's own metrics (served over TLS with its certificate under --pki)."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(f"https://localhost:{port}/metrics", timeout=2, context=context) as reply:
            text = reply.read().decode()
    except OSError:  # not listening yet
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith(("fedcore_round ", "fedcore_sites_connected ")):
            name, value = line.split()
            values[name] = float(value)
    return values


def start_server(tmp: Path, pki_dir: Path, port: int, params: int, federation: str, *flags: str) -> Any:
    """`fedcore server` in its own process on `bench:PARAMS` with mutual TLS; `federation`:
    the job's [federation] lines. Its log goes to TMP/server.log, its state to TMP/state."""
    config = tmp / "job.toml"
    config.write_text(f'[task]\nname = "bench:{params}"\n\n[federation]\n{federation}')
    argv = ["--config", str(config), "--state", str(tmp / "state"), "--pki", str(pki_dir)]
    return subprocess.Popen(
        [sys.executable, "-m", "fedcore", "server", *argv, "--listen", f"127.0.0.1:{port}", *flags],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "server.log").open("w"),
    )


def site_host(port: int, params: int) -> list[str]:
    """The command that hosts real SiteAgents (their kits follow): `round_overhead.py`'s."""
    return [
        sys.executable,
        str(HERE / "round_overhead.py"),
        "--host-sites",
        str(port),
        "--params",
        str(params),
    ]


def run_workload(
    sites: int,
    params: int,
    rounds: int,
    processes: int,
    budget: int | None,
    secure: bool,
    tmp: Path,
    progress: Any,
) -> dict[str, Any]:
    label = f"{sites} x {params:,}" + (" SecAgg+" if secure else "")
    setup = progress.add_task(f"{label}: certificates", total=sites)
    pki_dir = tmp / "pki"
    pki.init(pki_dir, ["localhost"])
    kits = []
    for k in range(sites):
        kits.append(pki.add_site(pki_dir, f"site-{k}"))
        progress.advance(setup)
    port, metrics_port = free_port(), free_port()
    budget_flag = ["--upload-budget", str(budget)] if budget else []
    job = f"rounds = {rounds}\nmin_sites = {sites}\nstart_sites = {sites}\nkeep_models = 1\n"
    job += "\n[secure_aggregation]\nenabled = true\n" if secure else ""
    server = start_server(tmp, pki_dir, port, params, job, "--metrics", str(metrics_port), *budget_flag)
    host = site_host(port, params)
    hosts: list[subprocess.Popen[bytes]] = []  # started once the server's baseline is read
    connecting = progress.add_task(f"{label}: sites connecting", total=sites)
    running = progress.add_task(f"{label}: rounds", total=rounds)
    samples: dict[str, Any] = {"baseline": None, "connected": None, "hwm": 0}
    started = time.perf_counter()
    try:
        while server.poll() is None:
            if time.perf_counter() - started > 3600:
                raise TimeoutError(f"{label}: no end after an hour")
            seen = scrape(metrics_port, pki_dir / "ca.crt")
            try:
                mem = memory(server.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            if "VmHWM" not in mem:  # exiting
                break
            samples["hwm"] = max(samples["hwm"], mem["VmHWM"])
            connected, done = int(seen.get("fedcore_sites_connected", 0)), int(seen.get("fedcore_round", 0))
            progress.update(connecting, completed=connected)
            if samples["connected"] is None and connected == sites and done == 0:  # sessions, no round yet
                samples["connected"] = mem["VmRSS"]
            progress.update(running, completed=done)
            if samples["baseline"] is None and seen:  # listening; no site yet (they start after)
                samples["baseline"] = mem["VmRSS"]
                hosts += [
                    subprocess.Popen(
                        [*host, *(str(kits[i]) for i in part)], stderr=(tmp / f"sites-{n}.log").open("w")
                    )
                    for n, part in enumerate(np.array_split(np.arange(sites), processes))
                ]
            time.sleep(0.2)
        codes = [h.wait(timeout=120) for h in hosts]
    finally:
        for p in (server, *hosts):
            if p.poll() is None:
                p.kill()
                p.wait()
    if server.returncode != 0 or any(codes):
        raise RuntimeError(f"{label}: server exit {server.returncode}, site hosts {codes}; see {tmp}")
    records = [json.loads(line) for line in (tmp / "state" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records]
    if len(records) != rounds or any(r["sites"] != sites for r in records):
        raise RuntimeError(f"{label}: rounds {[(r['round'], r['sites']) for r in records]}")
    model_bytes = 4 * params
    baseline = samples["baseline"] or 0
    return {
        "sites": sites,
        "params": params,
        "secure_aggregation": secure,
        "model_mib": model_bytes / 2**20,
        "seconds_per_round": seconds,
        "median_seconds": statistics.median(seconds[1:] or seconds),
        "server_baseline_rss_mib": baseline / 2**20,
        "server_connected_rss_mib": (samples["connected"] or 0) / 2**20,
        "server_peak_rss_mib": samples["hwm"] / 2**20,
        "round_memory_model_copies": (samples["hwm"] - baseline) / model_bytes,
        "rounds_over_sessions_model_copies": (samples["hwm"] - (samples["connected"] or baseline))
        / model_bytes,
        "total_seconds": time.perf_counter() - started,
    }


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Load: one server, mutual TLS on loopback ({report['machine']['nproc']} CPUs)")
    for name in (
        "sites x params",
        "model",
        "s / round",
        "server RSS listening",
        "all sites connected",
        "server peak RSS",
        "peak - listening",
        "peak - connected",
    ):
        table.add_column(name, justify="right")
    for row in report["workloads"]:
        table.add_row(
            f"{row['sites']} x {row['params']:,}" + (" SecAgg+" if row.get("secure_aggregation") else ""),
            f"{row['model_mib']:.0f} MiB",
            f"{row['median_seconds']:.2f}",
            f"{row['server_baseline_rss_mib']:.0f} MiB",
            f"{row['server_connected_rss_mib']:.0f} MiB",
            f"{row['server_peak_rss_mib']:.0f} MiB",
            f"{row['server_peak_rss_mib'] - row['server_baseline_rss_mib']:.0f} MiB = "
            f"{row['round_memory_model_copies']:.1f} models",
            f"{row['server_peak_rss_mib'] - row['server_connected_rss_mib']:.0f} MiB = "
            f"{row['rounds_over_sessions_model_copies']:.1f} models",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument(
        "--workload", action="append", metavar="SITESxPARAMS", help="e.g. 1000x100000 (repeatable)"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds per workload (default 3; round 1 is warm-up)"
    )
    ap.add_argument("--processes", type=int, default=4, help="site-hosting processes (default 4)")
    ap.add_argument(
        "--upload-budget", type=int, metavar="MIB", help="the server's (default: its own default)"
    )
    ap.add_argument(
        "--secure",
        action="store_true",
        help="--workload runs SecAgg+ rounds (the server holds the masked sum)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    chosen = [(*map(int, w.split("x")), args.secure) for w in args.workload or []]
    workloads = chosen or (QUICK if args.quick else WORKLOADS)
    console = Console()
    load_before = os.getloadavg()
    rows = []
    with rounds_progress(console) as progress:
        for sites, params, secure in workloads:
            with tempfile.TemporaryDirectory(prefix="fedcore-load-") as tmp:
                rows.append(
                    run_workload(
                        sites,
                        params,
                        args.rounds,
                        min(args.processes, sites),
                        args.upload_budget,
                        secure,
                        Path(tmp),
                        progress,
                    )
                )
    report = {
        "benchmark": "load",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "statistic": "median seconds per round over rounds 2..R; server peak RSS = VmHWM",
        **environment(load_before),
        "workloads": rows,
    }
    render(report, console)
    if args.out != DEFAULT_OUT or not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
