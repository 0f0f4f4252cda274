"""Tasks from outside fedcore: installed packages that declare them under the entry-point
group `fedcore.tasks` (what a site runs: a vetted package it installed; no code travels
over the network), or, for development, `package.module:attr`.

An entry point or attribute may be a `TaskDefinition`, a `Task` subclass, or a factory
`(argument, model) -> Task`. Each task is identified by its package's name and version and
a SHA-256 over the package's files (`fedcore tasks` lists them), so that a site can
approve exactly the code it runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fedcore.tasks.base import Task
from fedcore.tasks.definition import TaskDefinition

GROUP = "fedcore.tasks"
TaskFactory = Callable[[str, str | None], Task]
_MODULE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True)
class TaskSource:
    """Where a task's code comes from: what a site approves."""

    name: str
    origin: str  # "built-in", "entry point" or "module"
    package: str  # the distribution (or module) that holds the code
    version: str
    code_hash: str  # SHA-256 over the package's files


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def is_module_path(name: str) -> bool:
    """`package.module:attr`, the development form of a task name (checked after the
    built-in and installed names, so `synthetic:1,1` stays a task with an argument)."""
    module, sep, attr = name.partition(":")
    return bool(sep) and bool(_MODULE_PATH.match(module)) and attr.isidentifier()


def plugin_factory(name: str) -> TaskFactory | None:
    """The factory of an installed (entry point) or module-path task, None if neither."""
    base = name.partition(":")[0]
    if (ep := entry_points().get(base)) is not None:
        return _factory(ep.load(), name)
    if is_module_path(name):
        module, _, attr = name.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"task {name!r}: cannot load {attr} from {module} ({err})") from None
        return _factory(target, name)
    return None


def _factory(target: Any, name: str) -> TaskFactory:
    if isinstance(target, TaskDefinition):
        return lambda arg, model: target.build(model)
    if inspect.isclass(target) and issubclass(target, Task):
        return lambda arg, model: target(model)
    if callable(target):
        factory: TaskFactory = target
        return factory
    raise ValueError(f"task {name!r} is a {type(target).__name__}, not a TaskDefinition, Task or factory")


def plugin_source(name: str) -> TaskSource:
    """Where the code of a plug-in task (entry point or `package.module:attr`) comes from."""
    base = name.partition(":")[0]
    if (ep := entry_points().get(base)) is not None:
        dist = ep.dist
        module = importlib.import_module(ep.module)
        return TaskSource(
            base,
            "entry point",
            dist.name if dist else ep.module,
            dist.version if dist else "0",
            code_hash(module),
        )
    if is_module_path(name):
        return module_source(name, name.partition(":")[0], "module")
    raise ValueError(f"no task {name!r}")


def module_source(name: str, module_name: str, origin: str) -> TaskSource:
    """A task whose code is the top-level package of `module_name` (imported to find it)."""
    module = importlib.import_module(module_name)
    return TaskSource(name, origin, module.__name__.partition(".")[0], _version(module), code_hash(module))


def code_hash(module: ModuleType) -> str:
    """SHA-256 over every file of the top-level package holding `module` (its code, compiled
    extensions, data files and samples; not the interpreter's `__pycache__`), in path order,
    each file's relative path then its bytes: any change to what the task runs changes it."""
    top = importlib.import_module(module.__name__.partition(".")[0])
    files = [Path(top.__file__)] if top.__file__ else []
    if hasattr(top, "__path__"):
        files = sorted(
            p
            for root in top.__path__
            for p in Path(root).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )
        roots = [Path(r) for r in top.__path__]
    else:
        roots = [files[0].parent] if files else []
    h = hashlib.sha256()
    for path in files:
        rel = next((path.relative_to(r) for r in roots if path.is_relative_to(r)), path.name)
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:  # in pieces: a package may ship large weights
            while piece := f.read(1 << 20):
                h.update(piece)
    return h.hexdigest()


def _version(module: ModuleType) -> str:
    top = module.__name__.partition(".")[0]
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "0"))
