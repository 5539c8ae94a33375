"""The shape of the package, read from its source (nothing is imported): the import graph of
``ckptstore/`` has no cycle and points only downward through the layers of :data:`LAYERS`,
readers do not import the collector, the integrations use only the public API, the object key
layout is spelled only in ``layout.py``, and no module (of ``ckptstore/`` or ``bench/``) is
over :data:`MAX_MODULE_LINES` lines or has a function over :data:`MAX_FUNCTION_LINES`.

Every check runs over one parsed graph (:func:`graph`): each module's syntax tree and its
imports, resolved to dotted module names. An import is *lazy* when it sits inside a function
and *type-only* under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ckptstore"
INTEGRATIONS = "ckptstore.integrations"

#: What an integration may import from the package: the public API, each with why it is public.
PUBLIC_API = {
    "ckptstore": "the top-level names (ckptstore.open, the errors and data classes it exports)",
    "ckptstore.store": "the facade itself: Store, StoreConfig, open_store",
    "ckptstore.errors": "the typed errors callers catch",
    "ckptstore.commit": "Commit, the data type Store's methods return",
    "ckptstore.manifest": "the manifest and state-tree data types Store.write_chunks, Store.publisher and Store.read_blobs take and return",
    "ckptstore.dcp_layout": "the documented format of a torch.distributed.checkpoint save in a commit's tree",
    "ckptstore.formats": "the file formats checkpoints are imported from and exported to (the package and its modules)",
}
#: Names an integration may import from an internal module for the type checker only (under
#: ``if TYPE_CHECKING:``): the types of values public Store methods take or return.
TYPE_ONLY = {
    ("ckptstore.lease", "WriterMarker"): "what Store.hold_writer_marker returns",
    ("ckptstore.pipeline", "DeltaMode"): "the type of the delta option of Store.commit and Store.write_chunks",
    ("ckptstore.pipeline", "WriteResult"): "what Store.write_chunks returns and Store.publisher's function takes",
}
#: Attributes of a Store that are its internals: the object store, refs, chunk pipeline, catalog.
STORE_INTERNALS = {"objects", "refs", "pipeline", "catalog"}

#: The layers, bottom first: a module imports only modules of its own layer or below (imports
#: for the type checker only excepted). A module (or package) is placed by its longest prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundations: errors, the key layout, host facts, leaf helpers",
        (
            "errors",
            "layout",
            "_host",
            "redaction",
            "background",
            "catalog",
            "retention",
            "cli.options",
        ),
    ),
    (
        "encodings: ids, frames and codecs, state trees, manifests, commits",
        (
            "ids",
            "codec",
            "balance",
            "recent_chunks",
            "tree",
            "manifest",
            "commit",
        ),
    ),
    (
        "storage and file formats: backends, safetensors/.pt/HF files, the DCP layout",
        (
            "backends",
            "formats",
            "dcp_layout",
        ),
    ),
    (
        "small mutable objects and the history they record: records, refs, leases, history",
        (
            "records",
            "refs",
            "lease",
            "history",
        ),
    ),
    ("chunks in and out", ("pipeline",)),
    (
        "what a store holds, read: inventory, config, reading, revisions, branches, diffs",
        (
            "inventory",
            "config",
            "reader",
            "revisions",
            "branching",
            "diff",
        ),
    ),
    (
        "operations: writing commits, gc, fsck, du, repack, import and export",
        (
            "writer",
            "gc",
            "fsck",
            "usage",
            "repack",
            "transfer",
        ),
    ),
    ("the facade", ("store",)),
    ("on the facade: the package's names, integrations, pictures", ("__init__", "integrations", "ui")),
    ("entry points: the command line, and the old module names", ("cli", "__main__", "training", "distributed")),
)
#: Modules that read the store and must not depend on the collector that deletes from it.
READERS = ("fsck", "usage", "repack", "history", "inventory", "records", "reader", "revisions", "integrations", "ui.pages")
#: The object key prefixes, spelled only in ckptstore/layout.py.
KEY_PREFIXES = ("commits/", "manifests/", "chunks/", "shallow/", "demotions/", "refs/", "locks/")
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    module: str  # the dotted name of the module imported (a submodule where ``from pkg import sub`` names one)
    names: tuple[str, ...]  # the names taken from it (empty for ``import x``)
    line: int
    lazy: bool  # inside a function: runs when the function is called
    type_only: bool  # under ``if TYPE_CHECKING:``


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: tuple[Import, ...]

    @property
    def where(self) -> str:
        return self.path.relative_to(REPO).as_posix()

    def package_imports(self, *, lazy: bool = True, type_only: bool = False) -> Iterator[Import]:
        """Its imports of ckptstore's modules (lazy ones unless ``lazy=False``; type-only ones
        only with ``type_only=True``)."""
        for imp in self.imports:
            if is_package_module(imp.module) and (lazy or not imp.lazy) and (type_only or not imp.type_only):
                yield imp


def is_package_module(name: str) -> bool:
    return name == "ckptstore" or name.startswith("ckptstore.")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, name: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import statement of a module, resolved to dotted names, with where it sits."""
    base_package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, *, lazy: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, (), node.lineno, lazy, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base_package.rsplit(".", node.level - 1)[0] if node.level > 1 else base_package
                source = f"{anchor}.{node.module}" if node.module else anchor
            else:
                source = node.module or ""
            plain = tuple(a.name for a in node.names if f"{source}.{a.name}" not in known)
            if plain or not node.names:
                found.append(Import(source, plain, node.lineno, lazy, type_only))
            found.extend(Import(f"{source}.{a.name}", (), node.lineno, lazy, type_only) for a in node.names if f"{source}.{a.name}" in known)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                visit(child, lazy=lazy, type_only=True)
            else:
                visit(child, lazy=lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), type_only=type_only)

    visit(tree, lazy=False, type_only=False)
    return found


