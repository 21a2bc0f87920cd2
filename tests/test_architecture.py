"""The shape of the library, checked from its source (no imports, no models: this file runs in
well under a second).

- `ldm/` has no import cycle. Every `import` / `from ... import` of an `ldm` module counts, at
  module level and inside functions alike: a function-level import that closes a cycle is still a
  cycle, only postponed to the first call (that is how export -> models.text -> models.single_file
  -> export used to hide). An import of `ldm.a.b` is an edge to `ldm.a.b` alone, not to its
  parent packages: the package `__init__` files import nothing of ours at module level.
- The models layer (`ldm/models/`) builds from diffusers directories only: it imports neither the
  single-file format (`ldm.export`) nor its import cache (`ldm.single_file`); a stage resolves a
  single file once, at its entry.
- Each stage artifact is read and written by its own module: the pipeline record `ldm.json` is
  named only in `ldm/pipeline.py`; the latent cache's `manifest.json` only in `ldm/data/cache.py`.
- One atomic write: `os.replace` appears only in `ldm/atomic.py`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ldm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ldm modules `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` steps up
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            # `from ldm.data import cache` imports the module ldm.data.cache
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_from_imports():
    graph = import_graph()
    assert "ldm.train.common" in graph["ldm.train.vae"]  # module level
    assert "ldm.infer" in graph["ldm"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ldm_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_layer_does_not_import_single_file_formats():
    graph = import_graph()
    bad = {name: sorted(graph[name] & {"ldm.export", "ldm.single_file"})
           for name in graph if name.startswith("ldm.models")}
    assert not {k: v for k, v in bad.items() if v}, bad


def files_naming(pattern: str) -> set[str]:
    """The ldm modules whose source (code and strings, not comments or docstrings) matches `pattern`."""
    out = set()
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        strings = [n.value for n in ast.walk(tree)
                   if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
        names = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
        if any(re.search(pattern, s) for s in strings + names):
            out.add(name)
    return out


def test_each_artifact_file_is_named_by_its_own_module_only():
    assert files_naming(r"^ldm\.json$|ldm\*\.json") == {"ldm.pipeline"}
    assert files_naming(r"^manifest\.json$") == {"ldm.data.cache"}


def test_one_atomic_write():
    renames = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("replace", "rename")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                renames.add(name)
    assert renames == {"ldm.atomic"}, f"os.replace/os.rename outside ldm/atomic.py: {sorted(renames - {'ldm.atomic'})}"
