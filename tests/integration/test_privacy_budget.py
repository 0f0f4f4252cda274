"""The issue's budget promise, with real processes: a site whose site.toml says
`max_epsilon = 1` takes part until the next round would cross 1, then refuses; after its
process is killed and restarted it still refuses (its ledger is on its own disk); the
server's run goes on with the other sites."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedcore import load_experiment
from fedcore import pki as fedcore_pki
from fedcore.privacy.accountant import Mechanism, epsilon
from fedcore.tasks import build_task, default_partition
from tests.integration.test_cli_federation import fedcore, free_port, wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("site-1", "site-2", "site-3")
LIMITED = "site-3"  # the site with a budget
# Rounds take ~0.1 s, a site's start several seconds: enough rounds that the run is still
# going when the killed site is back (and it goes on, with two sites, while it is not).
ROUNDS = 100_000  # more than the test needs: it stops the server (SIGTERM) once it has seen enough
MAX_EPSILON = 1.0
NOISE, SAMPLE_RATE, LOCAL_STEPS, DELTA = 4.0, 0.1, 30, 1e-5
BUDGET = "refused: privacy budget"

EXPERIMENT = f"""
[federation]
rounds = {ROUNDS}
min_sites = 2
start_sites = 3
round_timeout = 60

[task]
name = "breast_cancer"