@functools.cache
def graph() -> dict[str, Module]:
    """Every module of ckptstore/, parsed once and shared by the tests."""
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(p) for p in paths}
    modules = {}
    for path in paths:
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules[name] = Module(name, path, tree, tuple(_imports(tree, name, path.name == "__init__.py", known)))
    return modules


def integrations() -> list[Module]:
    return [m for name, m in graph().items() if name.startswith(INTEGRATIONS + ".")]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing
    itself), each sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


# --------------------------------------------------------------------------------------------


def test_the_graph_sees_every_module_and_resolves_relative_imports():
    modules = graph()
    assert {"ckptstore", "ckptstore.store", "ckptstore.integrations", "ckptstore.integrations.distributed"} <= set(modules)
    imported = {imp.module for imp in modules["ckptstore.integrations.distributed"].imports}
    assert {"ckptstore.store", "ckptstore.integrations.training", "torch.distributed"} <= imported


def test_no_import_cycle_between_modules():
    """Between ckptstore's modules, function-level imports included (an import put off into a
    function to break a cycle hides it; it does not remove it). A package's ``__init__``
    importing its own submodules is not an edge: importing a submodule runs the package first."""
    edges: dict[str, set[str]] = {}
    for name, module in graph().items():
        for imp in module.package_imports():
            if imp.module != name and not (module.path.name == "__init__.py" and imp.module.startswith(name + ".")):
                edges.setdefault(name, set()).add(imp.module)
    assert _cycles(edges) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", integrations(), ids=lambda m: m.name)
def test_integrations_import_only_the_public_api(module: Module):
    refused = []
    for imp in module.package_imports(type_only=True):
        if is_public(imp.module) or imp.module == INTEGRATIONS or imp.module.startswith(INTEGRATIONS + "."):
            continue
        if imp.type_only and imp.names and all((imp.module, n) in TYPE_ONLY for n in imp.names):
            continue
        refused.append(f"{module.where}:{imp.line}: {imp.module} {list(imp.names)}")
    assert refused == []


def is_public(module: str) -> bool:
    """Whether a module is in :data:`PUBLIC_API`, or in a package there (``ckptstore.formats.hf``)."""
    return any(module == p or (p != "ckptstore" and module.startswith(p + ".")) for p in PUBLIC_API)


