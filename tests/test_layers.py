"""The package's layering, as DEVELOPERS.md documents it: a module imports only from its own layer or the layers
below it; the known exceptions are listed (each a lazy import inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trl_ntk"

# top to bottom; a module may import from its own layer and any layer after it
LAYERS = [
    "cli",
    "lookahead",
    "demo",
    "integration",
    "report",
    "output",
    "analysis",
    "probes",
    "config",
    "ntk",
    "_dist",
    "_model",
]
LOWEST = "batches"

# (importing module, imported module): upward imports kept on purpose, each inside a function
EXCEPTIONS = {
    ("trl_ntk.output.wandb_sink", "trl_ntk.report.render"),  # the W&B sink attaches the HTML report at the end
    ("trl_ntk.output.wandb_sink", "trl_ntk.report.attribution"),  # the report's heat map as interactive W&B media
    ("trl_ntk.integration.lookahead", "trl_ntk.demo"),  # `toy_trainer`: a trainer on the toy model
}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else module
    if part == LOWEST:
        return len(LAYERS)
    return LAYERS.index(part) if part in LAYERS else -1  # the package's __init__: above everything


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trl_ntk."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("trl_ntk."))
    return found


def test_every_import_goes_to_the_same_or_a_lower_layer():
    upward = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for imported in _imports(path):
            if _layer(imported) < _layer(module):
                upward.add((module, imported))
    assert upward == EXCEPTIONS
