"""Imports only go down the layer list of DESIGN.md section 1 (models never import train, ...)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "dreamjax"

# Each layer may import itself and the layers below it.
ORDER = ["cli", "experiment", "eval", "infer", "train", "convert", "parallel", "data", "diffusion", "models"]
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


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreamjax."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dreamjax."):
                    yield a.name.split(".")[1]


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
