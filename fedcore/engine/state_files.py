"""Files on a run's state directory: atomic replacement, view appends, and the lock that
keeps a second process out (an exclusive `flock` the kernel drops when its holder dies,
kill -9 included, so no stale lock needs cleaning up)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from fedcore.errors import ConfigError


class StateInUse(ConfigError):
    """Another live process holds the state directory (two writers would interleave rounds)."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | list[bytes | memoryview], *, durable: bool = True) -> None:
    """Replace `path` with `data` (or its pieces, one after another) so that a crash leaves
    the old file or the new, never a mix. `durable`: also fsync, so that the new file survives
    a power cut (the views need not: the store rebuilds them when it opens)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in [data] if isinstance(data, bytes) else data:
                f.write(piece)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def append_lines(path: Path, lines: list[str]) -> None:
    """Append to a view. Not fsync'd: the rounds are durable in run.db, and a view that lost
    its last lines in a power cut is rebuilt from it when the store opens."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def lock(directory: Path) -> int:
    """Take `run.lock` without waiting and write our pid into it; StateInUse if it is held."""
    path = directory / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = path.read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        raise StateInUse(
            f"state directory {directory} is in use by another fedcore process (pid {pid})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
