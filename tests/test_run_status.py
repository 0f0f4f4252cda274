"""`fedcore status --state DIR [--json]` on a run store, through the real CLI in a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedcore import load_experiment, run_simulation


def test_status_reports_the_last_round_and_every_site_from_the_store(tmp_path: Path) -> None:
    e = load_experiment().override(
        federation__rounds=3,
        simulation__sites=4,
        simulation__workers=1,
        federation__sites_per_round=3,
        privacy__mode="sample",
        privacy__noise_multiplier=1.0,
        privacy__secure_rng=False,
    )
    result, summary = run_simulation(e, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "fedcore", "status", "--state", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    status = json.loads(out.stdout)  # only a JSON object on stdout
    assert status["last_round"] == 3 == status["rounds"] and status["finished"] is True
    assert status["accuracy"] == result.records[-1].accuracy
    assert status["epsilon"] == summary["privacy"]["epsilon"]
    taken = {s["site"]: s for s in status["sites"]}
    for site, row in taken.items():
        assert row["sampled"] == sum(site in r.sampled for r in result.records)
        assert row["last_round"] == max(r.round for r in result.records if site in r.sampled)
        assert row["epsilon"] == result.records[row["last_round"] - 1].site_epsilon[site]
    assert sum(s["sampled"] for s in status["sites"]) == 9
    table = subprocess.run(
        [sys.executable, "-m", "fedcore", "status", "--state", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "round 3 of 3" in table.stdout and "site-1" in table.stdout


def test_status_of_a_directory_without_a_run_says_so(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedcore", "status", "--state", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode != 0 and "no run store" in out.stderr
