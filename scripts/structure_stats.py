"""Structure statistics of a Python package, as a markdown table (stdlib only).

    python scripts/structure_stats.py backend [other/backend ...] [--list]

One column per package directory: module count, the largest module and class, function length
median and p90, import cycles and upward imports. Imports are read with `ast`, so nothing is
imported; relative imports are resolved, `from . import x` to the module x where x is one.

- Cycles: strongly connected components (more than one module) of the package's own import
  graph, once with every import and once with module-level imports only (leaving out imports
  inside functions and under `if TYPE_CHECKING:`).
- Upward imports: module pairs where a module imports one of a higher layer (LAYERS, for the
  old flat layout and the subpackages alike), or crosses between independent siblings.
- Function length: from the `def` line to its last line, for every function and method.
`--list` prints the cycles and the upward imports after the table.
"""

from __future__ import annotations

import ast
import math
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The layers, top to bottom, as the [tool.importlinter] "layers" contract orders them. A layer is
# one or more independent groups of module names relative to the package (the longest matching
# prefix wins). Old flat names sit in the layer their module moved to (the layout-move commit).
LAYER_ORDER: list[list[tuple[str, ...]]] = [
    [("__main__",)],
    [("cli",)],
    [("doctor",)],
    [("web", "server", "middleware")],
    [("model",)],
    [("runtime",)],
    [("jobs", "prelabel", "worker")],
    [("review", "selection")],
    [("predict", "predictions")],
    [("adapt", "adaptation", "calibration", "training", "head_registry", "report")],
    [("corrections", "feedback", "export", "store.journal", "store.dead_letters")],
    [
        ("zeroshot", "encoder", "batching", "prompts", "text_embeddings", "scoring", "uncertainty"),
        ("images", "decode"),
    ],
    [("labelstudio", "labels", "version_sync")],
    [("store",)],
    [("logs", "netguard", "metrics", "formats")],
    [("config",)],
    [("errors",)],
]
# Name → (rank, group): higher ranks are higher layers.
LAYERS: dict[str, tuple[int, int]] = {
    name: (len(LAYER_ORDER) - depth, group)
    for depth, groups in enumerate(LAYER_ORDER)
    for group, names in enumerate(groups)
    for name in names
}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    imports_all: set[str] = field(default_factory=set)
    imports_top: set[str] = field(default_factory=set)


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load(root: Path) -> dict[str, Module]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = module_name(root, path)
        modules[name] = Module(name, path, ast.parse(text, str(path)), len(text.splitlines()))
    return modules


def package_of(module: Module) -> str:
    is_package = module.path.name == "__init__.py"
    return module.name if is_package else module.name.rpartition(".")[0]


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk_imports(node: ast.AST, deferred: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Each import statement, and whether it is deferred (in a function or TYPE_CHECKING)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, deferred
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from walk_imports(child, True)
        elif isinstance(child, ast.If) and is_type_checking(child.test):
            for stmt in child.body:
                yield from walk_imports(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from walk_imports(ast.Module(body=[stmt], type_ignores=[]), deferred)
        else:
            yield from walk_imports(child, deferred)


def targets(stmt: ast.stmt, module: Module, known: dict[str, Module]) -> set[str]:
    """The package's own modules an import statement names."""
    if isinstance(stmt, ast.Import):
        return {nearest(alias.name, known) for alias in stmt.names} - {""}
    assert isinstance(stmt, ast.ImportFrom)
    if stmt.level:
        base = package_of(module).split(".")
        base = base[: len(base) - stmt.level + 1]
        source = ".".join(base + ([stmt.module] if stmt.module else []))
    else:
        source = stmt.module or ""
    found = set()
    for alias in stmt.names:
        submodule = f"{source}.{alias.name}"
        found.add(submodule if submodule in known else nearest(source, known))
    return found - {""}


def nearest(name: str, known: dict[str, Module]) -> str:
    """The module itself, or its nearest package that is one of ours ("" if none)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def resolve(modules: dict[str, Module]) -> None:
    for module in modules.values():
        for stmt, deferred in walk_imports(module.tree):
            found = targets(stmt, module, modules) - {module.name}
            module.imports_all |= found
            if not deferred:
                module.imports_top |= found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer(name: str) -> tuple[int, int] | None:
    relative = name.partition(".")[2]
    prefix = relative
    while prefix:
        if prefix in LAYERS:
            return LAYERS[prefix]
        prefix = prefix.rpartition(".")[0]
    return None


def upward(modules: dict[str, Module], top_only: bool) -> list[tuple[str, str]]:
    found = []
    for module in modules.values():
        mine = layer(module.name)
        imports = module.imports_top if top_only else module.imports_all
        for target in sorted(imports):
            theirs = layer(target)
            if mine is None or theirs is None:
                continue
            across = mine[0] == theirs[0] and mine[1] != theirs[1]
            if theirs[0] > mine[0] or across:
                found.append((module.name, target))
    return sorted(found)


def functions(modules: dict[str, Module]) -> list[int]:
    return [
        (node.end_lineno or node.lineno) - node.lineno + 1
        for module in modules.values()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def largest_class(modules: dict[str, Module]) -> tuple[int, int, str]:
    classes = [
        (
            (node.end_lineno or node.lineno) - node.lineno + 1,
            sum(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in node.body),
            f"{module.name}.{node.name}",
        )
        for module in modules.values()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.ClassDef)
    ]
    return max(classes)


def p90(values: list[int]) -> int:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def describe_cycles(found: list[list[str]]) -> str:
    if not found:
        return "0"
    return f"{len(found)} ({', '.join(str(len(c)) for c in found)} modules)"


@dataclass
class Stats:
    rows: dict[str, str]
    cycles_all: list[list[str]]
    upward_all: list[tuple[str, str]]


def stats(root: Path) -> Stats:
    modules = load(root)
    resolve(modules)
    lengths = functions(modules)
    biggest = max(modules.values(), key=lambda m: m.lines)
    class_lines, methods, class_name = largest_class(modules)
    all_cycles = cycles({m.name: m.imports_all for m in modules.values()})
    top_cycles = cycles({m.name: m.imports_top for m in modules.values()})
    up_all, up_top = upward(modules, False), upward(modules, True)
    rows = {
        "modules (.py files)": str(len(modules)),
        "largest module": f"{biggest.name} ({biggest.lines} lines)",
        "largest class": f"{class_name} ({class_lines} lines, {methods} methods)",
        "functions": str(len(lengths)),
        "function length median / p90": f"{statistics.median(lengths):g} / {p90(lengths)}",
        "import cycles, all imports": describe_cycles(all_cycles),
        "import cycles, module-level only": describe_cycles(top_cycles),
        "upward imports, all imports": str(len(up_all)),
        "upward imports, module-level only": str(len(up_top)),
    }
    return Stats(rows, all_cycles, up_all)


def main(argv: list[str]) -> int:
    listing = "--list" in argv
    roots = [Path(a) for a in argv if a != "--list"]
    if not roots:
        print(__doc__, file=sys.stderr)
        return 2
    results = [stats(root) for root in roots]
    print("| | " + " | ".join(str(root) for root in roots) + " |")
    print("|---" * (len(roots) + 1) + "|")
    for key in results[0].rows:
        print(f"| {key} | " + " | ".join(r.rows[key] for r in results) + " |")
    if listing:
        for root, result in zip(roots, results):
            print(f"\n{root}:")
            for component in result.cycles_all:
                print("  cycle: " + " <-> ".join(component))
            for importer, imported in result.upward_all:
                print(f"  upward: {importer} -> {imported}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
