"""The floor plan holds: imports run one way (no cycle among flashllm's modules), no module grows past
~450 lines, and the layers import only downwards (ARCHITECTURE: cli -> measure -> engine -> sparsity ->
bundle -> sources -> {disk, models, native} -> {units, errors, paths})."""

import ast
from pathlib import Path

import flashllm

PACKAGE = Path(flashllm.__file__).parent
MAX_LINES = 450
# a module may import only from its own layer or the ones after it
LAYERS = [{"cli", "__main__", "render", "api", "serve"}, {"measure"}, {"engine"}, {"sparsity"}, {"bundle"}, {"sources"},
          {"disk", "models", "native", "tokenizer", "corpus", "hub"}, {"units", "errors", "paths", "configs"}]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """flashllm modules that `name` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name and not name.startswith(t + ".")}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(edges):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next((i for i, names in enumerate(LAYERS) if top in names), len(LAYERS))


def test_imports_point_down():
    upward = [(m, t) for m, targets in graph().items() if m.count(".") for t in targets if t.count(".")
              and layer_of(t) < layer_of(m)]
    assert not upward, f"{upward[0][0]} imports {upward[0][1]}, a layer above it"


def test_no_module_over_the_limit():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert max(long.values()) <= MAX_LINES, max(long, key=long.get)
