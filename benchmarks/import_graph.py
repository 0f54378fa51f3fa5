"""Print the package import graph of patchaudit and its cycles (from the source, nothing is imported).

    python benchmarks/import_graph.py              # this checkout
    python benchmarks/import_graph.py --root DIR   # another checkout, e.g. an older commit (git worktree add)
    python benchmarks/import_graph.py --modules    # cycles between modules too
    python benchmarks/import_graph.py --inner      # import statements inside function bodies, per file

A package is a folder of the design (workers, scheduler, store) or of `patchaudit/` (queue, bench, ...);
a module directly in `patchaudit/` (errors, schema) is a package of its own and `patchaudit/__init__.py`
is `api`. Every import counts, those inside functions included; those under `if TYPE_CHECKING:` do not.
Both the installed names (`patchaudit.workers.knn`) and the older top-level ones (`workers.knn`) are read.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

TOP_FOLDERS = ("workers", "scheduler", "store")


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name (installed form, patchaudit.x.y) -> file."""
    out: dict[str, Path] = {}
    for folder in (*TOP_FOLDERS, "patchaudit"):
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join(rel if rel[0] == "patchaudit" else ("patchaudit", *rel))
            out[name] = path
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    return "api" if len(parts) == 1 else parts[1]


def _normalise(name: str) -> str | None:
    if name.split(".")[0] in TOP_FOLDERS:
        return "patchaudit." + name
    return name if name == "patchaudit" or name.startswith("patchaudit.") else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, known: set[str]) -> list[str]:
    """The modules of ours that `module` imports (resolved to the longest known module name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[str] = []

    def resolve(name: str | None) -> None:
        if name is None:
            return
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(_normalise(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{node.module}" if node.module else pkg
            else:
                base = _normalise(node.module or "") or ""
            for alias in node.names:
                resolve(f"{base}.{alias.name}" if base and f"{base}.{alias.name}" in known else base or None)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def inner_imports(path: Path) -> int:
    """Import statements inside function bodies (each counted once, however deeply nested)."""
    lines: set[int] = set()
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update(n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return len(lines)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components with more than one node (or a self-loop) are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to read")
    p.add_argument("--modules", action="store_true", help="also list cycles between modules")
    p.add_argument("--inner", action="store_true", help="also count imports inside function bodies")
    args = p.parse_args(argv)
    files = module_files(args.root)
    if args.inner:
        counts = {path.relative_to(args.root).as_posix(): inner_imports(path) for path in files.values()}
        print(f"imports inside function bodies: {sum(counts.values())}")
        for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if n:
                print(f"  {n:4d} {name}")
    known = set(files)
    mod_graph: dict[str, set[str]] = defaultdict(set)
    edges: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for module, path in files.items():
        for target in imports_of(module, path, known):
            mod_graph[module].add(target)
            a, b = package_of(module), package_of(target)
            if a != b:
                edges[(a, b)].append((module, target))
    pkg_graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        pkg_graph[a].add(b)
    packages = sorted({package_of(m) for m in files})
    print(f"package import graph of {args.root.name}: {len(files)} modules, {len(packages)} packages")
    print("(A -> B: modules of A import modules of B; the count is module pairs)")
    for a in packages:
        targets = ", ".join(f"{b} ({len(set(edges[(a, b)]))})" for b in sorted(pkg_graph.get(a, ())))
        print(f"  {a:<11} -> {targets or '(nothing of ours)'}")
    cycles = strongly_connected(pkg_graph)
    print(f"package cycles: {len(cycles)}")
    for comp in cycles:
        print(f"  cycle: {' <-> '.join(comp)}")
        for a in comp:
            for b in comp:
                for imp, tgt in sorted(set(edges.get((a, b), ()))):
                    print(f"    {imp} -> {tgt}")
    if args.modules:
        mod_cycles = strongly_connected(mod_graph)
        print(f"module cycles: {len(mod_cycles)}")
        for comp in mod_cycles:
            print(f"  cycle: {' <-> '.join(comp)}")
    return 1 if cycles else 0


if __name__ == "__main__":
    raise SystemExit(main())
