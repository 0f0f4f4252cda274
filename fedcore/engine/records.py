"""A run's per-round records and where they go (one place for every metric consumer)."""

from __future__ import annotations

import itertools
import logging
import math
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import save_file

from fedcore.aggregation import Drop, DropReason, RefusalCode
from fedcore.engine.run_state import RunState
from fedcore.tensors import Arrays

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    round: int
    sites: int  # updates aggregated
    accuracy: float | None  # global model after the round, on the held-out split
    loss: float | None
    seconds: float
    sampled: list[str] = field(default_factory=list)
    dropped: dict[str, Drop] = field(default_factory=dict)  # site -> why its input is not in the aggregate
    train_loss: float | None = None  # sites' mean local training loss, example-weighted
    fit_metrics: dict[str, float] = field(default_factory=dict)  # every numeric fit metric, example-weighted
    attempt: int = 1  # > 1 when earlier attempts at this round failed
    evaluation: str = "central"  # or "federated"
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the task's own, example-weighted
    examples: int = 0  # training examples behind the aggregated updates
    bytes_sent: int = 0  # model payload bytes sent to sites this round (all attempts)
    bytes_received: int = 0  # update payload bytes received from sites
    secure_aggregation: dict[str, Any] = field(default_factory=dict)  # per-stage counts and seconds
    aggregation: dict[str, Any] = field(default_factory=dict)  # e.g. a robust rule's picks
    epsilon: float | None = None  # the run's DP epsilon after this round (None: no DP)
    delta: float | None = None
    site_epsilon: dict[str, float] = field(default_factory=dict)  # sample-level: each reporting site's
    privacy: dict[str, Any] = field(default_factory=dict)  # mode, noise, clip norm, sites' noise in the sum
    declined: dict[str, str] = field(default_factory=dict)  # sites that declined the job since the last round
    skipped: str | None = (
        None  # why the round left the model unchanged (its last attempt's result was rejected)
    )

    def as_json(self) -> dict[str, Any]:
        """A JSON-safe dict: non-finite numbers (NaN, infinity) become null."""
        clean: dict[str, Any] = finite(asdict(self))
        return clean

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """The record `as_json` wrote (a resumed run's earlier rounds)."""
        values = dict(data)
        values["dropped"] = {
            site: Drop(
                DropReason(d["reason"]),
                d["exchange"],
                d["detail"],
                RefusalCode(d["refusal"]) if d["refusal"] else None,
                d["aggregated"],
            )
            for site, d in data.get("dropped", {}).items()
        }
        return cls(**values)


def finite(value: Any) -> Any:
    """`value` with non-finite floats (NaN, infinity) as None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class RoundStore(Protocol):
    """Records each completed round with the run's state after it (the global model in it)."""

    def record(self, record: RoundRecord, state: RunState) -> None: ...


def site_rows(record: RoundRecord) -> list[dict[str, Any]]:
    """The per-site view of a round: each sampled site, whether its update is in the
    aggregate, why not, and its own epsilon for the run when it reported one."""
    rows = []
    for site in record.sampled:
        drop = record.dropped.get(site)
        picked = record.aggregation.get("trimmed")
        row: dict[str, Any] = {
            "round": record.round,
            "attempt": record.attempt,
            "site": site,
            "aggregated": drop is None or drop.aggregated,
            "dropped": str(drop) if drop else None,
            "reason": drop.reason.value if drop else None,
            "refusal": drop.refusal.value if drop and drop.refusal else None,
        }
        if picked is not None:  # a robust rule saw this site's update and left it out
            row["trimmed"] = site in picked
        if site in record.site_epsilon:
            row["epsilon"] = finite(record.site_epsilon[site])
            row["delta"] = record.delta
        rows.append(row)
    return rows


class MemoryStore:
    def __init__(self) -> None:
        self.records: list[RoundRecord] = []

    def record(self, record: RoundRecord, state: RunState) -> None:
        self.records.append(record)


class FanOutStore:
    """Hands every round to several stores. A round some of them took before another failed
    is not handed to them again when it is retried (`record_durably`)."""

    def __init__(self, stores: list[RoundStore]) -> None:
        self.stores = stores
        self._took: tuple[int, set[int]] = (0, set())  # a round, and the stores that have it

    def record(self, record: RoundRecord, state: RunState) -> None:
        if self._took[0] != record.round:
            self._took = (record.round, set())
        took = self._took[1]
        for i, store in enumerate(self.stores):
            if i not in took:
                store.record(record, state)
                took.add(i)


# Seconds between tries to store a round whose write failed on I/O (then the last, again and
# again): a full disk or exhausted file descriptors pause the run, they never end it.
STORE_RETRY_SECONDS = (0.1, 0.5, 2.0, 5.0, 15.0, 30.0)
TRANSIENT_STORE_ERRORS = (OSError, sqlite3.OperationalError)  # EMFILE, ENOSPC, EIO, "unable to open"


def record_durably(
    store: RoundStore,
    record: RoundRecord,
    state: RunState,
    *,
    on_failure: Callable[[BaseException], None],
    stop: threading.Event | None = None,
) -> None:
    """store.record, tried until it succeeds: an I/O error is reported (`on_failure`: the log
    and the metrics) and the write tried again after a pause, with nothing else done
    meanwhile (the round's model does not leave before it is stored). Other errors (a bug,
    a round out of order) end the run as before; so does the last I/O error once `stop` is set
    (the process is asked to end: SIGTERM must not wait for a disk that never comes back)."""
    pause = stop or threading.Event()
    for tries in itertools.count():
        try:
            store.record(record, state)
            return
        except TRANSIENT_STORE_ERRORS as err:
            log.error("round %d could not be stored (%s); trying again", record.round, err)
            on_failure(err)
            if pause.wait(STORE_RETRY_SECONDS[min(tries, len(STORE_RETRY_SECONDS) - 1)]):
                raise


def save_model(path: Path, parameters: Arrays, metadata: dict[str, str] | None = None) -> None:
    """Write parameters as safetensors, atomically (never a torn file after a crash)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in parameters.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class RunResult:
    parameters: Arrays
    records: list[RoundRecord]
    stopped: str | None = None  # why the run ended before its last round, if a stage ended it
    commit_wait_seconds: float = 0.0  # time the rounds waited for the store (see Coordinator._commit)
