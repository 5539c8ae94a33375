"""Every error ckptstore raises on purpose is a :class:`~ckptstore.errors.CkptStoreError`
that also derives from the builtin a caller would catch (see errors.py).

The static check walks the syntax tree of every module of the package and fails on a
``raise`` of a builtin exception class by name (``raise ValueError(...)``), except:

- re-raising what was caught (``raise``, ``raise exc``);
- a raise that a ``try`` around it in the same function catches (control flow, as in
  ``raise TypeError`` to reach the ``except`` that raises the typed error);
- ``AssertionError`` and ``NotImplementedError``: a bug or an abstract method, not an error
  a caller handles;
- the short :data:`ALLOWED` list below, each with its reason.
"""

from __future__ import annotations

import ast
import builtins
import json
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.errors import CheckpointNotFound, CkptStoreError, InvalidOption, InvalidOptionType

PACKAGE = Path(ckptstore.__file__).parent

#: Builtin exception classes a deliberate error must not be raised as.
CHECKED = {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, Exception) and not issubclass(value, Warning)} - {
    "AssertionError",
    "NotImplementedError",
    "StopIteration",
    "StopAsyncIteration",
}

#: (module, function, class): why it stays a builtin.
ALLOWED = {
    ("backends/local.py", "_LocalReader.fileno", "ValueError"): "a file object's protocol: io raises ValueError for a closed file, and callers of fileno() expect it",
    ("backends/local.py", "_open_for_read", "FileNotFoundError"): "the local backend's OS-level error, which _translated turns into ObjectNotFound",
    ("backends/local.py", "_open_for_read_raw", "FileNotFoundError"): "the local backend's OS-level error, which _translated turns into ObjectNotFound",
    ("backends/local.py", "LocalObjectStore.info.attempt", "FileNotFoundError"): "the local backend's OS-level error, which _translated turns into ObjectNotFound",
    ("backends/fsspec.py", "_FsspecObjectStore.info.stat_object", "FileNotFoundError"): "the fsspec backend's OS-level error, which _translated turns into ObjectNotFound",
    ("formats/files.py", "write_checked_files", "NotADirectoryError"): "an OS-level error that export_errors turns into StorageError naming the export",
    ("catalog.py", "_exclusive", "TimeoutError"): "an OSError that Catalog.__init__ catches: the catalog falls back to memory with a warning",
    ("codec.py", "decode_into", "ValueError"): "a caller's bug, not bad data: every caller sizes target from the frame header it checked",
}  # fmt: skip


def _caught_names(handler: ast.ExceptHandler) -> set[str]:
    if handler.type is None:
        return {"BaseException"}
    nodes = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {n.id for n in nodes if isinstance(n, ast.Name)}


def _catches(names: set[str], raised: str) -> bool:
    raised_class = getattr(builtins, raised)
    return any(isinstance(c := getattr(builtins, n, None), type) and issubclass(raised_class, c) for n in names)


def bare_raises(source: str) -> list[tuple[int, str, str]]:
    """``(line, function, class)`` of each raise of a :data:`CHECKED` builtin in ``source``
    that no ``try`` around it in the same function catches."""
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, scope: list[str], handlers: list[set[str]]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope, handlers = [*scope, node.name], []  # a try outside a function does not catch inside it
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id in CHECKED and not any(_catches(h, target.id) for h in handlers):
                found.append((node.lineno, ".".join(scope), target.id))
        if isinstance(node, ast.Try | ast.TryStar):
            caught = set().union(*(_caught_names(h) for h in node.handlers)) if node.handlers else set()
            for child in node.body:
                visit(child, scope, [*handlers, caught])
            for child in (*node.handlers, *node.orelse, *node.finalbody):
                visit(child, scope, handlers)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, scope, handlers)

    visit(ast.parse(source), [], [])
    return found


def test_no_bare_builtin_raise_in_the_package() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20
    offending, used = [], set()
    for path in modules:
        name = path.relative_to(PACKAGE).as_posix()
        for line, function, cls in bare_raises(path.read_text()):
            if (name, function, cls) in ALLOWED:
                used.add((name, function, cls))
            else:
                offending.append(f"ckptstore/{name}:{line} in {function or '<module>'}: raise {cls}")
    assert not offending, "deliberate errors must be CkptStoreError subclasses (see ckptstore/errors.py):\n" + "\n".join(offending)
    assert used == set(ALLOWED), f"stale allow-list entries: {sorted(set(ALLOWED) - used)}"


def test_the_walker_sees_what_it_must() -> None:
    source = """
def f(x):
    if x:
        raise ValueError("bad")
    try:
        raise TypeError
    except (KeyError, TypeError):
        raise
    try:
        raise NotADirectoryError
    except OSError:
        pass
    try:
        pass
    except Exception as exc:
        raise exc
    raise AssertionError("unreachable")

class C:
    def g(self):
        try:
            def h():
                raise KeyError("k")
        except KeyError:
            pass
        raise FileNotFoundError(self)
"""
    assert bare_raises(source) == [(4, "f", "ValueError"), (23, "C.g.h", "KeyError"), (26, "C.g", "FileNotFoundError")]


def _raised(call) -> BaseException:
    with pytest.raises(CkptStoreError) as info:
        call()
    return info.value


def test_bad_options_are_typed_and_still_the_builtin(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    error = _raised(lambda: ckptstore.open(url, compression="sometimes"))
    assert isinstance(error, InvalidOption) and isinstance(error, ValueError) and error.name == "compression"
    error = _raised(lambda: ckptstore.open(url, chunk_size_bytes=0))
    assert isinstance(error, InvalidOption) and isinstance(error, ValueError) and error.name == "chunk_size_bytes" and "0" in str(error)
    error = _raised(lambda: ckptstore.open("ftp://host/x"))
    assert isinstance(error, InvalidOption) and isinstance(error, ValueError) and "'ftp'" in str(error)
    assert not (tmp_path / "store").exists()  # refused before anything was written
    store = ckptstore.open(url)
    store.commit({"w": torch.zeros(2)}, message="one")
    error = _raised(lambda: store.gc(None, grace_period_s=-1))
    assert isinstance(error, InvalidOption) and isinstance(error, ValueError) and error.name == "grace_period_s"
    error = _raised(lambda: store.gc({"main": "keep everything"}))
    assert isinstance(error, InvalidOptionType) and isinstance(error, ValueError) and isinstance(error, TypeError) and "str" in str(error)
    assert len(store.log()) == 1  # refused before anything was collected
    error = _raised(lambda: ckptstore.KeepEveryNSteps(0))
    assert isinstance(error, InvalidOption) and isinstance(error, ValueError) and error.name == "KeepEveryNSteps.n"


def test_a_missing_checkpoint_is_typed_and_still_file_not_found(tmp_path: Path) -> None:
    store = ckptstore.open(str(tmp_path / "store"))
    (tmp_path / "run").mkdir()
    error = _raised(lambda: store.import_run(str(tmp_path / "run")))
    assert isinstance(error, CheckpointNotFound) and isinstance(error, FileNotFoundError)
    assert error.path == str(tmp_path / "run") and str(tmp_path / "run") in str(error)
    assert store.branches() == {}


def test_bad_storage_options_in_the_environment_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptstore.cli.context import storage_options

    for raw, says in (("{not json", "not valid JSON"), (json.dumps([1]), "must be a JSON object")):
        monkeypatch.setenv("CKPTSTORE_STORAGE_OPTIONS", raw)
        error = _raised(storage_options)
        assert isinstance(error, InvalidOption) and isinstance(error, ValueError) and says in str(error) and "CKPTSTORE_STORAGE_OPTIONS" in str(error)
