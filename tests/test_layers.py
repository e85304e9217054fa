"""The house's layers import one way: no module imports a module of a higher layer."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "divmerge"
# divmerge module (or package) prefix -> layer; a module may import its own layer and those below.
LAYERS = {
    "divmerge.errors": 0,
    "divmerge.disk": 0,
    "divmerge.quiet": 0,
    "divmerge.pids": 0,
    "divmerge.phases": 0,
    "divmerge.hub": 0,
    "divmerge.objectives": 0,
    "divmerge.intervals": 0,
    "divmerge.core": 1,
    "divmerge.static": 2,
    "divmerge.experts": 2,
    "divmerge.data": 2,
    "divmerge.teachers": 2,
    "divmerge.evaluation": 2,
    "divmerge.plots": 2,
    "divmerge.methods": 2,
    "divmerge.families": 3,
    "divmerge.engine": 4,
    "divmerge.export": 4,
    "divmerge.lightning": 5,
    "divmerge.zoo": 6,
}


def layer(module: str) -> int:
    """The layer of a divmerge module: its longest matching prefix in LAYERS."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert matches, f"{module} has no layer: add it to LAYERS"
    return LAYERS[max(matches, key=len)]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "divmerge":
            out.append((name, path))
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("divmerge"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("divmerge")}
    return {name for name in found if any(name == p or name.startswith(p + ".") for p in LAYERS)}


@pytest.mark.parametrize(("name", "path"), modules(), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_run_one_way(name, path):
    upward = sorted(i for i in imports(path) if layer(i) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports higher layers: {upward}"


def test_no_model_family_flag_outside_families():
    """Only families/ may tell model families apart (by name or by causal-LM specifics)."""
    offenders = []
    for name, path in modules():
        if name.startswith(("divmerge.families", "divmerge.export")):
            continue  # export/ holds one writer per family, chosen by the EXPORTERS registry
        text = path.read_text()
        for flag in (".generative", "is_causal_lm", "causal_lm."):
            if flag in text:
                offenders.append(f"{name}: {flag}")
    assert not offenders
