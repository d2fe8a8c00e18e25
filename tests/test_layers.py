"""The stage packages import only stages below them (design.md: lower layers never import higher
ones), lazy imports inside functions included."""

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
