"""Crash points for fault-injection tests: `FEDCORE_CRASH_AT=ROUND:POINT` makes the process
kill itself (SIGKILL: no clean-up, like a power cut) when it reaches POINT of round ROUND.

POINT is `before_sampling`, an exchange's name (`fit`, or a secure sum's `advertise`,
`share_keys`, `masked_input`, `unmask`: once its first reply has arrived),
`after_aggregation` (the aggregate is in, the model not yet updated) or `before_commit`
(the round's record is built, not yet stored). Unset, every point is a no-op.
"""

from __future__ import annotations

import enum
import logging
import os
import signal

log = logging.getLogger(__name__)

ENVIRONMENT = "FEDCORE_CRASH_AT"


class Point(enum.StrEnum):
    BEFORE_SAMPLING = "before_sampling"
    AFTER_AGGREGATION = "after_aggregation"
    BEFORE_COMMIT = "before_commit"


_CRASH_AT = os.environ.get(ENVIRONMENT)


def reach(round_number: int, point: str) -> None:
    """Die here if this is the configured crash point."""
    if _CRASH_AT is not None and f"{round_number}:{point}" == _CRASH_AT:
        log.critical("fault injection: killing this process at round %d, %s", round_number, point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def warn_if_armed() -> None:
    """Say loudly that this process will kill itself (a test setting left in production)."""
    if _CRASH_AT is not None:
        log.warning(
            "%s=%s is set: this process will SIGKILL itself there (fault-injection tests only)",
            ENVIRONMENT,
            _CRASH_AT,
        )
