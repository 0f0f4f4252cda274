"""A real `fedcore server` killed with SIGKILL mid-round and restarted with `--resume` on the
same port: the `fedcore client` processes keep running, reconnect by themselves, and the
run ends with the uninterrupted run's model; no site's ledger is charged twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedcore import load_experiment, run_simulation
from tests.integration.test_cli_federation import fedcore, free_port, start_sites, wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("site-1", "site-2", "site-3")


def server(
    port: int, state: Path, log: Path, *flags: str | Path | int, crash_at: str | None = None
) -> subprocess.Popen[bytes]:
    os.environ.pop("FEDCORE_CRASH_AT", None)
    if crash_at:
        os.environ["FEDCORE_CRASH_AT"] = crash_at  # the child's copy of the environment
    try:
        return fedcore("server", "--listen", f"127.0.0.1:{port}", "--state", state, *flags, log=log)
    finally:
        os.environ.pop("FEDCORE_CRASH_AT", None)


def rounds(state: Path) -> list[int]:
    path = state / "metrics.jsonl"  # absent: no round stored yet
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_server_killed_in_round_6_resumes_over_mutual_tls_to_the_uninterrupted_model(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    for command in (
        ["pki", "init", pki, "--host", "localhost"],
        *(["pki", "add-site", pki, s] for s in SITES),
    ):
        subprocess.run([sys.executable, "-m", "fedcore", *map(str, command)], check=True, capture_output=True)
    port, state = free_port(), tmp_path / "state"
    flags = ("--pki", pki, "--task", "breast_cancer", "--rounds", 10, "--min-sites", 3)
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "resumed", *SITES)}
    first = server(port, state, logs["server"], *flags, crash_at="6:fit")
    clients = start_sites(port, pki, SITES, logs)
    assert wait(first, logs["server"]) == -signal.SIGKILL, logs["server"].read_text()[-3000:]
    # Without DP round 5 is written while round 6 runs: it may not have been durable yet.
    assert rounds(state) in ([1, 2, 3, 4, 5], [1, 2, 3, 4])
    second = server(port, state, logs["resumed"], *flags, "--resume")
    assert wait(second, logs["resumed"]) == 0, logs["resumed"].read_text()[-3000:]
    assert all(wait(clients[s], logs[s]) == 0 for s in SITES)
    assert "resuming run" in logs["resumed"].read_text()
    assert rounds(state) == list(range(1, 11))
    experiment = load_experiment().override(simulation__sites=3, federation__rounds=10)
    result, _ = run_simulation(experiment, None)
    deployed = load_file(str(state / "model.safetensors"))
    for name, value in result.parameters.items():
        np.testing.assert_allclose(deployed[name], value, rtol=1e-5, atol=1e-6)
    # Resuming a complete run does nothing and says so; another experiment is refused.
    again = server(port, state, tmp_path / "again.log", *flags, "--resume")
    assert wait(again, tmp_path / "again.log") == 0
    other = server(port, state, tmp_path / "other.log", *flags[:-2], "--min-sites", 2, "--resume")
    assert wait(other, tmp_path / "other.log") == 2
    assert "[federation] min_sites is 2, the run has 3" in (tmp_path / "other.log").read_text()


def test_a_redone_dp_round_is_not_charged_twice_in_the_sites_ledgers(tmp_path: Path) -> None:
    port, state, rounds_ = free_port(), tmp_path / "state", 4
    flags = ("--insecure", "--task", "breast_cancer", "--rounds", rounds_, "--min-sites", 3)
    flags += ("--privacy", "sample", "--noise-multiplier", "1.0")
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "resumed", *SITES)}
    first = server(port, state, logs["server"], *flags, crash_at="3:fit")
    ledgers = {s: tmp_path / f"{s}-ledger.json" for s in SITES}
    clients = {
        s: fedcore(
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--insecure",
            "--name",
            s,
            "--task",
            "breast_cancer",
            "--data",
            f"builtin:{k}/3",
            "--privacy-ledger",
            ledgers[s],
            log=logs[s],
        )
        for k, s in enumerate(SITES, start=1)
    }
    assert wait(first, logs["server"]) == -signal.SIGKILL, logs["server"].read_text()[-3000:]
    second = server(port, state, logs["resumed"], *flags, "--resume")
    assert wait(second, logs["resumed"]) == 0, logs["resumed"].read_text()[-3000:]
    assert all(wait(clients[s], logs[s]) == 0 for s in SITES)
    assert rounds(state) == list(range(1, rounds_ + 1))
    for s in SITES:
        runs = json.loads(ledgers[s].read_text())["runs"]
        assert [len(spent) for spent in runs.values()] == [rounds_], (s, runs)
    resent = sum("already trained for this model; resending it" in logs[s].read_text() for s in SITES)
    assert resent >= 1  # the site whose reply reached the killed server trained round 3 before
