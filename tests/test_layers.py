"""The stage packages import only stages below them (design.md: lower layers never import higher
ones), lazy imports inside functions included, and no two modules of sambaflow/ import each other,
directly or round a longer circle (imports under TYPE_CHECKING and inside functions count too: a
circle is a tangle to read even where Python happens to load it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sambaflow"
#: stages in pipeline order; a module may import its own stage and those before it
ORDER = [
    "errors",
    "atomic",
    "logging",
    "tensors",
    "models",
    "optim",
    "trace",
    "passes",
    "backends",
    "pef",
    "runtime",
    "data",
    "app",
]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sambaflow" and parts[1] in ORDER else None


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_no_stage_imports_a_later_stage():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _stage(".".join(relative.parts))
        if own is None:
            continue
        for module in _imports(path):
            other = _stage(module)
            if other is not None and ORDER.index(other) > ORDER.index(own):
                wrong.append(f"{relative} ({own}) imports {module} ({other})")
    assert not wrong, "\n".join(wrong)


def _modules(root: Path) -> dict[str, Path]:
    """Every module under `root` by dotted name (a package by its own name, not `.__init__`)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _module_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` imports; `from pkg import sub` names the submodule."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_circles(root: Path) -> list[list[str]]:
    """Each import circle among the modules under `root`, as a closed path `a, b, ..., a`.

    One circle per back edge of a depth-first search: every tangle shows at least one of its
    loops, and a fixed tangle shows none.
    """
    modules = _modules(root)
    edges = {name: sorted(_module_edges(name, path, modules)) for name, path in modules.items()}
    circles, done = [], set()
    for start in sorted(edges):
        if start not in done:
            _walk(start, edges, [], done, circles)
    return circles


def _walk(name: str, edges: dict[str, list[str]], path: list[str], done: set[str], circles: list) -> None:
    path.append(name)
    for other in edges[name]:
        if other in path:
            circles.append(path[path.index(other) :] + [other])
        elif other not in done:
            _walk(other, edges, path, done, circles)
    path.pop()
    done.add(name)


def test_no_import_circles():
    circles = import_circles(PACKAGE)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in circles)


def test_import_circles_finds_and_names_a_circle(tmp_path):
    """The check itself fails on a circle: a package whose `a` imports `b` (relatively, lazily)
    and whose `b` imports `a` only for type checking."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n"
    )
    (package / "c.py").write_text("import pkg.a\n")
    assert import_circles(package) == [["pkg.a", "pkg.b", "pkg.a"]]
