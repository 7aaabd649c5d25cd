"""The import graph between the project's packages, read from the source with ``ast`` (nothing is imported).

``python tests/test_imports.py`` prints every cross-package import (importing module -> imported module, with a mark
for the ones inside a function) and the rules below; the tests hold the rules:

- each package imports only the packages below it (ALLOWED): the torch-free text side and bank layout, the kernels,
  the core (adapters/), then the stages train -> export; the server takes the torch-free ones only, and imports no
  torch;
- no module imports a ``__main__`` module (command-line entry points are thin; libraries sit beside them);
- no two modules import each other, directly or through others (no import cycles).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "text", "bank", "train", "export", "serve", "kernels", "bench")
ALLOWED = {  # package -> the project packages it may import
    "text": set(),
    "bank": set(),
    "kernels": set(),
    "adapters": {"text", "bank", "kernels"},
    "train": {"adapters", "text"},
    "export": {"train", "adapters", "text", "bank", "kernels"},
    "serve": {"text", "bank"},
    "bench": set(PACKAGES),
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported project module, inside a function) for each import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                if name in known:
                    found.append((name, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, set[tuple[str, bool]]]:
    mods = modules()
    return {name: {(m, inner) for m, inner in imports(path, set(mods)) if m != name} for name, path in mods.items()}


def cycles(edges: dict[str, set[tuple[str, bool]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def package(module: str) -> str:
    return module.split(".")[0]


def test_each_package_imports_only_those_below_it():
    wrong = [(a, b) for a, bs in graph().items() for b, _ in bs if package(b) not in ALLOWED[package(a)] | {package(a)}]
    assert not wrong, f"imports against the layering: {wrong}"


def test_nothing_imports_a_main_module():
    wrong = [(a, b) for a, bs in graph().items() for b, _ in bs if b.endswith(".__main__") or b == "__main__"]
    assert not wrong, f"imports of command-line entry points: {wrong}"


def test_no_import_cycles():
    assert not cycles(graph()), f"modules that import each other: {cycles(graph())}"


def test_the_server_imports_no_torch():
    for path in sorted([*(ROOT / "serve").glob("*.py"), *(ROOT / "text").glob("*.py"), *(ROOT / "bank").glob("*.py")]):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [n for n in names if n.split(".")[0] in ("torch", "transformers", "peft")], path


def main() -> None:
    edges = graph()
    between = defaultdict(list)
    for a, bs in sorted(edges.items()):
        for b, inner in sorted(bs):
            if package(a) != package(b):
                between[(package(a), package(b))].append(f"{a} -> {b}{' (in a function)' if inner else ''}")
    for (pa, pb), lines in sorted(between.items()):
        print(f"{pa} -> {pb}: {len(lines)}")
        for line in lines:
            print(f"    {line}")
    print("cycles:", cycles(edges) or "none")
    print("imports of __main__ modules:", [(a, b) for a, bs in edges.items() for b, _ in bs if b.endswith("__main__")] or "none")


if __name__ == "__main__":
    main()
