"""Fan an exchange out to sites and gather the replies, with the round's deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fedcore.aggregation import Drop, DropReason
from fedcore.engine.messages import Instruction, Reply
from fedcore.engine.transport import Transport
from fedcore.errors import SiteUnavailable

log = logging.getLogger(__name__)


async def gather(
    transport: Transport,
    exchange: str,
    sites: list[str],
    instruction_for: Callable[[str], Instruction],
    on_reply: Callable[[Reply], None],
    *,
    deadline: float,
    ordered: bool = True,
) -> dict[str, Drop]:
    """Send to every site; hand each good reply to `on_reply`; return the dropped sites
    with why. Late sites are cancelled at the round's deadline.

    With `ordered` (the default), replies are handed on in `sites` order whatever
    order they arrive in (early ones wait in a buffer), so the floating-point sum, and so
    the model, does not depend on timing: the same seed gives the same model with any
    number of workers. The buffer can hold up to all replies; a deployment that must keep
    memory at one model turns it off and folds replies as they arrive."""
    dropped: dict[str, Drop] = {}
    settled: dict[str, Reply | Drop] = {}  # site -> its reply, or why it has none
    order = iter(sites)
    upcoming = next(order, None)

    def hand_on(site: str, outcome: Reply | Drop) -> None:
        if isinstance(outcome, Drop):
            dropped[site] = outcome
        elif outcome.refusal is not None:
            dropped[site] = Drop(DropReason.REFUSED, exchange, outcome.refusal, outcome.refusal_code)
        else:
            try:
                on_reply(outcome)
            except Exception as err:  # malformed in a way the checks did not name
                dropped[site] = Drop(DropReason.BAD_REPLY, exchange, str(err))

    def settle(site: str, outcome: Reply | Drop) -> None:
        nonlocal upcoming
        if not ordered:
            hand_on(site, outcome)
            return
        settled[site] = outcome
        while upcoming is not None and upcoming in settled:
            hand_on(upcoming, settled.pop(upcoming))
            upcoming = next(order, None)

    def outcome_of(task: asyncio.Future[Reply], site: str) -> Reply | Drop:
        try:
            return task.result()
        except SiteUnavailable as err:
            return Drop(DropReason.UNAVAILABLE, exchange, err.reason)
        except Exception as err:  # a site's crash is data for the round
            log.exception("site %s failed", site)
            return Drop(DropReason.FAILED, exchange, f"{type(err).__name__}: {err}")

    tasks = {asyncio.ensure_future(transport.request(s, instruction_for(s))): s for s in sites}
    handled: set[asyncio.Future[Reply]] = set()
    try:
        async with asyncio.timeout(deadline):
            while len(handled) < len(tasks):
                done, _ = await asyncio.wait(set(tasks) - handled, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    handled.add(task)
                    settle(tasks[task], outcome_of(task, tasks[task]))
    except TimeoutError:
        pass
    finally:
        # Every task is accounted for exactly once: finished ones (even those that
        # finished as the deadline struck) by their outcome, the rest as late.
        for task, site in tasks.items():
            if task in handled:
                continue
            if task.done():
                outcome = outcome_of(task, site)
            else:
                task.cancel()
                outcome = Drop(DropReason.DEADLINE, exchange)
            handled.add(task)
            settle(site, outcome)
        await asyncio.gather(*tasks, return_exceptions=True)
    return dropped
