"""Sites that misbehaved in a run, kept out of the rest of it: a lying protocol message (a
secure-aggregation message that fails its checks) at once, a malformed update (which a
numerical blow-up can make honestly) on its STRIKES-th time. Part of the run's state."""

from __future__ import annotations

import logging

from fedcore.aggregation import Drop, DropReason
from fedcore.engine.transport import Transport

log = logging.getLogger(__name__)

STRIKES = 3


class Exclusions:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.excluded: dict[str, str] = {}  # site -> why
        self._strikes: dict[str, int] = {}  # malformed updates per site, in this process

    def exclude(self, site: str, reason: str) -> None:
        self.excluded[site] = reason
        self.transport.exclude(site, reason)  # a real federation ends its session and refuses it

    def judge(self, dropped: dict[str, Drop], number: int) -> None:
        """Count the round's bad replies against their sites."""
        for site, drop in dropped.items():
            if drop.reason is not DropReason.BAD_REPLY:
                continue
            self._strikes[site] = self._strikes.get(site, 0) + 1
            if drop.exchange != "fit" or self._strikes[site] >= STRIKES:
                log.warning("site %s is excluded from the rest of the run: %s", site, drop)
                self.exclude(site, f"round {number}: {drop}")

    def allowed(self, sites: list[str]) -> list[str]:
        return [s for s in sites if s not in self.excluded]
