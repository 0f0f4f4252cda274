"""The site's privacy ledger: what every run has cost this site's data, on its own disk.

The ledger keeps the accountant's state (the mechanisms run, per run), not just numbers, so
epsilon can be recomputed exactly and composed across runs. It is rewritten atomically
(temporary file, fsync, rename) after every change, so a crash or a kill never loses or
tears it, and a restarted site sees everything spent before. It is never reset by fedcore.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedcore.config import Accountant
from fedcore.errors import ConfigError
from fedcore.privacy.accountant import Mechanism, epsilon

VERSION = 1


class PrivacyLedger:
    """`path` None keeps the ledger in memory (a simulated site: see `state`)."""

    def __init__(self, path: Path | None, *, delta: float, accountant: Accountant = Accountant.PLD) -> None:
        self.path = path
        self.delta = delta
        self.accountant = accountant  # the site's: its budget is checked with it
        self.runs: dict[str, list[Mechanism]] = self._load()

    def _load(self) -> dict[str, list[Mechanism]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("version") != VERSION:
                raise ValueError(f"version {raw.get('version')!r}")
            return {
                run: [
                    Mechanism(float(m["noise_multiplier"]), float(m["sample_rate"]), int(m["steps"]))
                    for m in spent
                ]
                for run, spent in raw["runs"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            # Never start afresh over a damaged ledger: that would forget spent privacy.
            raise ConfigError(
                f"privacy ledger {self.path} is unreadable ({err}); restore it from a backup"
            ) from None

    def reload(self) -> None:
        """Read the file again (another process may share it); in memory: nothing to read."""
        if self.path is not None:
            self.runs = self._load()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock (a `.lock` file beside it, flock) with the file freshly read:
        processes that share a ledger check and record one at a time."""
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.reload()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def history(self) -> list[Mechanism]:
        return [m for spent in self.runs.values() for m in spent]

    def spent(self, run: str | None = None) -> float:
        """Epsilon (at the ledger's delta) spent by one run, or by all runs together."""
        return epsilon(
            self.runs.get(run, []) if run is not None else self.history(), self.delta, self.accountant
        )

    def spent_after(self, mechanism: Mechanism) -> float:
        """Total epsilon if `mechanism` ran next: what a site checks before it trains."""
        return epsilon([*self.history(), mechanism], self.delta, self.accountant)

    def record(self, run: str, mechanism: Mechanism) -> None:
        self.runs.setdefault(run, []).append(mechanism)
        self._save()

    def state(self) -> dict[str, list[Mechanism]]:
        """The mechanisms per run: what a simulated site keeps between rounds."""
        return {run: list(spent) for run, spent in self.runs.items()}

    def restore(self, state: dict[str, list[Mechanism]]) -> None:
        self.runs = {run: list(spent) for run, spent in state.items()}

    def _save(self) -> None:
        if self.path is None:
            return
        document: dict[str, Any] = {
            "version": VERSION,
            "delta": self.delta,
            # every entry is a Gaussian mechanism on this site's examples: the total is for one
            # example added or removed, by the site's accountant
            "unit": "example",
            "adjacency": "add-remove",
            "accountant": self.accountant.value,
            "runs": {run: [vars(m) for m in spent] for run, spent in self.runs.items()},
            "epsilon_total": self.spent(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