def _named_store(node: ast.expr) -> bool:
    """``store``, ``self.store``, ``Store``, ``other_store``: anything named store."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    return name is not None and (name.lower() == "store" or name.lower().endswith("_store"))


def store_internals_used(tree: ast.AST) -> list[tuple[int, str]]:
    """Where an attribute of something named store is an internal: one of
    :data:`STORE_INTERNALS`, or private (``_x``; dunders are Python's, not the Store's)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _named_store(node.value):
            private = node.attr.startswith("_") and not (node.attr.startswith("__") and node.attr.endswith("__"))
            if node.attr in STORE_INTERNALS or private:
                found.append((node.lineno, f"{ast.unparse(node.value)}.{node.attr}"))
    return sorted(found)


@pytest.mark.parametrize("module", integrations(), ids=lambda m: m.name)
def test_integrations_touch_no_store_internals(module: Module):
    assert [f"{module.where}:{line}: {text}" for line, text in store_internals_used(module.tree)] == []


def test_the_store_internals_check_sees_each_kind_of_access():
    code = "store.objects.get(k)\nself.store.refs\nself.store._commits\nstore.__class__\nstore.commit(s)\nother_store.pipeline\nx.objects"
    assert [text for _, text in store_internals_used(ast.parse(code))] == [
        "store.objects",
        "self.store.refs",
        "self.store._commits",
        "other_store.pipeline",
    ]


# --------------------------------------------------------------------------------------------
# Layers, readers and the key layout


def layer_of(name: str) -> int:
    """The index in :data:`LAYERS` of a ckptstore module (``ckptstore`` itself: ``__init__``)."""
    short = name.removeprefix("ckptstore").removeprefix(".") or "__init__"
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (short == prefix or short.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to tests/test_architecture.py's LAYERS")
    return best[0]


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_modules_import_only_their_layer_or_below():
    """Lazy imports count (putting an import into a function does not change which way it points)."""
    upward = [
        f"{module.where}:{imp.line}: {imp.module} ({LAYERS[layer_of(imp.module)][0].split(':')[0]}) from {LAYERS[layer_of(name)][0].split(':')[0]}"
        for name, module in graph().items()
        for imp in module.package_imports()
        if layer_of(imp.module) > layer_of(name)
    ]
    assert upward == []


def test_readers_do_not_import_the_collector():
    found = [
        f"{module.where}:{imp.line}"
        for name, module in graph().items()
        if any(name.removeprefix("ckptstore.") == r or name.startswith(f"ckptstore.{r}.") for r in READERS)
        for imp in module.package_imports(type_only=True)
        if imp.module == "ckptstore.gc"
    ]
    assert found == []


def _leading_text(node: ast.AST) -> str | None:
    """The text a string literal (or an f-string) starts with."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def test_no_key_prefix_literal_outside_layout():
    offenders = [
        f"{module.where}:{node.lineno}"
        for name, module in graph().items()
        if name != "ckptstore.layout"
        for node in ast.walk(module.tree)
        if (text := _leading_text(node)) is not None and text.startswith(KEY_PREFIXES)
    ]
    assert offenders == []


# --------------------------------------------------------------------------------------------
# Sizes


def _sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(REPO / "bench").rglob("*.py")])


def function_lengths(tree: ast.AST) -> list[tuple[int, str, int]]:
    """(line, name, lines) of every function, its signature, docstring and body included."""
    return [
        (node.lineno, node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_no_module_over_the_line_limit():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in _sources() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert long == []


def test_no_function_over_the_line_limit():
    long = [
        f"{p.relative_to(REPO)}:{line}: {name} is {n} lines"
        for p in _sources()
        for line, name, n in function_lengths(ast.parse(p.read_text(encoding="utf-8")))
        if n > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_size_checks_measure_what_they_say():
    tree = ast.parse("def f():\n" + "    x = 1\n" * 90 + "\nclass C:\n    async def g(self):\n        pass\n")
    assert function_lengths(tree) == [(1, "f", 91), (94, "g", 2)]
    assert layer_of("ckptstore.backends.s3") == layer_of("ckptstore.backends") < layer_of("ckptstore.store") < layer_of("ckptstore.cli.ui")
