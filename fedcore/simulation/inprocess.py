"""The in-process transport: virtual sites in this process, same round code as gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fedcore.engine import Instruction, Reply, Site, Transport
from fedcore.errors import SiteUnavailable


class InProcessTransport(Transport):
    """Sites are built on first use by `site_factory(name)` and run on a worker thread, so
    the event loop stays free while they train."""

    def __init__(self, names: list[str], site_factory: Callable[[str], Site], *, workers: int = 1) -> None:
        self._names = list(names)
        self._factory = site_factory
        self._sites: dict[str, Site] = {}
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="site")

    async def wait_for_sites(self, count: int) -> None:
        if count > len(self._names):
            raise SiteUnavailable("*", f"the simulation has {len(self._names)} sites, the run needs {count}")

    def available(self) -> list[str]:
        return list(self._names)

    def _handle(self, name: str, instruction: Instruction) -> Reply:
        site = self._sites.get(name)
        if site is None:
            site = self._sites[name] = self._factory(name)
        return site.handle(instruction)

    async def request(self, site: str, instruction: Instruction) -> Reply:
        if site not in self._names:
            raise SiteUnavailable(site, "no such site")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._handle, site, instruction
        )

    async def finish(self, *, completed: bool, reason: str) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
