"""Each site's part in a run, tallied round by round from the per-site rows a round store
keeps (`engine.records.site_rows`): what `fedcore status` prints and the server's dashboard
shows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SiteStatus:
    site: str
    sampled: int = 0  # attempts it was sampled for that completed a round
    aggregated: int = 0  # rounds its update is in
    last_round: int | None = None  # the last round it was sampled for
    drops: int = 0
    last_drop: str | None = None
    epsilon: float | None = None  # the run's epsilon it last reported (sample-level DP)
    drop_reasons: dict[str, int] = field(default_factory=dict)  # its drops, by reason


def tally(sites: dict[str, SiteStatus], round: int, rows: Iterable[Mapping[str, Any]]) -> None:
    """Add one completed round's per-site rows to `sites` (by name)."""
    for row in rows:
        s = sites.setdefault(row["site"], SiteStatus(row["site"]))
        s.sampled += 1
        s.last_round = round
        if row.get("aggregated"):
            s.aggregated += 1
        if row.get("dropped"):
            s.drops += 1
            s.last_drop = row["dropped"]
            reason = str(row.get("reason") or "unknown")
            s.drop_reasons[reason] = s.drop_reasons.get(reason, 0) + 1
        if row.get("epsilon") is not None:
            s.epsilon = row["epsilon"]
