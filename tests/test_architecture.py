"""The layering the design promises, enforced: dependencies point downward only, the engine
drives stages without looking inside them, no module imports another in a cycle, and no
module outgrows a concept."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedcore"

# Top to bottom: a package may import from its own layer's modules and from any layer below.
LAYERS = [
    {"cli", "__main__", "__init__", "task_packages", "lifecycle", "privacy_audit", "run_status"},
    {"server", "client", "simulation", "tracking", "site_status"},
    {"wire"},
    {"engine"},
    {"aggregation"},
    {"secagg", "tasks"},
    {"privacy"},  # DP-SGD, accountants, the site's policy and ledger
    {"strategies"},
    {"pki", "config", "seeding", "audit"},
    {"privacy_config"},  # the [privacy] table, which config re-exports
    {"certificates"},  # keys, certificates and CRLs: what pki and the server both build on
    {"tensors", "tasks.partition", "typed_toml"},  # tasks.partition is pure numpy: config validates with it
    {"proto", "errors"},
]
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "proto/v1" in path.as_posix():
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every fedcore module `path` imports, at module level or inside a function, with
    TYPE_CHECKING imports included: a cycle hidden in a function is still a cycle."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            submodules = {f"{base}.{a.name}" for a in node.names} & set(modules())
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in `base` itself
                found.add(base)
    known = modules()
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    return {name: imports(path, name) for name, path in modules().items()}


def layer(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    for key in (".".join(parts[:2]), parts[0]):  # a module listed by name, else its package
        for depth, members in enumerate(LAYERS):
            if key in members:
                return depth
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_dependencies_point_downward() -> None:
    wrong = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        if m != "fedcore"
        for d in deps
        if d != "fedcore" and layer(d) < layer(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_engine_drives_stages_it_does_not_look_inside() -> None:
    for m, deps in graph().items():
        if m.startswith("fedcore.engine"):
            bad = {d for d in deps if d.startswith(("fedcore.privacy", "fedcore.secagg"))}
            assert not bad, f"{m} imports {bad}"
    for path in (PACKAGE / "engine").rglob("*.py"):
        assert "PrivacyMode" not in path.read_text(), path


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d == "fedcore":  # the top-level package re-exports the public API
                continue
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_modules_are_sized_by_concept() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
