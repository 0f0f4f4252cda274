"""A durable run store: every committed round survives a crash, so a server can resume.

SQLite (WAL, synchronous=FULL) is the source of truth; `metrics.jsonl`, `sites.jsonl` and
`model.safetensors` are views for people and tools, rebuilt from it by `reconcile_views`.
An exclusive `flock` on `run.lock` keeps two processes out of one directory; the kernel
drops it when the holder dies, kill -9 included, so no stale lock needs cleaning up.
Nothing is pickled: records are JSON, models safetensors, checkpoint state opaque bytes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from fedcore.engine.model_file import load_ordered, model_pieces, sha256_of
from fedcore.engine.records import RoundRecord, finite, site_rows
from fedcore.engine.run_state import RunState
from fedcore.engine.state_files import append_lines, atomic_write, lock
from fedcore.errors import ConfigError

BLOB_PIECE = 1 << 20  # bytes written to a stored model at a time

SCHEMA_VERSION = 1
# A stored model's safetensors metadata, one JSON value (safetensors writes several keys in
# no fixed order): its round, and its tensors' order (safetensors sorts them; a model's is not).

_SCHEMA = (  # sites.position keeps each round's rows in the order the views list them
    "CREATE TABLE runs (id INTEGER PRIMARY KEY CHECK (id = 1), run_id TEXT NOT NULL,"
    " experiment TEXT NOT NULL, created REAL NOT NULL, finished INTEGER NOT NULL)",
    "CREATE TABLE rounds (round INTEGER PRIMARY KEY, record TEXT NOT NULL, committed REAL NOT NULL)",
    "CREATE TABLE sites (round INTEGER NOT NULL REFERENCES rounds (round), position INTEGER NOT NULL,"
    " site TEXT NOT NULL, row TEXT NOT NULL, PRIMARY KEY (round, position))",
    "CREATE TABLE models (round INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), round INTEGER NOT NULL, state BLOB NOT NULL)",
)


class StoreCorrupted(ConfigError):
    """Stored data fails its integrity check: the database was damaged or edited."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    experiment: dict[str, Any]
    created: float
    finished: bool


@dataclass(frozen=True)
class StoredRound:
    round: int
    record: dict[str, Any]
    sites: list[dict[str, Any]]
    model_sha256: str | None  # None: the model was pruned by keep_models


def _dumps(value: Any) -> str:
    """The one JSON text stored and written to the views (NaN/infinity -> null, strict JSON)."""
    return json.dumps(finite(value), allow_nan=False)