[privacy]
mode = "sample"
noise_multiplier = {NOISE}
delta = {DELTA}
max_grad_norm = 1.0
sample_rate = {SAMPLE_RATE}
local_steps = {LOCAL_STEPS}
secure_rng = true
"""


def affordable_rounds(experiment_file: Path) -> tuple[int, Mechanism, float]:
    """How many rounds the limited site can afford, what one costs it, and what k cost."""
    experiment = load_experiment(experiment_file)
    task = build_task("breast_cancer")
    data = task.site_data(
        "builtin:3/3",
        partition=experiment.data.partition or default_partition(task),
        seed=experiment.seed,
        partitions=3,
    )
    del data  # the mechanism is public: the site's count does not enter it
    mechanism = Mechanism(NOISE, SAMPLE_RATE, LOCAL_STEPS)
    k = 0
    while k < ROUNDS and epsilon([mechanism] * (k + 1), DELTA) <= MAX_EPSILON:
        k += 1
    return k, mechanism, epsilon([mechanism] * k, DELTA)


def metrics(state: Path) -> list[dict[str, Any]]:
    path = state / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]  # complete lines only


def refused_for_budget(row: dict[str, Any], site: str = LIMITED) -> bool:
    return row["dropped"].get(site, {}).get("refusal") == "privacy budget"


def poll(done: Callable[[], bool], what: str, logs: list[Path], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)


def test_a_site_refuses_rounds_over_its_budget_even_after_a_restart(tmp_path: Path) -> None:
    experiment_file = tmp_path / "experiment.toml"
    experiment_file.write_text(EXPERIMENT)
    pki, state = tmp_path / "pki", tmp_path / "state"
    fedcore_pki.init(pki, ["localhost"])  # (the CLI's pki commands are tested elsewhere)
    for site in SITES:
        fedcore_pki.add_site(pki, site)
    port = free_port()
    ledger = tmp_path / "site-3" / "privacy-ledger.json"
    site_file = tmp_path / "site-3" / "site.toml"  # the limited site's own policy, paths relative to it
    site_file.parent.mkdir()
    site_file.write_text(
        f'[server]\naddress = "localhost:{port}"\n\n'
        f'[identity]\nkit = "{pki / "sites" / LIMITED}"\n\n'
        '[data]\ntask = "breast_cancer"\nuri = "builtin:3/3"\n\n'
        f'[privacy]\nledger = "{ledger.name}"\nmax_epsilon = {MAX_EPSILON:g}\n'
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("server", *SITES, "site-3-restarted")}
    processes = {
        "server": fedcore(
            "server", "--listen", f"127.0.0.1:{port}", "--pki", pki, "--state", state,
            "--config", experiment_file, log=logs["server"],
        ),
        **{
            site: fedcore(
                "client", "--server", f"localhost:{port}", "--pki", pki / "sites" / site,
                "--task", "breast_cancer", "--data", f"builtin:{n}/3", log=logs[site],
            )
            for n, site in enumerate(SITES[:2], start=1)
        },
        LIMITED: fedcore("client", "--config", site_file, log=logs[LIMITED]),
    }  # fmt: skip
    try:
        # While the processes start: what the budget affords, from site-3's own data.
        k, mechanism, spent = affordable_rounds(experiment_file)
        assert 1 <= k <= 3, f"the design wants a budget of 1..3 rounds, got {k} ({mechanism})"
        poll(
            lambda: any(refused_for_budget(r) for r in metrics(state)),
            "site-3's first refusal",
            [logs["server"], logs[LIMITED]],
        )
        killed_after = len(metrics(state))  # rounds completed before the site dies
        processes[LIMITED].kill()  # SIGKILL: no goodbye, no chance to write anything
        processes[LIMITED].wait()
        restarted = processes["site-3-restarted"] = fedcore(
            "client", "--config", site_file, "--give-up-after", 60, log=logs["site-3-restarted"]
        )
        poll(
            lambda: (
                BUDGET in logs["site-3-restarted"].read_text()
                or restarted.poll() is not None
                or processes["server"].poll() is not None
            ),
            "the restarted site-3 to refuse a round",
            [logs["server"], logs["site-3-restarted"]],
        )
        assert BUDGET in logs["site-3-restarted"].read_text(), logs["site-3-restarted"].read_text()[-2000:]
        # Once the server has recorded a round after the refusal, stop the run as an operator would.
        refused_at = len(metrics(state))
        poll(lambda: len(metrics(state)) > refused_at + 1, "a round after the refusal", [logs["server"]])
        processes["server"].send_signal(signal.SIGTERM)
        codes = {name: wait(p, logs[name]) for name, p in processes.items() if name != LIMITED}
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    assert codes == dict.fromkeys(codes, 0), {n: logs[n].read_text()[-2000:] for n in codes}
    rows = metrics(state)
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1)), "every round until the stop"

    # The other sites have no budget: they take part in every round.
    for row in rows:
        for site in SITES[:2]:
            assert site in row["sampled"] and site not in row["dropped"], row

    # site-3 takes part in rounds 1..k and in no other.
    took_part = [r["round"] for r in rows if LIMITED in r["sampled"] and LIMITED not in r["dropped"]]
    assert took_part == list(range(1, k + 1)), (k, took_part)
    assert all(r["sites"] == 3 for r in rows[:k]) and all(r["sites"] == 2 for r in rows[k:])

    # The restarted process reloaded the ledger, reconnected and refused for the budget.
    restarted_log = logs["site-3-restarted"].read_text()
    assert f"epsilon spent {spent:.3f} (budget {MAX_EPSILON})" in restarted_log
    assert f"connected to localhost:{port} as {LIMITED}" in restarted_log
    refused_after_restart = [
        int(line.split(" round ")[1].split()[0])
        for line in restarted_log.splitlines()
        if "fit done" in line and BUDGET.removeprefix("refused: ") in line
    ]
    assert refused_after_restart and min(refused_after_restart) > killed_after, restarted_log[-2000:]
    by_round = {r["round"]: r for r in rows}
    recorded = [n for n in refused_after_restart if n in by_round]  # the last may be cut by the stop
    assert recorded and all(refused_for_budget(by_round[n]) for n in recorded)

    # Every later round that sampled site-3 dropped it for its budget, except the round the
    # kill interrupted (the site was gone before it answered).
    for row in rows[k:]:
        if LIMITED not in row["sampled"]:
            continue
        if not refused_for_budget(row):
            assert row["dropped"][LIMITED]["reason"] == "unavailable", row
            assert killed_after < row["round"] < min(refused_after_restart), (row, killed_after)
    assert sum(refused_for_budget(r) for r in rows[:killed_after]) >= 1

    # What the site spent: exactly k rounds, within its budget, on its own disk.
    document = json.loads(ledger.read_text())
    assert document["epsilon_total"] <= MAX_EPSILON
    assert document["epsilon_total"] == pytest.approx(spent, rel=1e-6)
    runs = list(document["runs"].values())
    assert len(runs) == 1 and [Mechanism(**m) for m in runs[0]] == [mechanism] * k
