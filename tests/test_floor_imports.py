"""The floors hold, read statically from the sources (no interpreter started): every floor imports only what
design.md's floor table lets it (the `tools` wing only from the CLI), the `openai` floor imports nothing
of MatrixStack above `matrixstack.errors`, the portal imports nothing of the engine, and nothing the portal or the
`openai` floor imports at module level pulls in torch (torch alone is ~200k objects, which every full garbage
collection of the portal process would then walk)."""

from __future__ import annotations

import ast
from pathlib import Path

import matrixstack

ROOT = Path(matrixstack.__file__).parent


def _module_path(name: str) -> Path | None:
    """Return the source file of the matrixstack module `name`, None when it is not one."""
    parts = name.split(".")
    if parts[0] != "matrixstack":
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_level_imports(name: str) -> set[str]:
    """Return the modules `name` imports when it is imported (not those imported inside its functions), with the
    packages each runs on the way."""
    path = _module_path(name)
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, ast.ClassDef | ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    packages = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return {m for m in found | packages if not m.startswith("matrixstack") or _module_path(m) is not None}


def _reachable(start: list[str]) -> set[str]:
    """Return every module importing `start` imports, following MatrixStack's own modules."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if _module_path(name) is not None:
            todo.extend(_module_level_imports(name))
    return seen


def _modules(package: str) -> list[str]:
    return [
        f"matrixstack.{package}." + ".".join(p.relative_to(ROOT / package).with_suffix("").parts)
        for p in sorted((ROOT / package).rglob("*.py"))
    ]


def test_the_openai_floor_imports_nothing_above_it():
    for name in _modules("openai"):
        ours = {m for m in _module_level_imports(name) if m.startswith("matrixstack")}
        above = {
            m for m in ours if m != "matrixstack" and not m.startswith(("matrixstack.openai", "matrixstack.errors"))
        }
        assert not above, f"{name} imports {sorted(above)}"


def test_the_portal_imports_nothing_of_the_engine():
    for name in _modules("portal"):
        engine = {m for m in _module_level_imports(name) if m.startswith("matrixstack.engine")}
        assert not engine, f"{name} imports {sorted(engine)}"


def test_the_portal_and_the_protocol_do_not_pull_torch():
    reached = _reachable(
        ["matrixstack.portal.app", "matrixstack.portal.server", "matrixstack.engine", *_modules("openai")]
    )
    assert "matrixstack.portal.app" in reached and "matrixstack.openai.client" in reached  # the walk went somewhere
    assert not {m for m in reached if m == "torch" or m.startswith("torch.")}


def test_the_engine_entry_point_imports_no_torch_before_binding_its_cores():
    """`python -m matrixstack.engine.launch` sets its CPU affinity before importing the runtime: torch sizes its
    thread pool from the affinity it finds at import, so nothing the entry point imports at module level may pull
    torch in."""
    reached = _reachable(["matrixstack.engine", "matrixstack.engine.launch"])  # the package runs first
    assert "matrixstack.specio" in reached and "matrixstack.arch.registry" in reached  # the walk went somewhere
    assert not {m for m in reached if m == "torch" or m.startswith("torch.")}


def test_the_walk_sees_torch_where_it_is():
    assert "torch" in _reachable(["matrixstack.engine.server"])


# What each floor may import (design.md's "depends on" column), besides the base modules every floor shares.
# `tools` is the wing at the top (drawing, benchmarks, calibration): only the CLI imports it.
BASE = {
    "errors",
    "specio",
    "paths",
    "datakey",
    "units",
    "dtypes",
    "procs",
    "data",
}  # data: packaged CSV tables, no code
MAY_IMPORT = {
    "fabric": set(),
    "arch": set(),
    "matrix": {"fabric"},
    "perf": {"fabric", "arch"},
    "openai": set(),
    "engine": {"arch", "perf", "openai"},
    "lanes": {"perf", "openai"},
    "portal": {"matrix", "perf", "openai"},
    "adapt": {"matrix", "engine"},
    "stack": {"fabric", "arch", "matrix", "perf", "openai", "engine", "lanes", "portal"},
    "tools": {"fabric", "arch", "matrix", "perf", "engine"},
}


def _every_import(path: Path) -> set[str]:
    """Return the matrixstack floors (top-level packages or base modules) a source file imports anywhere in it."""
    floors = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        floors.update(n.split(".")[1] for n in names if n.startswith("matrixstack."))
    return floors


def test_no_floor_imports_a_floor_it_may_not():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert set(MAY_IMPORT) | {"cli", "data"} == packages, "a new package needs its row in MAY_IMPORT (and in design.md)"
    wrong = []
    for floor, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT / floor).rglob("*.py")):
            above = _every_import(path) - allowed - BASE - {floor}
            wrong += [f"{path.relative_to(ROOT)} imports matrixstack.{name}" for name in sorted(above)]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    source = tmp_path / "upward.py"
    source.write_text("def f():\n    from matrixstack.portal.app import create_portal_app\n")
    assert _every_import(source) == {"portal"}