class SqliteRunStore:
    """A run's rounds, site rows, models and resume checkpoint in `DIRECTORY/run.db`."""

    def __init__(self, directory: Path, *, keep_models: int | None = None, read_only: bool = False) -> None:
        if keep_models is not None and keep_models < 1:
            raise ConfigError(f"keep_models must be at least 1 (or unset to keep all), not {keep_models}")
        self.directory = directory
        self.keep_models = keep_models
        self.metrics_path = directory / "metrics.jsonl"
        self.sites_path = directory / "sites.jsonl"
        self.model_path = directory / "model.safetensors"
        self._mutex = threading.Lock()  # the connection may be used from the coordinator's threads
        if read_only:  # a reader (fedcore models): no lock, no writes; a live run may hold the directory
            if not (directory / "run.db").is_file():
                raise ConfigError(
                    f"{directory} holds no run (no run.db): give a simulate --out or server --state directory"
                )
            self._lock_fd = None
            self._db = sqlite3.connect(
                f"file:{directory / 'run.db'}?mode=ro", uri=True, check_same_thread=False
            )
            self._db.execute("PRAGMA trusted_schema=OFF")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                raise ConfigError(f"{directory}/run.db is not a fedcore run store this version reads")
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock(directory)
        try:
            self._db = sqlite3.connect(directory / "run.db", isolation_level=None, check_same_thread=False)
            try:
                self._db.execute("PRAGMA trusted_schema=OFF")  # no SQL functions from a crafted schema
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._init_schema()
            except BaseException:
                self._db.close()
                raise
        except sqlite3.DatabaseError as e:
            self._unlock()
            raise ConfigError(f"state directory {directory}: run.db is not a usable run store ({e})") from e
        except BaseException:
            self._unlock()
            raise
        # Views may lag the store after a crash: the first commit rebuilds them unless
        # reconcile_views already has.
        self._views_stale = True

    def _init_schema(self) -> None:
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise ConfigError(f"state directory {self.directory}: run.db is not a fedcore run store")
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise ConfigError(
                    f"state directory {self.directory}: run.db has schema version {version}; "
                    f"this fedcore reads version {SCHEMA_VERSION}"
                )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def open_run(self, *, run_id: str, experiment: dict[str, Any]) -> None:
        """Start a run in an empty directory (resuming goes through `run()` instead)."""
        with self._mutex, self._transaction():
            row = self._db.execute("SELECT run_id FROM runs").fetchone()
            if row is not None:
                raise ConfigError(f"state directory {self.directory} already holds run {row[0]}")
            self._db.execute(
                "INSERT INTO runs (id, run_id, experiment, created, finished) VALUES (1, ?, ?, ?, 0)",
                (run_id, _dumps(experiment), time.time()),
            )

    def run(self) -> RunInfo | None:
        with self._mutex:
            row = self._db.execute("SELECT run_id, experiment, created, finished FROM runs").fetchone()
        if row is None:
            return None
        return RunInfo(run_id=row[0], experiment=json.loads(row[1]), created=row[2], finished=bool(row[3]))

    def set_experiment(self, experiment: dict[str, Any]) -> None:
        """Replace the experiment (a finished run extended with more rounds) and reopen the run."""
        self._update_run("UPDATE runs SET experiment = ?, finished = 0", (_dumps(experiment),))

    def finish(self) -> None:
        self._update_run("UPDATE runs SET finished = 1", ())

    def _update_run(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._mutex, self._transaction():
            if self._db.execute(sql, args).rowcount != 1:
                raise ValueError(f"state directory {self.directory} holds no run: call open_run first")

    def commit_round(
        self,
        *,
        round: int,
        record: dict[str, Any],
        sites: list[dict[str, Any]],
        model: dict[str, np.ndarray],
        state: bytes,
    ) -> None:
        """Make a round durable in one transaction, then append it to the views.

        Once the transaction commits the round is the run's, even if updating the views
        fails or the process dies before it: `reconcile_views` (or the next commit) repairs them.
        """
        if record.get("round", round) != round:
            raise ValueError(f"record says round {record['round']} but is committed as round {round}")
        line = _dumps(record)
        site_lines = [_dumps(row) for row in sites]
        pieces = model_pieces(round, model)
        with self._mutex:
            with self._transaction():
                last = self._last_round()
                if round != last + 1:
                    raise ValueError(
                        f"round {round} cannot follow round {last}: rounds commit in order from 1"
                    )
                if self._db.execute("SELECT finished FROM runs WHERE finished = 0").fetchone() is None:
                    raise ValueError(
                        f"cannot commit round {round}: no open run (open_run, or set_experiment to extend)"
                    )
                self._db.execute(
                    "INSERT INTO rounds (round, record, committed) VALUES (?, ?, ?)",
                    (round, line, time.time()),
                )
                self._db.executemany(
                    "INSERT INTO sites (round, position, site, row) VALUES (?, ?, ?, ?)",
                    [
                        (round, i, str(row["site"]), text)
                        for i, (row, text) in enumerate(zip(sites, site_lines, strict=True))
                    ],
                )
                self._db.execute(
                    "INSERT INTO models (round, sha256, data) VALUES (?, ?, zeroblob(?))",
                    (round, sha256_of(pieces), sum(memoryview(p).nbytes for p in pieces)),
                )
                write_in_place(self._db, round, pieces)
                if self.keep_models is not None:
                    self._db.execute("DELETE FROM models WHERE round <= ?", (round - self.keep_models,))
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoint (id, round, state) VALUES (1, ?, ?)",
                    (round, bytes(state)),
                )
            stale, self._views_stale = self._views_stale, True  # stays True if the views fail below
        if stale:
            self.reconcile_views(latest=pieces)
        else:
            append_lines(self.metrics_path, [line])
            append_lines(self.sites_path, site_lines)
            atomic_write(self.model_path, pieces, durable=False)  # the very bytes stored
        self._views_stale = False

    def record(self, record: RoundRecord, state: RunState) -> None:
        """The RoundStore interface: the round, and the run's state with its model stored once.
        A round already committed (its views failed after the commit, and the write is tried
        again) only repairs the views."""
        if self.last_round() >= record.round:
            self.reconcile_views()
            return
        checkpoint = dataclasses.replace(state, parameters={}).to_bytes()  # the model is in `models`
        rows = site_rows(record)
        self.commit_round(
            round=record.round, record=record.as_json(), sites=rows, model=state.parameters, state=checkpoint
        )

    def _last_round(self) -> int:
        value = self._db.execute("SELECT max(round) FROM rounds").fetchone()[0]
        return int(value) if value is not None else 0

    def last_round(self) -> int:
        """The latest committed round; 0 before the first."""
        with self._mutex:
            return self._last_round()

    def checkpoint(self) -> tuple[int, bytes] | None:
        """The state saved with the latest committed round, to resume from."""
        with self._mutex:
            row = self._db.execute("SELECT round, state FROM checkpoint").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def rounds(self) -> list[StoredRound]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT r.round, r.record, m.sha256 FROM rounds r LEFT JOIN models m USING (round) ORDER BY r.round"
            ).fetchall()
            site_rows = self._db.execute("SELECT round, row FROM sites ORDER BY round, position").fetchall()
        by_round: dict[int, list[dict[str, Any]]] = {}
        for r, text in site_rows:
            by_round.setdefault(r, []).append(json.loads(text))
        return [StoredRound(r, json.loads(text), by_round.get(r, []), sha) for r, text, sha in rows]

    def model(self, round: int) -> dict[str, np.ndarray]:
        """The global model after `round`, checked against the SHA-256 stored with it."""
        return load_ordered(self._model_blob(round))

    def _model_blob(self, round: int) -> bytes:
        with self._mutex:
            row = self._db.execute("SELECT sha256, data FROM models WHERE round = ?", (round,)).fetchone()
        if row is None:
            raise KeyError(f"no stored model for round {round} (not committed, or pruned by keep_models)")
        blob = bytes(row[1])
        self._verify(round, row[0], hashlib.sha256(blob).hexdigest())
        return blob

    def _verify(self, round: int, stored: str, computed: str) -> None:
        if computed != stored:
            raise StoreCorrupted(
                f"state directory {self.directory}: the model of round {round} fails its SHA-256 check "
                f"(stored {stored}, computed {computed}); run.db is damaged or was modified"
            )

    def reconcile_views(self, *, latest: list[bytes | memoryview] | None = None) -> None:
        """Make the views hold exactly the committed rounds, each once, in order.

        A crash can land between a commit and its view append, or mid-line. Files that
        already match are left untouched (byte for byte); others are replaced atomically.
        `latest`: the last committed model's pieces when the caller holds them (not read again).
        """
        with self._mutex:
            lines = [text for (text,) in self._db.execute("SELECT record FROM rounds ORDER BY round")]
            site_lines = [
                text for (text,) in self._db.execute("SELECT row FROM sites ORDER BY round, position")
            ]
            last = self._last_round()
            digest = self._db.execute("SELECT sha256 FROM models WHERE round = ?", (last,)).fetchone()
        for path, expected in ((self.metrics_path, lines), (self.sites_path, site_lines)):
            data = "".join(line + "\n" for line in expected).encode()
            if not path.exists() or path.read_bytes() != data:
                atomic_write(path, data, durable=False)
        if last and digest is None:
            raise StoreCorrupted(f"state directory {self.directory}: round {last} has no stored model")
        if last and latest is None:
            self._check_stored(last, digest[0])  # never publish a tampered model, nor keep one
        if last and (not self.model_path.exists() or file_sha256(self.model_path) != digest[0]):
            atomic_write(self.model_path, self._model_blob(last) if latest is None else latest, durable=False)
        self._views_stale = False

    def _check_stored(self, round: int, digest: str) -> None:
        """StoreCorrupted unless the stored model matches its SHA-256 (read in pieces)."""
        hashed = hashlib.sha256()
        with self._mutex, self._db.blobopen("models", "data", round, readonly=True) as stored:
            while piece := stored.read(BLOB_PIECE):
                hashed.update(piece)
        self._verify(round, digest, hashed.hexdigest())

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Release the database, then the directory (another process may take it at once)."""
        with self._mutex:
            self._db.close()
        self._unlock()

    def __enter__(self) -> SqliteRunStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def write_in_place(db: sqlite3.Connection, round: int, pieces: list[bytes | memoryview]) -> None:
    """Fill a model row's zeroblob: bound as a parameter, SQLite copies a blob twice on the way
    in (+1 GiB measured for a 512 MiB model); written through incremental I/O, not at all."""
    with db.blobopen("models", "data", round) as stored:  # the row id is the round
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for start in range(0, len(view), BLOB_PIECE):
                stored.write(view[start : start + BLOB_PIECE])


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
