"""The Coordinator talks to sites only through a Transport: gRPC in a deployment,
in-process in a simulation. The round code is the same for both."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from fedcore.engine.messages import Instruction, Reply


class Transport(abc.ABC):
    @abc.abstractmethod
    async def wait_for_sites(self, count: int) -> None:
        """Return once at least `count` sites are available (no polling sleeps)."""

    @abc.abstractmethod
    def available(self) -> list[str]:
        """Names of the sites that can take work now."""

    @abc.abstractmethod
    async def request(self, site: str, instruction: Instruction) -> Reply:
        """Send `instruction` to `site` and await its reply. Raises SiteUnavailable when the
        site is gone; the caller bounds the wait with the round's deadline (cancellation)."""

    def declined(self) -> dict[str, str]:
        """Sites that declined the job since the last call, with their reasons (a site's
        policy may refuse the task's code)."""
        return {}

    def sampled(self, round_number: int, attempt: int, sites: Sequence[str]) -> None:  # noqa: B027
        """The sites sampled for an attempt at a round (a simulation plays its sites'
        behaviour from it). Nothing to do for a real federation."""

    def exclude(self, site: str, reason: str) -> None:  # noqa: B027
        """Keep `site` out of the rest of the run (it misbehaved): a real federation ends
        its session and refuses it from now on. The Coordinator stops sampling it either way."""

    def state(self) -> Any:
        """What the transport must keep for a resumed run, as JSON (a simulation's virtual
        sites' states); None for a real federation, whose sites keep their own."""
        return None

    def load_state(self, state: Any) -> None:  # noqa: B027
        """Continue from `state()`'s value."""

    @abc.abstractmethod
    async def finish(self, *, completed: bool, reason: str) -> None:
        """Tell every site the run is over."""
