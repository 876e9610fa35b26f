"""The package's own import graph (issue 23): no cycle among module-level imports, and the CLI's `--version`
and `--help` load no torch. The graph is read from the source (ast), so nothing here imports the modules;
modules loaded by name (importlib.import_module: editrt's lazy attributes, the CLI's lazy commands) are not
edges, which is what lets the CLI name `bench`, `doctor` and `serve` without depending on them."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import editrt

ROOT = Path(editrt.__file__).resolve().parent  # editrt/; its sub-packages are links to the top-level folders
SKIP = {"__pycache__", "assets", "configs", "static", "results", "csrc"}

# Cycles among module-level imports that are known and owned elsewhere, each a sorted tuple of module names.
# Empty: every module-level cycle fails the test.
KNOWN_MODULE_LEVEL_CYCLES: set[tuple[str, ...]] = set()
# Cycles counting function-level imports too (a lazy import inside a function still ties two modules together).
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def package_modules() -> dict[str, Path]:
    """module name -> file, for every module of editrt (following the sub-package links)."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith("."))
        rel = Path(folder).relative_to(ROOT)
        package = ".".join(("editrt", *rel.parts))
        for f in files:
            if f.endswith(".py"):
                name = package if f == "__init__.py" else f"{package}.{f[:-3]}"
                modules[name] = Path(folder) / f
        if rel.parts:
            modules.setdefault(package, Path(folder))  # a namespace package (no __init__.py) is a node too
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules) -> tuple[set[str], set[str]]:
    """(module-level, function-level) editrt modules that `name` imports. `from pkg import x` counts as an
    import of pkg.x where that is a module. Imports under `if TYPE_CHECKING:` never run and are skipped."""
    if path.is_dir():
        return set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, inner = set(), set()

    def resolve(module: str, level: int) -> str:
        if level:
            base = package.split(".")
            base = base[:len(base) - (level - 1)]
            return ".".join(base + ([module] if module else []))
        return module

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child.module or "", child.level)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for t in targets:
                # `import editrt.a.b` binds the deepest module of ours that exists
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t.startswith("editrt") and t != name:
                    (inner if in_function else top).add(t)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return top, inner


def import_graph():
    modules = package_modules()
    top, inner = {}, {}
    for name, path in modules.items():
        top[name], inner[name] = imports_of(name, path, modules)
    return top, inner


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(tuple(sorted(component)))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_walk_sees_the_package():
    """The walk finds modules in every sub-package, and both kinds of import (guards the walk itself)."""
    top, inner = import_graph()
    for package in ("editrt.cli", "editrt.runtime.reposition", "editrt.export.specs", "editrt.kernels.slic",
                    "editrt.models.common", "editrt.bench.cli", "editrt.runtime.server.app"):
        assert package in top
    assert "editrt.errors" in top["editrt.models.common"]  # module-level
    assert "editrt.runtime.reposition" in inner["editrt.cli"]  # function-level


def test_no_cycle_among_module_level_imports():
    top, _ = import_graph()
    found = set(cycles(top))
    assert found <= KNOWN_MODULE_LEVEL_CYCLES, f"import cycles: {sorted(found - KNOWN_MODULE_LEVEL_CYCLES)}"


def test_no_cycle_among_all_imports():
    top, inner = import_graph()
    found = set(cycles({name: top[name] | inner[name] for name in top}))
    assert found <= KNOWN_CYCLES, f"import cycles (function-level imports included): {sorted(found - KNOWN_CYCLES)}"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [("a", "b", "c")]


def test_cli_does_not_import_bench_and_bench_does_not_import_cli_at_module_level():
    """editrt/cli.py <-> bench/cli.py was a cycle (issue 23): the CLI loads `bench` by name when it runs."""
    top, inner = import_graph()
    assert "editrt.bench.cli" not in top["editrt.cli"] | inner["editrt.cli"]


def _modules_loaded_by(args: list[str]) -> set[str]:
    code = ("import sys\nfrom editrt.cli import main\nrc = main(sys.argv[1:])\n"
            "print(' '.join(sorted(sys.modules)))\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split("\n")[-2].split())


def test_version_and_help_import_no_torch():
    for args in (["--version"], ["--help"]):
        loaded = _modules_loaded_by(args)
        assert "editrt.cli" in loaded
        assert "torch" not in loaded, f"editrt {args[0]} imports torch"
