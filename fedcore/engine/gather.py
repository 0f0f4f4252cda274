"""Fan an exchange out to sites and gather the replies, with the round's deadline; what an
attempt's exchanges carried (Traffic)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fedcore.aggregation import Drop, DropReason
from fedcore.engine.messages import METRIC_NAME, Instruction, Reply
from fedcore.engine.transport import Transport
from fedcore.errors import ProtocolError, SiteUnavailable

log = logging.getLogger(__name__)


async def gather(
    transport: Transport,
    exchange: str,
    sites: list[str],
    instruction_for: Callable[[str], Instruction],
    on_reply: Callable[[Reply], None],
    *,
    deadline: float,
    quorum: int | None = None,
    grace: float = 0.0,
) -> dict[str, Drop]:
    """Send to every site; hand each good reply to `on_reply`; return the dropped sites
    with why. Late sites are cancelled at the round's deadline, or `grace` seconds after
    `quorum` sites have replied, whichever is first (one silent site does not hold the
    round to its deadline).

    Replies are handed on as they arrive, never buffered: the server holds no reply longer
    than it takes to fold it. Whatever consumes them must not depend on their order (the
    plain sum is exact, `aggregation.exact_sum`; lists are sorted by site)."""
    dropped: dict[str, Drop] = {}

    def settle(site: str, outcome: Reply | Drop) -> None:
        if isinstance(outcome, Drop):
            dropped[site] = outcome
        elif outcome.site != site:  # a reply speaks for the site asked, never for another
            dropped[site] = Drop(DropReason.BAD_REPLY, exchange, "a reply in another site's name")
        elif outcome.refusal is not None:
            dropped[site] = Drop(DropReason.REFUSED, exchange, outcome.refusal, outcome.refusal_code)
        else:
            try:
                on_reply(outcome)
            except Exception as err:  # malformed in a way the checks did not name
                dropped[site] = Drop(DropReason.BAD_REPLY, exchange, str(err))

    def outcome_of(task: asyncio.Future[Reply], site: str) -> Reply | Drop:
        try:
            return task.result()
        except SiteUnavailable as err:
            return Drop(DropReason.UNAVAILABLE, exchange, err.reason)
        except Exception as err:  # a site's crash is data for the round
            log.exception("site %s failed", site)
            return Drop(DropReason.FAILED, exchange, f"{type(err).__name__}: {err}")

    # A finished task holds its reply: each is forgotten once handed on, so the replies
    # folded so far are not kept alive until the round ends.
    waiting = {asyncio.ensure_future(transport.request(s, instruction_for(s))): s for s in sites}
    replied, closing = 0, False
    try:
        async with asyncio.timeout(deadline) as timeout:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    site = waiting.pop(task)
                    outcome = outcome_of(task, site)
                    replied += isinstance(outcome, Reply) and outcome.refusal is None
                    settle(site, outcome)
                del done, outcome, task  # the server's upload budget counts a reply until it is gone
                if quorum is not None and replied >= quorum and not closing:
                    closing = True  # the quorum is in: the others have `grace` seconds left
                    when = asyncio.get_running_loop().time() + grace
                    timeout.reschedule(min(when, timeout.when() or when))
    except TimeoutError:
        pass
    finally:
        # Every task is accounted for exactly once: finished ones (even those that
        # finished as the deadline struck) by their outcome, the rest as late.
        for task, site in waiting.items():
            if task.done():
                outcome = outcome_of(task, site)
            else:
                task.cancel()
                outcome = Drop(DropReason.DEADLINE, exchange)
            settle(site, outcome)
        await asyncio.gather(*waiting, return_exceptions=True)
    return dict(sorted(dropped.items()))


class Deadlines:
    """How long an exchange may take: the job's `round_timeout` when it sets one, else a
    multiple of the recent rounds' durations with a floor (the first round gets FIRST):
    a federation whose rounds take 2 s does not wait 600 s for a site that will not answer."""

    FIRST, FLOOR, MULTIPLE, RECENT = 600.0, 60.0, 4.0, 5

    def __init__(self, fixed: float | None) -> None:
        self.fixed = fixed
        self.recent: list[float] = []

    def current(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if not self.recent:
            return self.FIRST
        return max(self.FLOOR, self.MULTIPLE * max(self.recent))

    def observe(self, seconds: float | None) -> None:
        """A completed round's seconds, or None for a failed attempt: then the next deadline
        doubles (up to FIRST), so that a round legitimately slower than the last is not cut
        at every attempt."""
        if seconds is None:
            seconds = min(self.FIRST, 2 * self.current()) / self.MULTIPLE
        self.recent = [*self.recent, seconds][-self.RECENT :]


@dataclass
class Traffic:
    """One attempt's model bytes out, update bytes in, and the sites' fit metrics."""

    sent: int = 0
    received: int = 0
    fit: dict[str, tuple[dict[str, float], int]] = field(default_factory=dict)

    def metrics(self, sites: list[str], reserved: frozenset[str]) -> dict[str, list[tuple[float, int]]]:
        """Each numeric fit metric of `sites`, with its example weight (stage-owned ones aside)."""
        out: dict[str, list[tuple[float, int]]] = {}
        for site in sites:
            metrics, examples = self.fit.get(site, ({}, 1))
            for key, value in metrics.items():
                if key not in reserved:
                    out.setdefault(key, []).append((value, max(examples, 1)))
        return out


def weighted(values: list[tuple[float, int]]) -> float | None:
    """The weighted mean, the same whatever order the replies arrived in (fsum is exact)."""
    total = math.fsum(n for _, n in values)
    return math.fsum(v * n for v, n in values) / total if total else None


MAX_EXAMPLES = 10**9  # an evaluation reply's example count is bounded like a fit's weight
MAX_NAMED = 32  # a task's own evaluation metrics kept per round (site-supplied names)
MAX_NAMED_PER_REPLY = 16


@dataclass
class EvaluationMetrics:
    """Federated evaluation's replies: (value, examples) pairs for the weighted means."""

    accuracy: list[tuple[float, int]] = field(default_factory=list)
    loss: list[tuple[float, int]] = field(default_factory=list)
    named: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # the task's own metrics
    replies: int = 0
    cap: int = MAX_EXAMPLES  # a site's count weighs at most this ([federation] max_examples_per_site)

    def collect(self, reply: Reply) -> None:
        accuracy, loss = reply.metrics.get("accuracy"), reply.metrics.get("loss")
        if (
            accuracy is None
            or loss is None
            or not math.isfinite(loss)
            or not 0 < reply.num_examples <= MAX_EXAMPLES
        ):
            raise ProtocolError("evaluation reply without finite loss, accuracy and examples")
        examples = min(reply.num_examples, self.cap)
        if math.isfinite(accuracy):  # a hosted client may report no accuracy (NaN)
            self.accuracy.append((accuracy, examples))
        self.loss.append((loss, examples))
        self.replies += 1
        kept = 0  # names are a site's text: checked, and a few per reply
        for name, value in reply.metrics.items():
            if name not in ("loss", "accuracy") and METRIC_NAME.match(name) and math.isfinite(value):
                self.named.setdefault(name, []).append((value, examples))
                kept += 1
                if kept == MAX_NAMED_PER_REPLY:
                    break

    def means(self) -> dict[str, float]:
        """The task's own metrics that most sites reported (one site cannot crowd out the
        others' names), example-weighted, the MAX_NAMED most reported."""
        common = [k for k, pairs in self.named.items() if 2 * len(pairs) > self.replies]
        chosen = sorted(sorted(common), key=lambda k: -len(self.named[k]))[:MAX_NAMED]
        return {k: v for k in sorted(chosen) if (v := weighted(self.named[k])) is not None}
