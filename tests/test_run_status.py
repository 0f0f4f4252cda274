"""`fedcore status --state DIR [--json]` on a run store, through the real CLI in a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_a_sites_words_in_the_table_are_never_markup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal like "budget [/link] spent" crashed the table (rich markup) and `[link=...]`
    could plant a terminal hyperlink."""
    import argparse

    from fedcore import run_status

    status = run_status.RunStatus("r", True, 1, 1, 0.5, 0.1, None, None, 1.0)
    status.sites = [
        run_status.SiteStatus("site-1", 1, 0, 1, 1, "refused: budget [/link] spent [link=http://x]y")
    ]
    monkeypatch.setattr(run_status, "run_status", lambda _: status)
    monkeypatch.setenv("COLUMNS", "300")  # the whole cell on one line
    assert run_status._status(argparse.Namespace(state=str(tmp_path), json=False)) == 0
    out = capsys.readouterr().out
    assert "[/link]" in out and "[link=http://x]" in out
