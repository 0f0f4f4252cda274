"""The README's federation, for real: `fedcore server` and `fedcore client` processes on
127.0.0.1 with mutual TLS. Checks the issue's promises: accuracy, clean exits, refusal of
foreign and missing certificates, and the same model as `fedcore simulate`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedcore import load_experiment, run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 10
SLOW_EPOCHS = 100  # the secure run's sites train long enough (~0.2 s) to be killed mid-fit
SITES = ("site-1", "site-2", "site-3")


def fedcore(*args: str | Path | int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "fedcore", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,  # what a process writes by default (an insecure site's audit log) stays there
        )


def start_sites(
    port: int,
    pki: Path,
    sites: Sequence[str],
    logs: dict[str, Path],
    *,
    task: str = "breast_cancer",
    data: Sequence[Path] | None = None,
) -> dict[str, subprocess.Popen[bytes]]:
    """A `fedcore client` per site with its kit from `pki`; site K of N holds `data[K - 1]`,
    or by default builtin:K/N."""
    return {
        site: fedcore(
            "client",
            "--server",
            f"localhost:{port}",
            "--pki",
            pki / "sites" / site,
            "--task",
            task,
            "--data",
            data[k - 1] if data is not None else f"builtin:{k}/{len(sites)}",
            log=logs[site],
        )
        for k, site in enumerate(sites, start=1)
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(process: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{process.args} hung; log:\n{log.read_text()[-3000:]}") from None


@dataclass
class Run:
    dir: Path
    codes: dict[str, int]
    logs: dict[str, Path]

    def metrics(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in (self.dir / "state" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    d = tmp_path_factory.mktemp("federation")
    pki, other = d / "pki", d / "other-ca"
    for command in (
        ["pki", "init", pki, "--host", "localhost"],
        *(["pki", "add-site", pki, s] for s in SITES),
        ["pki", "init", other, "--host", "localhost"],
        ["pki", "add-site", other, "site-9"],
    ):
        subprocess.run([sys.executable, "-m", "fedcore", *map(str, command)], check=True, capture_output=True)
    port = free_port()
    logs = {name: d / f"{name}.log" for name in ("server", *SITES, "foreign-ca", "no-certificate")}
    processes = {
        "server": fedcore(
            "server",
            "--listen",
            f"127.0.0.1:{port}",
            "--pki",
            pki,
            "--task",
            "breast_cancer",
            "--rounds",
            ROUNDS,
            "--min-sites",
            3,
            "--state",
            d / "state",
            log=logs["server"],
        ),
        # An intruder with a certificate from another CA, and one with none that claims to be site-1.
        "foreign-ca": fedcore(
            "client",
            "--server",
            f"localhost:{port}",
            "--pki",
            other / "sites" / "site-9",
            "--task",
            "breast_cancer",
            "--data",
            "builtin:1/3",
            "--give-up-after",
            6,
            log=logs["foreign-ca"],
        ),
        "no-certificate": fedcore(
            "client",
            "--server",
            f"localhost:{port}",
            "--insecure",
            "--name",
            "site-1",
            "--task",
            "breast_cancer",
            "--data",
            "builtin:1/3",
            "--give-up-after",
            6,
            log=logs["no-certificate"],
        ),
    }
    processes.update(start_sites(port, pki, SITES, logs))
    codes = {name: wait(p, logs[name]) for name, p in processes.items()}
    return Run(d, codes, logs)


def test_three_sites_reach_95_percent_and_every_process_exits_0(run: Run) -> None:
    assert {n: run.codes[n] for n in ("server", *SITES)} == dict.fromkeys(("server", *SITES), 0), run.logs
    metrics = run.metrics()
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    assert all(m["sites"] == 3 for m in metrics)
    assert metrics[-1]["accuracy"] >= 0.95, metrics[-1]
    assert {"round", "sites", "accuracy", "loss", "seconds"} <= metrics[-1].keys()


def test_foreign_and_missing_certificates_are_refused_and_the_run_is_unharmed(run: Run) -> None:
    assert run.codes["foreign-ca"] == 1, run.logs["foreign-ca"].read_text()[-2000:]
    assert run.codes["no-certificate"] == 1, run.logs["no-certificate"].read_text()[-2000:]
    assert "giving up" in run.logs["foreign-ca"].read_text()
    assert all(m["sampled"] == list(SITES) and m["dropped"] == {} for m in run.metrics())
    assert "site-9" not in run.logs["server"].read_text()


def test_simulation_and_grpc_deployment_produce_the_same_model(run: Run, tmp_path: Path) -> None:
    experiment = load_experiment().override(simulation__sites=3, federation__rounds=ROUNDS)
    result, _ = run_simulation(experiment, tmp_path)
    deployed = load_file(str(run.dir / "state" / "model.safetensors"))
    assert deployed.keys() == result.parameters.keys()
    for name, value in result.parameters.items():
        np.testing.assert_allclose(deployed[name], value, rtol=1e-5, atol=1e-6)


def test_sigterm_stops_the_server_cleanly_and_sites_exit_0(tmp_path: Path) -> None:
    port = free_port()
    server = fedcore(
        "server", "--listen", f"127.0.0.1:{port}", "--insecure", "--task", "breast_cancer", "--rounds", 5,
        "--min-sites", 2, "--state", tmp_path / "state", log=tmp_path / "server.log",
    )  # fmt: skip
    site = fedcore(
        "client", "--server", f"127.0.0.1:{port}", "--insecure", "--name", "lonely", "--task", "breast_cancer",
        "--data", "builtin:1/2", log=tmp_path / "site.log",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "lonely connected" not in (tmp_path / "server.log").read_text():  # the run waits for a 2nd site
        assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
        time.sleep(0.2)
    server.send_signal(signal.SIGTERM)
    assert wait(server, tmp_path / "server.log", 30) == 0
    assert wait(site, tmp_path / "site.log", 30) == 0
    assert "run stopped" in (tmp_path / "site.log").read_text()


def test_secure_aggregation_over_mutual_tls_survives_a_site_killed_during_masked_input(
    tmp_path: Path,
) -> None:
    sites = [f"site-{k}" for k in range(1, 6)]
    pki = tmp_path / "pki"
    subprocess.run(
        [sys.executable, "-m", "fedcore", "pki", "init", str(pki), "--host", "localhost"],
        check=True,
        capture_output=True,
    )
    for s in sites:
        subprocess.run(
            [sys.executable, "-m", "fedcore", "pki", "add-site", str(pki), s], check=True, capture_output=True
        )
    port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("server", *sites)}
    server = fedcore(
        "server", "--listen", f"127.0.0.1:{port}", "--pki", pki, "--task", "breast_cancer", "--rounds", ROUNDS,
        "--min-sites", 3, "--state", tmp_path / "state", "--secure-aggregation", "--config", _start_with(tmp_path, 5, SLOW_EPOCHS),
        log=logs["server"],
    )  # fmt: skip
    clients = start_sites(port, pki, sites, logs)
    deadline = time.monotonic() + 120
    while "round 3 fit started" not in logs["site-5"].read_text():  # training = the masked-input stage
        assert time.monotonic() < deadline and clients["site-5"].poll() is None, logs["site-5"].read_text()[
            -2000:
        ]
        time.sleep(0.02)
    clients["site-5"].kill()
    clients["site-5"].wait()
    assert wait(server, logs["server"]) == 0
    assert all(wait(clients[s], logs[s]) == 0 for s in sites[:4])
    rows = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    third = rows[2]
    assert third["sites"] == 4 and third["dropped"]["site-5"]["exchange"] == "masked_input"
    assert third["secure_aggregation"]["recovered"] == 1
    assert all(r["sites"] == 4 for r in rows[3:])
    # The same federation without secure aggregation and without the kill reaches the same accuracy.
    experiment = load_experiment().override(
        simulation__sites=5, federation__rounds=ROUNDS, task__local_epochs=SLOW_EPOCHS
    )
    plain, _ = run_simulation(experiment, None)
    assert abs(rows[-1]["accuracy"] - plain.records[-1].accuracy) <= 0.01


def _start_with(directory: Path, sites: int, local_epochs: int | None = None) -> Path:
    path = directory / "experiment.toml"
    task = f"\n[task]\nlocal_epochs = {local_epochs}\n" if local_epochs else ""
    path.write_text(f"[federation]\nstart_sites = {sites}\n\n[simulation]\nsites = {sites}\n{task}")
    return path
