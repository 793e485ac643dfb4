"""The house's import rule, checked on the source: packages import downward only
(data -> models -> quant -> integer -> attacks / defenses / certify -> eval -> report -> cli)
and no module imports itself back through others. Function-level imports count too: they
hide a dependency, they do not remove it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "qrobust"

# a package may import packages of its own rank or lower (same rank: siblings, no cycle)
RANK = {
    "errors": 0, "registry": 0, "progress": 0, "hardware": 0, "provenance": 0,
    "data": 1, "models": 2, "checkpoint": 3, "train": 3, "quant": 4, "integer": 5,
    "attacks": 6, "defenses": 6, "certify": 6, "config": 7, "eval": 8, "report": 9, "cli": 10,
    "verify": 6,
}


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(("qrobust", *f.relative_to(SRC).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported qrobust module: first line}. ``from pkg import sub`` counts as an
    import of ``pkg.sub`` alone when every name is a submodule."""
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qrobust"):
                subs = [f"{node.module}.{a.name}" for a in node.names
                        if f"{node.module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("qrobust.")]
            for t in targets:
                if t in mods and t != name:
                    graph[name].setdefault(t, node.lineno)
    return graph


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qrobust"


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on, found = [], set(), []
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_every_package_has_a_rank():
    packages = {package(m) for m in modules()} - {"qrobust"}
    assert packages <= RANK.keys(), f"give these packages a rank: {sorted(packages - RANK.keys())}"


def test_packages_import_downward_only():
    mods = modules()
    upward = []
    for src, targets in imports(mods).items():
        for tgt, line in targets.items():
            a, b = package(src), package(tgt)
            if a != "qrobust" and b != "qrobust" and RANK[b] > RANK[a]:
                upward.append(f"{mods[src].relative_to(SRC)}:{line} ({a} imports {b})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules_or_packages():
    graph = imports(modules())
    assert cycles(graph) == []
    packages: dict[str, dict[str, int]] = defaultdict(dict)
    for src, targets in graph.items():
        for tgt in targets:
            if package(src) != package(tgt):
                packages[package(src)][package(tgt)] = 0
    assert cycles(packages) == []


def test_the_checker_finds_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert RANK["quant"] > RANK["models"] and package("qrobust.quant.modules") == "quant"
