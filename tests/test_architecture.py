"""The layout's rules (docs/architecture.md), checked on the imports themselves: dependencies point down only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


MODULES = sorted(p for p in PIPELINE.rglob("*.py") if "configs" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PIPELINE)))
def test_nothing_reaches_up(path):
    room = path.relative_to(PIPELINE).parts[0] if len(path.relative_to(PIPELINE).parts) > 1 else ""
    names = imports_of(path)
    assert not any(n == "flows" or n.startswith(("flows.", "prefect")) for n in names), (
        "pipeline never needs Prefect"
    )
    if room == "stages":
        others = {
            n for n in names if n.startswith("pipeline.stages.") and n != f"pipeline.stages.{path.stem}"
        }
        assert not others, f"a stage imports another stage: {others}"
        assert not any(n.startswith("pipeline.config_files") for n in names), (
            "stages get resolved specs from the plan"
        )
    if room in ("models", "data", "science", "report"):
        upward = {n for n in names if n.startswith(("pipeline.stages", "pipeline.plan", "pipeline.jobs"))}
        assert not upward, f"{room}/ imports {upward}"
    if room == "science":
        assert not any(n.startswith("pipeline") for n in names), "science/ is mathematics over arrays, no I/O"


FLOWS = sorted((PIPELINE.parent / "flows").glob("*.py"))


@pytest.mark.parametrize("path", FLOWS, ids=lambda p: p.name)
def test_prefect_is_configured_before_it_is_imported(path):
    """Prefect reads its settings once, at import: a flows module imported first that imports prefect before
    `prefect_env.configure()` would put Prefect's database in the user's home and let it phone home."""
    configured = False
    for node in ast.parse(path.read_text()).body:  # module level only: lazy imports run after configure
        if isinstance(node, ast.Expr) and ast.unparse(node) == "prefect_env.configure()":
            configured = True
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if any(n == "prefect" or n.startswith("prefect.") for n in names):
            assert configured, f"{path.name}: `{ast.unparse(node)}` before prefect_env.configure()"
