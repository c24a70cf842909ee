"""House rules, read from the source with `ast` (nothing is imported): no import circles in nanomoe_fn,
tests never import bench/, files stay short, and the layers below nanomoe_fn never reach up into it.

Which imports count for the circle check: those that run when a module is imported, i.e. every import
statement outside a function body (module level, and inside module-level `if`/`try`/`class` blocks).
Imports inside functions run at call time, after every module has loaded, so they cannot form an
import circle and are left out (comm/base.py's lazy `from nanomoe_fn.comm import COMM_BACKENDS` is one).
`from a.b import c` is an edge to the module a.b.c when that file exists, else to a.b. Importing a.b.c
also runs the `__init__` of its packages first, so each enclosing package (a.b) is an edge too, except
the packages that hold the importing module itself (their `__init__` is already running or done).
For the other rules (bench, kernels, reference) every import counts, wherever it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 320  # the house rule is ~300 lines a file


def module_name(path: Path, root: Path) -> str:
    """'nanomoe_fn/comm/base.py' -> 'nanomoe_fn.comm.base'; a package's __init__.py is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, module: str, is_package: bool, top_level_only: bool) -> list[str]:
    """Dotted names a module imports (`from a import b` gives a.b and a; the caller keeps what exists);
    with top_level_only, imports inside function bodies are skipped."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                found.append(base)
                found.extend(f"{base}.{alias.name}" for alias in child.names if alias.name != "*")
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: modules of `package` it imports at import time} over every .py file of the package."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        own = mod if is_pkg else mod.rpartition(".")[0]  # the package this module lives in
        edges = set()
        for name in imports(ast.parse(path.read_text(), str(path)), mod, is_pkg, top_level_only=True):
            if name not in files:  # `from a.b import c` where c is a name, not a module, or outside the package
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the module, and the packages whose __init__ run first...
                target = ".".join(parts[:i])
                if target in files and not (own == target or own.startswith(target + ".")):  # ...unless ours
                    edges.add(target)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def offending_imports(root: Path, folder: str, banned: tuple[str, ...]) -> list[str]:
    """'file:line imports name' for every import (anywhere in the file) of a banned package or module
    (a dotted name: `nanomoe_fn.moe` bans nanomoe_fn.moe and everything under it)."""
    bad = []
    for path in sorted((root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(root)}:{node.lineno} imports {n}" for n in names
                    if any(n == b or n.startswith(b + ".") for b in banned)]
    return bad


def long_files(root: Path, folders: tuple[str, ...], limit: int) -> list[str]:
    """'file: N lines' for every .py file under the folders with more than `limit` lines."""
    out = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > limit:
                out.append(f"{path.relative_to(root)}: {n} lines")
    return out


# ---- the rules, on this repository --------------------------------------------------------------------------

def test_no_import_circles_in_nanomoe_fn():
    graph = import_graph(ROOT, "nanomoe_fn")
    assert len(graph) > 20 and "nanomoe_fn.moe.layer" in graph  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_tests_never_import_bench():
    bad = offending_imports(ROOT, "tests", ("bench",))
    assert not bad, "tests import bench/ (run a bench as a subprocess instead):\n" + "\n".join(bad)


def test_files_stay_short():
    bad = long_files(ROOT, ("nanomoe_fn", "kernels", "reference"), MAX_LINES)
    assert not bad, f"files over {MAX_LINES} lines (split them):\n" + "\n".join(bad)


@pytest.mark.parametrize("folder, banned", [("kernels", ("nanomoe_fn",)), ("reference", ("nanomoe_fn", "kernels"))])
def test_lower_layers_do_not_reach_up(folder, banned):
    bad = offending_imports(ROOT, folder, banned)
    assert not bad, f"{folder}/ must import nothing from {banned}:\n" + "\n".join(bad)


def test_comm_and_eplb_import_records_never_a_stage():
    """comm/ and eplb/ take records (batch.py, Placement) and give records: no stage of moe/ or attention/."""
    bad = [b for folder in ("nanomoe_fn/comm", "nanomoe_fn/eplb")
           for b in offending_imports(ROOT, folder, ("nanomoe_fn.moe", "nanomoe_fn.attention"))]
    assert not bad, "a comm or EPLB module imports a stage:\n" + "\n".join(bad)


# ---- the checkers catch what they are for (a made-up tree with every violation) --------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checkers_find_violations(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        "pkg/b.py": "import os\n\ndef f():\n    from pkg import c  # deferred: not an edge\n",
        "pkg/c.py": "from . import a\n",                      # relative import: c -> a
        "pkg/sub/__init__.py": "from pkg.sub.d import x\n",
        "pkg/sub/d.py": "from pkg.sub import e\n",            # inside pkg.sub: no edge to its __init__
        "pkg/sub/e.py": "",
        "pkg/f.py": "from pkg.sub.e import y\n",              # runs pkg/sub/__init__ first: f -> pkg.sub
        "tests/test_x.py": "def test():\n    from bench.common import run_cli\n",
        "kernels/k.py": "import nanomoe_fn.checks\n",
        "reference/r.py": "from kernels import k\nimport kernelsx\n",  # kernelsx is another package
        "kernels/long.py": "x = 1\n" * (MAX_LINES + 1),
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == set() and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.sub.d"] == {"pkg.sub.e"} and graph["pkg.f"] == {"pkg.sub", "pkg.sub.e"}
    assert find_cycle(graph) is None
    _write(tmp_path, {"pkg/b.py": "from pkg import c\n"})  # now at import time: a -> b -> c -> a
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert offending_imports(tmp_path, "tests", ("bench",)) == ["tests/test_x.py:2 imports bench.common"]
    assert offending_imports(tmp_path, "kernels", ("nanomoe_fn",)) == ["kernels/k.py:1 imports nanomoe_fn.checks"]
    assert offending_imports(tmp_path, "reference", ("nanomoe_fn", "kernels")) == ["reference/r.py:1 imports kernels"]
    assert long_files(tmp_path, ("kernels",), MAX_LINES) == [f"kernels/long.py: {MAX_LINES + 1} lines"]
    assert long_files(tmp_path, ("reference", "pkg"), MAX_LINES) == []
