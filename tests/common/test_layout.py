"""Layout rules of the package, read from the source with `ast` (nothing is imported or run):

- inner modules never import the package's public face (`hf_attn_zoo/__init__.py`): they import the module that
  defines what they use (`from ..patching import patch`, `from ..loading import from_pretrained`), so the face can
  import every module without a circle and a module's dependencies are visible in its imports;
- nothing inside the package imports the command-line entry point (`hf_attn_zoo/cli.py`); the helpers the
  subcommands share live in `hf_attn_zoo/cli_args.py`;
- the module-level imports between the package's modules form no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "hf_attn_zoo"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# The public face itself, and the command line (the user-facing entry point, which may use the face).
FACE_IMPORTS_ALLOWED_IN = {f"{PACKAGE}/__init__.py", f"{PACKAGE}/cli.py"}
# Folders not checked yet (none now).
FACE_IMPORTS_NOT_CHECKED_YET: tuple[str, ...] = ()
# (file, name) pairs that import a name from the face on purpose or until their owner moves it (none now):
FACE_NAMES_ALLOWED: set[tuple[str, str]] = set()

# Modules that import the command-line entry point (hf_attn_zoo.cli), with the reason; only __main__ should.
CLI_IMPORTS_ALLOWED = {
    f"{PACKAGE}/__main__.py": "`python -m hf_attn_zoo` runs the entry point",
}

# Import cycles (through module-level imports) that are known and accepted: each entry is the full set of modules of
# one strongly connected component of the import graph, with a comment saying why it cannot go yet. None now.
CYCLES_ALLOWED: list[frozenset[str]] = []


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module an `ImportFrom` reads from."""
    if not node.level:
        return node.module or ""
    base = _package_of(name, path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _all_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside functions, not under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, None) or [])

    visit(tree.body)
    return found


def face_imports(
    root: Path = ROOT,
    skip: set[str] = frozenset(),
    skip_dirs: tuple[str, ...] = (),
    allowed_names: set[tuple[str, str]] = frozenset(),
) -> list[str]:
    """`file:line: statement` for every import of the package itself (its `__init__`) outside `skip`."""
    package = root.name
    mods = modules(root)
    found = []
    for name, path in mods.items():
        rel = path.relative_to(root.parent).as_posix()
        if rel in skip or rel.startswith(skip_dirs):
            continue
        for node in _all_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bad = [alias.name for alias in node.names if alias.name == package]
            elif _resolve(node, name, path) == package:
                # `from hf_attn_zoo import x` / `from .. import x` is fine when x is a module of its own
                bad = [
                    alias.name
                    for alias in node.names
                    if f"{package}.{alias.name}" not in mods and (rel, alias.name) not in allowed_names
                ]
            else:
                bad = []
            if bad:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def importers_of(target: str, root: Path = ROOT) -> dict[str, list[str]]:
    """Files that import the module `target` (anywhere in the file), with the statements."""
    mods = modules(root)
    found: dict[str, list[str]] = {}
    for name, path in mods.items():
        if name == target:
            continue
        for node in _all_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                hit = any(alias.name == target or alias.name.startswith(target + ".") for alias in node.names)
            else:
                source = _resolve(node, name, path)
                hit = (
                    source == target
                    or source.startswith(target + ".")
                    or any(f"{source}.{alias.name}" == target for alias in node.names)
                )
            if hit:
                found.setdefault(path.relative_to(root.parent).as_posix(), []).append(ast.unparse(node))
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules its module-level imports run.

    `import a.b.c` and `from a.b import c` run `a.b`'s `__init__` and `a.b.c`; the importing module's own parent
    packages are already being imported, so they count only when a name is read from one of them (`from . import
    name` where `name` is not a module): that reads a half-run `__init__`.
    """
    package = root.name
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        own = _package_of(name, path).split(".")
        ancestors = {".".join(own[:i]) for i in range(1, len(own) + 1)}
        deps: set[str] = set()

        def runs(module: str, reads_names: bool = False) -> None:
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in mods and (prefix not in ancestors or (reads_names and prefix == module)):
                    deps.add(prefix)

        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        runs(alias.name)
                continue
            source = _resolve(node, name, path)
            if source.split(".")[0] != package:
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in mods:
                    runs(source)
                    runs(f"{source}.{alias.name}")
                else:
                    runs(source, reads_names=True)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[frozenset[str], list[str]]]:
    """`(modules, cycle)` per strongly connected component of more than one module (or a self-loop): its modules,
    and one cycle through them (`[a, b, ..., a]`) to show."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few hundred modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        start = min(component)
        # shortest way back to `start` inside the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in previous:
                        previous[w] = v
                        following.append(w)
            frontier = following
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(previous[path[-1]])
        found.append((frozenset(component), path[::-1]))
    return found


def test_inner_modules_do_not_import_the_public_face():
    found = face_imports(
        skip=FACE_IMPORTS_ALLOWED_IN, skip_dirs=FACE_IMPORTS_NOT_CHECKED_YET, allowed_names=FACE_NAMES_ALLOWED
    )
    assert not found, (
        "inner modules import the package's public face; import the defining module instead "
        "(e.g. `from ..patching import patch`, `from ..loading import from_pretrained`):\n" + "\n".join(found)
    )


def test_nothing_imports_the_command_line_entry_point():
    found = {path: lines for path, lines in importers_of(f"{PACKAGE}.cli").items() if path not in CLI_IMPORTS_ALLOWED}
    assert not found, (
        "modules import hf_attn_zoo.cli; shared argument helpers live in hf_attn_zoo.cli_args:\n"
        + "\n".join(f"{path}: {lines}" for path, lines in found.items())
    )


def test_no_import_cycles():
    found = [cycle for members, cycle in cycles(import_graph()) if members not in CYCLES_ALLOWED]
    assert not found, "import cycles through module-level imports:\n" + "\n".join(" -> ".join(c) for c in found)


# --- the checks themselves, on a small package written for them ---


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    files = {
        "__init__.py": "from . import a\nfrom .b import helper\n__version__ = '1'\n",
        "a.py": "from .b import helper\n",
        "b.py": "import toy.c\n\ndef helper():\n    from . import __version__\n    import toy\n",
        "c.py": "from .sub import d\n",
        "cli.py": "from .a import helper\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..b import helper\nfrom .. import a\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .. import c\n",
        "sub/e.py": "def f():\n    from ..cli import main\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_face_imports_flags_names_of_the_face_not_its_modules(toy):
    found = face_imports(toy, skip={"toy/__init__.py"})
    assert found == ["toy/b.py:4: from . import __version__", "toy/b.py:5: import toy"]
    assert face_imports(toy, skip={"toy/__init__.py"}, allowed_names={("toy/b.py", "__version__")}) == [
        "toy/b.py:5: import toy"
    ]


def test_import_graph_and_cycles(toy):
    graph = import_graph(toy)
    # function-level imports and TYPE_CHECKING blocks do not count; `import toy.c` runs toy.c
    assert graph["toy.b"] == {"toy.c"}
    assert graph["toy.sub.d"] == {"toy.b", "toy.a"}
    assert graph["toy.c"] == {"toy.sub", "toy.sub.d"}
    assert cycles(graph) == [
        (frozenset({"toy.a", "toy.b", "toy.c", "toy.sub.d"}), ["toy.a", "toy.b", "toy.c", "toy.sub.d", "toy.a"])
    ]
    assert cycles({"x": {"y"}, "y": set()}) == []
    assert importers_of("toy.cli", toy) == {"toy/sub/e.py": ["from ..cli import main"]}
