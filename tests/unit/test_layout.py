"""The package's layout: stages whose imports point one way, and local tooling kept apart."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cdc_daemon"

# Each stage may import its own modules and those of lower ranks only (CONTRIBUTING.md):
# cli -> worker -> reconcile / capture -> unit -> ops / warehouse -> sink -> batch / source /
# state -> config -> names / errors. ``local`` (the demo, local services, the emulator) may import
# anything; nothing else imports it.
RANKS = {
    "errors": 0,
    "names": 0,
    "config": 1,
    "logging": 1,
    "extensions": 1,
    "batch": 2,
    "source": 2,
    "state": 2,
    "sink": 3,
    "ops": 4,
    "warehouse": 4,
    "unit": 5,
    "capture": 6,
    "reconcile": 7,
    "worker": 8,
    "cli": 9,
    "__main__": 10,
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module's imports of the package, wherever they stand (module level, inside a
    function, under TYPE_CHECKING): an import hidden in a function body still counts."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "cdc_daemon":
                    found |= {
                        f"cdc_daemon.{a.name}"
                        for a in node.names
                        if (PACKAGE / f"{a.name}.py").exists() or (PACKAGE / a.name).is_dir()
                    }
                elif node.module.startswith("cdc_daemon."):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("cdc_daemon.")}
        graph[name] = {m for m in found if m != name}
    return graph


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_nothing_outside_local_imports_local() -> None:
    """The daemon never imports the local tooling (it finds the demo and the emulator's
    dialect as entry points, ``cdc_daemon.extensions``)."""
    offenders = [
        (module, target)
        for module, targets in _imports().items()
        if _stage(module) != "local"
        for target in targets
        if _stage(target) == "local"
    ]
    assert offenders == []


def test_stages_import_only_lower_stages() -> None:
    """Every import between stages points down the ranks: no stage reaches up, so no two
    stages depend on each other."""
    upward = [
        (module, target)
        for module, targets in _imports().items()
        if _stage(module) not in ("local", "__init__")
        for target in targets
        if _stage(target) != _stage(module)
        and _stage(target) != "__init__"
        and RANKS[_stage(target)] >= RANKS[_stage(module)]
    ]
    assert upward == []


def test_every_stage_has_a_rank() -> None:
    """A new top-level module or package gets a place in the ranks (and in CONTRIBUTING.md)."""
    stages = {_stage(m) for m in _imports()} - {"local", "__init__"}
    assert stages <= set(RANKS), stages - set(RANKS)


def test_no_import_cycle_between_modules() -> None:
    """No module imports itself back through others, not even through a function body."""
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue  # a name imported from a package's __init__, not a module
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_contributing_layout_names_every_module() -> None:
    """CONTRIBUTING.md's layout block names every module of the package under its folder, and
    no module that does not exist: the map a newcomer reads is the tree."""
    import re

    text = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    block = text.split("```\ncdc_daemon/\n", 1)[1].split("\nsnowflake/", 1)[0]
    folder = ""
    documented: set[str] = set()
    for line in block.splitlines():
        if not line.startswith("   "):  # a folder's (or top-level modules') first line
            head = line.split()[0].rstrip(",")
            folder = head if head.endswith("/") else head.rpartition("/")[0] + "/"
            folder = "" if folder == "/" else folder
        documented |= {f"{folder}{name}" for name in re.findall(r"\w+\.py", line)}
    actual = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "capture"
    }
    assert documented == actual
