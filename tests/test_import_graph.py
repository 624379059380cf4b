"""The package import graph follows the design's arrows, with no cycle, function-level imports included.

design.md: ``cli -> sources -> eval, methods, deploy, train -> models, data, envs -> quant``; ``quant/``
imports only leaf utilities. ``daptq.sources`` names the packages that provide sources by module path and
imports them on first use, so it has no static edge and every layer (evaluation workers) may resolve a spec.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import daptq

ROOT = Path(daptq.__file__).resolve().parent
LAYERS = {
    # entry points
    "cli": 4, "demo": 4, "demo_toy": 4, "__main__": 4, "sweep": 4,
    # what works on models
    "eval": 3, "methods": 3, "deploy": 3, "train": 3,
    # models, suites and their data
    "models": 2, "data": 2, "envs": 2,
    "quant": 1,
}  # fmt: skip
# Importable from anywhere; they import only each other. The root package ``daptq`` (``__version__``) is
# importable too: it loads ``daptq.adapt`` lazily, inside a function (checked below).
LEAVES = {
    *("atomic", "versioned_json", "cameras", "strict_parse", "integrity", "paths", "cli_args", "sources"),
    "lifeline",  # workers import it before anything else: stdlib only
}
# Known edges against the arrows, each with why and what removes it; the test fails when one is no longer
# needed, so the list only shrinks.
KNOWN: dict[tuple[str, str], str] = {}


def _imports(tree: ast.AST, package: str):
    """(imported module, line) for every import statement anywhere in the tree (functions included),
    except under ``if TYPE_CHECKING:``, which never runs."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join([*base, *([node.module] if node.module else [])]), node.lineno
            else:
                yield node.module or "", node.lineno


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "daptq"


def import_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """{(importing unit, imported unit): ["file:line", ...]} between top-level packages/modules of daptq."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts)
        package = module.removesuffix(".__init__") if rel.name == "__init__" else module.rpartition(".")[0]
        module = module.removesuffix(".__init__")
        for name, line in _imports(ast.parse(path.read_text(encoding="utf-8")), package):
            if name == "daptq" or name.startswith("daptq."):
                a, b = _unit(module), _unit(name)
                if a != b:
                    edges[(a, b)].append(f"{path.relative_to(root)}:{line}")
    return dict(edges)


def find_cycle(edges) -> list[str] | None:
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def violations(edges) -> list[str]:
    out = []
    for (a, b), where in sorted(edges.items()):
        if b in LEAVES:
            ok = a in LAYERS or a in LEAVES or a == "daptq"
            if a in LEAVES and b not in LEAVES:
                ok = False
        elif b == "daptq":
            ok = True  # the root package: its only import is lazy (checked in test_root_package_is_lazy)
        elif a in LEAVES:
            ok = False
        elif a == "daptq":
            ok = b == "models"  # daptq.adapt
        else:
            ok = LAYERS[a] >= LAYERS[b]
        if not ok:
            out.append(f"{a} -> {b} ({', '.join(where[:3])})")
    return out


def test_every_top_level_unit_is_placed_in_the_design():
    units = {
        p.stem if p.is_file() else p.name
        for p in ROOT.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    unplaced = sorted(units - set(LAYERS) - LEAVES - {"__init__"})
    assert not unplaced, f"place these in the design's layers (tests/test_import_graph.py): {unplaced}"


def _checked_edges():
    return {e: where for e, where in import_edges().items() if e not in KNOWN}


def test_no_cycle_between_packages():
    cycle = find_cycle(_checked_edges())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_arrows_follow_the_design():
    assert violations(_checked_edges()) == []


def test_known_exceptions_are_still_needed():
    stale = [e for e in KNOWN if e not in import_edges()]
    assert not stale, f"remove from KNOWN in tests/test_import_graph.py: {stale}"


def test_models_imports_neither_deploy_nor_methods_and_quant_only_leaves():
    edges = import_edges()
    assert not [
        e for e in edges if e[0] == "models" and e[1] in ("deploy", "methods", "eval", "train", "cli")
    ]
    assert {b for a, b in edges if a == "quant"} <= LEAVES
    assert {b for a, b in edges if a == "sources"} <= LEAVES


def test_root_package_is_lazy():
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not top, "daptq/__init__.py must not import at module level (import daptq stays side-effect free)"


def test_the_scanner_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "daptq"
    (pkg / "models").mkdir(parents=True)
    (pkg / "methods").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from daptq.methods import x\n")
    (pkg / "methods" / "b.py").write_text("from ..models import a\nfrom typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from daptq.deploy import y\n")  # fmt: skip
    edges = import_edges(pkg)
    assert set(edges) == {("models", "methods"), ("methods", "models")}
    assert find_cycle(edges) in (["methods", "models", "methods"], ["models", "methods", "models"])
    assert violations(edges) == ["models -> methods (models/a.py:2)"]
