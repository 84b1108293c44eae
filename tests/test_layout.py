"""The package's shape: no import cycle, every module imports on its own, only Dagster's public API, and no
settings read when a module is imported (`definitions.py` reads them once and passes them down)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "bitloot_reconcile"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Alembic's migration scripts are run by Alembic, never imported.
MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py")) if "migrations" not in path.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, importer: str, *, type_checking: bool = True) -> set[str]:
    """Every module an import statement names, anywhere in the module (also inside functions, which only defer
    a cycle); under `if TYPE_CHECKING:` only with `type_checking` (those never run)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importer's package
                package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules importing it runs: each one named, and the packages above it (their
    `__init__` runs first), leaving out the importer's own packages, which are already being imported."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges = set()
        for target in imported_names(ast.parse(path.read_text()), name, type_checking=False):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the root package's __init__ imports nothing
                candidate = ".".join(parts[:i])
                if candidate in MODULES and candidate not in own:
                    edges.add(candidate)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def walk(node: str) -> list[str] | None:
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph[node]):
            if cycle := walk(target):
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := walk(start):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    assert len(MODULES) > 50
    assert find_cycle(import_graph()) is None


def test_the_graph_sees_package_inits_and_functions():
    graph = import_graph()
    assert f"{PACKAGE}.sensors" in graph[f"{PACKAGE}.definitions"]  # `from bitloot_reconcile.sensors import ...`
    assert f"{PACKAGE}.definitions" in graph[f"{PACKAGE}.commands"]  # imported inside a function
    assert f"{PACKAGE}.domain.outcomes" not in graph[f"{PACKAGE}.domain.remedies"]


# Imports every module in its own child of one interpreter that loaded only third-party libraries, so each
# module is the first of the project imported there, as when Dagster or the command line load it.
ALONE = """
import importlib, json, os, sys, traceback
modules, libraries = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for library in libraries:  # third-party only, loaded once and shared by the children (Dagster loads lazily)
    importlib.import_module(library)
import dagster
for name in dir(dagster):
    getattr(dagster, name, None)
failed = {}
for name in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc(limit=3).encode()[-2000:])
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status:
        failed[name] = text or f"exit status {status}"
print(json.dumps(failed))
"""


def test_each_module_imports_on_its_own():
    libraries = sorted({name for module, path in MODULES.items()
                        for name in imported_names(ast.parse(path.read_text()), module)
                        if name and "." not in name and name != PACKAGE and name not in sys.stdlib_module_names})
    done = subprocess.run([sys.executable, "-c", ALONE, json.dumps(sorted(MODULES)), json.dumps(libraries)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def module_level_calls(tree: ast.Module, function: str) -> list[int]:
    """Lines where `function(...)` runs when the module is imported: outside function bodies (decorators and
    defaults do run then)."""
    lines = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
                if child is not None:
                    visit(child)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.Call):
            called = node.func
            if (isinstance(called, ast.Name) and called.id == function) or (
                    isinstance(called, ast.Attribute) and called.attr == function):
                lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return lines


def test_the_call_finder_sees_decorators_but_not_function_bodies():
    tree = ast.parse("X = load_settings()\n@s(v=m.load_settings().a)\ndef f():\n    load_settings()\n")
    assert module_level_calls(tree, "load_settings") == [1, 2]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_dagster_and_no_settings_read_at_import(name):
    tree = ast.parse(MODULES[name].read_text())
    private = sorted(n for n in imported_names(tree, name) if n == "dagster._core" or n.startswith("dagster._"))
    assert private == [], f"{name} imports Dagster's private modules"
    assert module_level_calls(tree, "load_settings") == [], f"{name} reads the settings when imported"


def test_the_production_wheel_carries_no_stand_in(tmp_path):
    """`pip install .` installs what this wheel holds and requires: no simulator, no SeaweedFS, no pyarrow."""
    import shutil
    import zipfile

    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    built = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), "--quiet"], cwd=ROOT.parent,
                           capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("bitloot_reconcile-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"{PACKAGE}/definitions.py" in names and f"{PACKAGE}/store/migrations/env.py" in names
    assert "bitloot_celery/launchers.py" in names  # the multi-host layout's launcher, its engine an extra
    assert not [n for n in names if n.startswith("bitloot_standins/") or "/sandbox/" in n or n.endswith("/demo.py")]
    requires = [line.split(":", 1)[1].strip().lower() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    assert any(r.startswith("dagster==") for r in requires)
    celery = [r for r in requires if r.startswith("dagster-celery")]
    assert celery == ["dagster-celery[redis]==0.29.27; extra == 'celery'"]
    assert not [r for r in requires if r.startswith(("seaweedfs", "pyarrow", "bitloot-standins"))], requires


@pytest.mark.parametrize("command", ["demo", "sandbox"])
def test_without_the_stand_ins_the_demo_says_what_to_install(command):
    standins = str(ROOT.parent / "standins")  # where the development install finds the package
    hidden = (f"import sys; sys.path = [p for p in sys.path if p != {standins!r}]\n"
              f"from bitloot_reconcile.cli import main; main([{command!r}])")
    done = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 1
    assert "not part of a production install" in done.stderr and "make demo" in done.stderr
