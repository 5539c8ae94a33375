"""The storage layer's modules import only downward, and the key layout is spelled once."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ckptstore"

#: Each module → the package modules it may not import (what sits above it).
ABOVE = {
    "layout": None,  # imports nothing of the package
    "records": {"refs", "lease", "history", "inventory", "gc", "fsck", "usage", "repack", "store"},
    "refs": {"records", "lease", "history", "inventory", "gc", "fsck", "usage", "repack", "store"},
    "lease": {"refs", "history", "inventory", "gc", "fsck", "usage", "repack", "store"},
    "history": {"lease", "inventory", "gc", "fsck", "usage", "repack", "store"},
    "inventory": {"lease", "gc", "fsck", "usage", "repack", "store"},
    "fsck": {"gc", "usage", "store"},
    "usage": {"gc", "fsck", "store"},
    "repack": {"gc", "fsck", "usage", "store"},
    "gc": {"fsck", "usage", "store"},
}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def test_storage_modules_import_only_downward():
    for module, above in ABOVE.items():
        found = _imports(module)
        if above is None:
            assert not found, f"{module} imports {found}"
        else:
            assert not found & above, f"{module} imports {found & above}, which sit above it"


def test_readers_do_not_import_the_collector():
    for module in ("fsck", "usage", "repack", "distributed", "history", "inventory", "records"):
        assert "gc" not in _imports(module), f"{module} imports gc"


def _leading_text(node: ast.AST) -> str | None:
    """The text a string literal (or an f-string) starts with."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def test_no_key_prefix_literal_outside_layout():
    prefixes = ("commits/", "manifests/", "chunks/", "shallow/", "demotions/", "refs/", "locks/")
    offenders = [
        f"{path.name}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "layout.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if (text := _leading_text(node)) is not None and text.startswith(prefixes)
    ]
    assert not offenders, offenders
