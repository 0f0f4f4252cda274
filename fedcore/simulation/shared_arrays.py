"""Large arrays between the simulation's processes through shared memory, not pipes.

A worker process gets its instruction, and returns its reply, pickled through a pipe. For a
model of millions of parameters that is most of a round: every array is copied into the
pickle, through the pipe and out again, once per site, and the coordinator's process does
half of that copying for every site. Here arrays of at least `THRESHOLD` bytes travel as
files in /dev/shm (memory, never disk) instead:
- the coordinator writes each array of an instruction once, however many sites receive it
  (the round's model is one set of files for all its sites), and removes the files when no
  task in flight uses them;
- a worker maps them once for all the sites it runs, read-only (as arrays decoded from
  gRPC messages are), so that no site can change what the next one receives;
- a worker writes each large array of its reply to a fresh file, which the coordinator maps
  and removes at once: the mapping lives as long as the array does.
Where /dev/shm is missing (not Linux) or full, arrays go through the pipe as before.
Closing the simulation removes every file it made, replies never read included; a
coordinator killed outright leaves its files (named fedcore-PID-...) in /dev/shm.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import mmap
import os
import pickle
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLD = 1 << 16  # bytes: a smaller array costs less in the pickle than as a file
_DIR = Path("/dev/shm")
_counter = itertools.count()

Export = Callable[[np.ndarray], "tuple[str, bool] | None"]  # array -> (path, reader removes it)


@functools.cache
def available() -> bool:
    return _DIR.is_dir() and os.access(_DIR, os.W_OK)


def file_prefix(owner: str) -> str:
    """The prefix of every file made for the publisher `owner` (for clean-up)."""
    return str(_DIR / f"fedcore-{owner}-")


def dumps(obj: object, export: Export) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, export).dump(obj)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return pickle.loads(data)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, export: Export) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._export = export

    def reducer_override(self, obj: object) -> Any:
        if type(obj) is np.ndarray and obj.nbytes >= THRESHOLD and obj.dtype.kind in "biufc":
            exported = self._export(obj)
            if exported is not None:
                path, removed_by_reader = exported
                return _attach, (path, obj.dtype.str, obj.shape, removed_by_reader)
        return NotImplemented


def write(array: np.ndarray, path: str) -> bool:
    """`array`'s bytes into a new file at `path`; False (and no file) if there is no room."""
    data = np.ascontiguousarray(array)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:  # e.g. out of file descriptors: the pipe will do
        return False
    try:
        os.posix_fallocate(fd, 0, data.nbytes)  # ENOSPC now, rather than SIGBUS on a full tmpfs later
        view = memoryview(data.view(np.uint8).reshape(-1).data)
        written = 0
        while written < data.nbytes:
            written += os.pwrite(fd, view[written:], written)
    except OSError:
        os.close(fd)
        os.unlink(path)
        return False
    os.close(fd)
    return True


_mapped: dict[str, np.ndarray] = {}  # in a worker: the coordinator's files it has mapped


def _attach(path: str, dtype: str, shape: tuple[int, ...], removed_by_reader: bool) -> np.ndarray:
    if not removed_by_reader and path in _mapped:
        return _mapped[path]
    fd = os.open(path, os.O_RDONLY)
    try:
        count = math.prod(shape)
        memory = mmap.mmap(fd, count * np.dtype(dtype).itemsize, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    if removed_by_reader:
        os.unlink(path)  # the mapping outlives the name
    array = np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)  # keeps `memory` alive
    if not removed_by_reader:
        array.flags.writeable = False
        for stale in [p for p in _mapped if not os.path.exists(p)]:  # rounds the coordinator is done with
            del _mapped[stale]
        _mapped[path] = array
    return array


@dataclass
class _Published:
    array: np.ndarray  # held, so that its id is not reused while the file lives
    path: str
    users: int = 0


@dataclass
class Publisher:
    """The coordinator's side: files for the arrays of instructions, shared by every task
    that sends the same array object and removed when the last of them is done."""

    # This process and this publisher: closing one simulation never removes another's files.
    owner: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(4)}")
    _live: dict[int, _Published] = field(default_factory=dict)

    def dumps(self, obj: object, used: list[int]) -> bytes:
        """`obj` pickled; the ids of the published arrays it uses are appended to `used` as
        they are published (for `release`, also when pickling fails half-way)."""

        def export(array: np.ndarray) -> tuple[str, bool] | None:
            if not available():
                return None
            entry = self._live.get(id(array))
            if entry is None:
                path = f"{file_prefix(self.owner)}{next(_counter)}"
                if not write(array, path):
                    return None
                entry = self._live[id(array)] = _Published(array, path)
            entry.users += 1
            used.append(id(array))
            return entry.path, False

        return dumps(obj, export)

    def release(self, used: list[int]) -> None:
        for key in used:
            entry = self._live[key]
            entry.users -= 1
            if entry.users == 0:
                del self._live[key]
                _remove(entry.path)

    def close(self) -> None:
        """Remove every file made for this coordinator, including replies never read."""
        self._live.clear()
        if not available():
            return
        prefix = Path(file_prefix(self.owner))
        for path in prefix.parent.glob(prefix.name + "*"):
            _remove(str(path))


def reply_export(owner: str) -> Export:
    """A worker's side: every large array of a reply into a fresh file the reader removes."""

    def export(array: np.ndarray) -> tuple[str, bool] | None:
        if not available():
            return None
        path = f"{file_prefix(owner)}r{os.getpid()}-{next(_counter)}"
        return (path, True) if write(array, path) else None

    return export


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
