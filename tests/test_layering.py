"""Import boundaries: the library never loads the benchmark's data package.

``tiesmerge_bench`` (fetchers and parsers of the benchmark's Debian and npm data) ships in the
same distribution and may import ``tiesmerge``; the reverse would put the benchmark back into
the library. The one exception is the bundled demo, which loads it inside the command.

Cross-cutting (not one source module): the imports of every module of both packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import tiesmerge

BENCH = "tiesmerge_bench"
LIBRARY = Path(tiesmerge.__file__).parent
# the only module allowed to import the bench package, and only inside a function
DEMO_COMMAND = LIBRARY / "cli" / "demo_text.py"


def _bench_imports(tree: ast.AST) -> list[tuple[int, bool]]:
    """(line, inside a function) of every import of the bench package in ``tree``."""
    found: list[tuple[int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            if any(n == BENCH or n.startswith(BENCH + ".") for n in names):
                found.append((child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def test_no_library_module_imports_the_bench_package() -> None:
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for line, in_function in _bench_imports(ast.parse(path.read_text(), str(path))):
            if path != DEMO_COMMAND or not in_function:
                offenders.append(f"{path.relative_to(LIBRARY.parent)}:{line}")
    assert not offenders, f"the tiesmerge library imports {BENCH}: {offenders}"


def test_the_demo_command_imports_it_only_inside_the_command() -> None:
    # the exemption above must name the module that really loads the package, or it hides nothing
    found = _bench_imports(ast.parse(DEMO_COMMAND.read_text()))
    assert found and all(inside for _, inside in found)


def test_the_scan_sees_module_level_and_lazy_imports() -> None:
    source = ("import tiesmerge_bench.fetch\ndef f():\n    from tiesmerge_bench import load_suite\n"
              "import tiesmerge_benchmarks\n")
    assert _bench_imports(ast.parse(source)) == [(1, False), (3, True)]


def test_importing_every_library_module_leaves_the_bench_package_unloaded() -> None:
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        import tiesmerge
        names = ["tiesmerge"] + [m.name for m in pkgutil.walk_packages(tiesmerge.__path__, "tiesmerge.")]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m == {BENCH!r} or m.startswith({BENCH!r} + "."))
        print(len(names), "tiesmerge.cli.demo_text" in sys.modules, loaded)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    count, demo_imported, loaded = run.stdout.split(maxsplit=2)
    assert int(count) > 30 and demo_imported == "True"  # the walk really reached the whole package
    assert loaded.strip() == "[]", f"importing the tiesmerge library loaded {loaded.strip()}"
