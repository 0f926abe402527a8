"""Imports only go down the layer list of DESIGN.md section 1 (models never import train, nothing below the
run assembly imports it, ...), and no module of dreamjax/ imports itself in a circle."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "dreamjax"

# Each layer may import itself and the layers below it. `run` is the run assembly (config or workdir -> a
# ready run): above everything it assembles, below every command that uses it.
ORDER = ["cli", "eval", "infer", "train", "run", "convert", "parallel", "data", "diffusion", "models", "runtime"]
# Siblings that must not import each other although both sit above `parallel`/`models`.
FORBIDDEN = {
    "infer": {"train"},
    "train": {"infer"},
    "data": {"models", "diffusion"},  # data needs only the tokenizer and layout constants
    "convert": {"train", "infer", "data", "eval"},
}


def _layer(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imported_modules(path: pathlib.Path):
    """Every dreamjax module `path` imports, at module level or inside a function (a local import still
    closes a circle)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreamjax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in MODULES else node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dreamjax"):
                    yield alias.name


def _imports(path: pathlib.Path):
    for module in _imported_modules(path):
        parts = module.split(".")
        if len(parts) > 1:
            yield parts[1]


FILES = sorted(p for p in PKG.rglob("*.py") if _layer(p) in ORDER)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down(path):
    me = _layer(path)
    for target in _imports(path):
        if target not in ORDER:
            continue
        assert ORDER.index(target) >= ORDER.index(me) or target == me, f"{me} imports {target} (upward)"
        assert target not in FORBIDDEN.get(me, set()), f"{me} must not import {target}"


def test_every_module_is_in_a_layer():
    unknown = {_layer(p) for p in PKG.rglob("*.py")} - set(ORDER) - {"__init__"}
    assert not unknown, f"modules outside the layer list: {unknown}"


def test_nothing_below_the_run_assembly_imports_it():
    below = ORDER[ORDER.index("run") + 1 :]
    offenders = [str(p.relative_to(PKG)) for p in FILES if _layer(p) in below and "run" in set(_imports(p))]
    assert not offenders, f"modules below dreamjax/run import it: {offenders}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = {name: {m for m in _imported_modules(path) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
