"""No import cycle among the modules of ``jobs`` and ``probe_core``, read statically from the source.

Every ``import`` counts, also those inside functions: a cycle hidden in a function still ties two
modules together, and moving the import to the top of the file then breaks."""
import ast
import graphlib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "probe_core")


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of PACKAGES (a package is its ``__init__.py``)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the modules of PACKAGES it imports}. ``from a import b`` imports ``a`` and, where b is
    a module, ``a.b``; ``import a.b`` imports ``a`` and ``a.b``."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        wanted = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                wanted.update([base] + [f"{base}.{a.name}" for a in node.names])
        prefixes = {".".join(w.split(".")[:i]) for w in wanted for i in range(1, w.count(".") + 2)}
        # A module's own parent packages are no edge: Python runs them before the module anyway.
        graph[name] = {m for m in prefixes if m in known and m != name and not name.startswith(m + ".")}
    return graph


def test_the_import_graph_has_no_cycle():
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert "jobs.run" in order and "probe_core.metrics" in order  # the walk found the packages
