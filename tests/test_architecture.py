"""The layout shows the architecture: imports run one way, from the CLI down to the core engine, with no circle."""
from __future__ import annotations

import ast
from pathlib import Path

import sds_cli

PACKAGE = Path(sds_cli.__file__).parent
# Each layer may import from its own layer and the ones below it, never from above.
LAYERS = [
    {"errors", "sparsity", "paths", "atomic", "console"},
    {"models", "data"},
    {"engine"},
    {"pruners"},
    {"stages", "eval", "results"},
    {"pipeline", "report", "bench", "launch"},
    {"cli", "api", "data_fetch"},
]


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Every sds_cli module and the sds_cli modules it imports, lazy (function-level) imports included."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        edges = graph.setdefault(_module(path), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sds_cli":
                assert node.level == 0, f"{path}: relative import"
                edges.update([node.module] if node.module != "sds_cli" else
                             [f"sds_cli.{a.name}" for a in node.names if (PACKAGE / a.name).exists()
                              or (PACKAGE / f"{a.name}.py").exists()])
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "sds_cli")
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    found = [i for i, names in enumerate(LAYERS) if top in names]
    assert found, f"{module} belongs to no layer: add its top-level name to LAYERS"
    return found[0]


def test_imports_run_one_way():
    graph = _imports()
    upward = [f"{m} -> {t}" for m, targets in graph.items() if m != "sds_cli" for t in targets
              if t != "sds_cli" and _layer(t) > _layer(m)]
    assert not upward, "imports from a higher layer: " + "; ".join(sorted(upward))


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if t == m or t == "sds_cli" or t.startswith(m + "."):
                continue  # a package importing its own modules to register them is not a circle
            assert state.get(t) != 1, "import circle: " + " -> ".join([*path, m, t])
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
