"""`fedcore status --state DIR [--json]`: a run's state from its run store, read-only (a
running server keeps writing; the store's readers never block it): the last completed round,
the run's epsilon, and every site with the rounds it took part in, when it was last in one,
its drops and their last reason, and the privacy it reported spending."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError
from fedcore.site_status import SiteStatus, tally


@dataclass
class RunStatus:
    run_id: str
    finished: bool
    rounds: int  # the planned rounds
    last_round: int  # the last completed round (0: none yet)
    accuracy: float | None
    loss: float | None
    epsilon: float | None
    delta: float | None
    last_round_seconds: float | None
    sites: list[SiteStatus] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def run_status(directory: Path) -> RunStatus:
    from fedcore.engine.run_store import SqliteRunStore

    if not (directory / "run.db").exists():
        raise ConfigError(f"{directory} holds no run store (run.db): give a server --state or simulate --out")
    with SqliteRunStore(directory, read_only=True) as store:
        info = store.run()
        if info is None:
            raise ConfigError(f"{directory} holds no run yet")
        stored = store.rounds()
    last = stored[-1].record if stored else {}
    planned = info.experiment.get("experiment", {}).get("federation", {}).get("rounds", 0)
    sites: dict[str, SiteStatus] = {}
    for r in stored:
        tally(sites, r.round, r.sites)
    return RunStatus(
        run_id=info.run_id,
        finished=info.finished,
        rounds=int(planned),
        last_round=stored[-1].round if stored else 0,
        accuracy=last.get("accuracy"),
        loss=last.get("loss"),
        epsilon=last.get("epsilon"),
        delta=last.get("delta"),
        last_round_seconds=last.get("seconds"),
        sites=sorted(sites.values(), key=lambda s: s.site),
    )


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="a run's state from its store: rounds, accuracy, epsilon, every site")
    p.add_argument("--state", required=True, help="the server's --state (or simulate's --out) directory")
    p.add_argument("--json", action="store_true", help="print only a JSON object on stdout")
    p.set_defaults(run=_status)


def _status(args: argparse.Namespace) -> int:
    status = run_status(Path(args.state))
    if args.json:
        json.dump(status.as_json(), sys.stdout)
        print()
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    state = "finished" if status.finished else "running (or stopped)"
    console = Console()
    console.print(
        f"run {status.run_id}: {state}, round {status.last_round} of {status.rounds}; "
        f"accuracy {_num(status.accuracy)}, loss {_num(status.loss)}"
        + (f", epsilon {status.epsilon:.3f} (delta {status.delta:g})" if status.epsilon is not None else "")
    )
    table = Table(title="sites")
    for column in ("site", "sampled", "aggregated", "last round", "drops", "last drop", "epsilon"):
        table.add_column(column, justify="left" if column in ("site", "last drop") else "right")
    for s in status.sites:
        table.add_row(
            escape(s.site),
            str(s.sampled),
            str(s.aggregated),
            str(s.last_round or "-"),
            str(s.drops),
            escape(s.last_drop or "-"),  # a site's words: never markup
            _num(s.epsilon),
        )
    console.print(table)
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
