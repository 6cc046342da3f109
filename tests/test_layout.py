"""The layering rules of the package, read from the source: no import circle, arrows one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        parts = ("rho_fused", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every rho_fused module ``path`` imports, at any depth of the file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("rho_fused")}


def _graph() -> dict[str, set[str]]:
    files = [*(ROOT / "rho_fused").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
    modules = {_module_name(f): f for f in files}
    return {name: {m for m in _imports(f, name) if m in modules and m != name} for name, f in modules.items()}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    # a package imports its submodules by design (``from . import chunked``): not a circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_kernels_know_only_triton_and_torch():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("rho_fused.kernels"):
            outside = {d for d in deps if not d.startswith("rho_fused.kernels")}
            assert not outside, f"{name} imports {outside}: kernels/ must not reach into the package"
