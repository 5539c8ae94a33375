"""No code execution on load: no pickle, marshal, eval or exec anywhere on the checkout
path (checked in the source), and the same commit content from any number of threads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import ckptstore

PACKAGE = Path(ckptstore.__file__).parent
#: Modules a checkout, log, diff, gc or fsck runs through. formats.py (import from foreign
#: formats, torch.load with weights_only=True), distributed.py (DCP byte items are DCP's
#: business) and the CLI are not on the load path of a ckptstore object.
LOAD_PATH = [
    "codec",
    "commit",
    "manifest",
    "backends/__init__",
    "backends/local",
    "backends/fsspec",
    "backends/s3",
    "_host",
    "refs",
    "catalog",
    "pipeline",
    "store",
    "gc",
    "fsck",
    "lease",
    "usage",
    "retention",
    "ids",
    "errors",
]
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "cloudpickle", "shelve", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


@pytest.mark.parametrize("module", LOAD_PATH)
def test_load_path_imports_no_deserialiser_and_calls_no_eval(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"{module}.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_MODULES, f"{module}.py:{node.lineno}"
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in FORBIDDEN_MODULES, f"{module}.py:{node.lineno}"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):  # the builtins (re.compile is fine)
                assert func.id not in FORBIDDEN_CALLS, f"{module}.py:{node.lineno} calls {func.id}"
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "builtins":
                assert func.attr not in FORBIDDEN_CALLS, f"{module}.py:{node.lineno} calls builtins.{func.attr}"
            if isinstance(func, ast.Attribute) and func.attr in ("load", "loads") and isinstance(func.value, ast.Name):
                assert func.value.id not in ("torch", "pickle", "marshal", "np", "numpy"), f"{module}.py:{node.lineno}"


def test_a_store_seeded_with_a_pickle_payload_executes_nothing(tmp_path, monkeypatch):
    """A manifest whose tree is a pickle (that would run code) is refused as malformed."""
    import pickle

    from ckptstore.codec import Kind, encode_object_bytes
    from ckptstore.ids import content_id

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    store = ckptstore.open(str(tmp_path / "s"))
    c = store.commit({"w": torch.ones(3)})
    manifest = store.get_manifest(c.manifest)
    evil_raw = manifest.to_bytes().replace(manifest.tree, pickle.dumps(Boom()))
    # Store it under its own id and point a new commit at it, as a forger with write access would.
    from ckptstore.commit import encode_commit

    evil_id = content_id(evil_raw)
    store.objects.put_if_absent(f"manifests/{evil_id[:2]}/{evil_id}", encode_object_bytes(Kind.MANIFEST, evil_raw, compression_level=None))
    payload = pickle.dumps(Boom())  # also as metadata and as a message: bytes and text, never unpickled
    commit_id, raw = encode_commit(
        manifest=evil_id, manifest_size_bytes=len(evil_raw), parents=(c.id,), message=payload.decode("latin-1"), created_at=c.created_at, branch="evil",
        metadata={"blob": payload}, metrics={}, stats=c.stats,
    )  # fmt: skip
    store.objects.put_if_absent(f"commits/{commit_id[:2]}/{commit_id}", encode_object_bytes(Kind.COMMIT, raw, compression_level=None))
    store.objects.put_if_absent("refs/heads/evil", encode_object_bytes(Kind.REF, commit_id.encode(), compression_level=None))
    reopened = ckptstore.open(str(tmp_path / "s"))  # the catalog indexes the forged commit
    with pytest.raises(ckptstore.IntegrityError):
        reopened.checkout("evil")
    assert reopened.log("evil")[0].metadata == {"blob": payload}
    with pytest.raises(ckptstore.IntegrityError):
        reopened.diff("main", "evil")
    report = reopened.fsck(read_data=True)
    assert not report.ok and any(p.key == f"manifests/{evil_id[:2]}/{evil_id}" for p in report.problems)
    with pytest.raises(ckptstore.IntegrityError):  # what the forged commit needs is unknown: GC refuses
        reopened.gc(grace_period_s=0)
    assert not (tmp_path / "pwned").exists()


def test_commit_content_is_the_same_with_1_2_and_8_threads():
    torch.manual_seed(0)
    state = {"a": torch.randn(50_000), "b": torch.randn(300, 200).t(), "c": torch.randn(7000).to(torch.bfloat16), "step": 3}
    manifests = set()
    for threads in (1, 2, 8):
        store = ckptstore.open(f"memory://threads-{threads}", threads=threads, chunk_size_bytes=4096, inline_threshold_bytes=256)
        manifests.add(store.commit(state).manifest)
        chunks = sorted(store.objects.list("chunks/"))
        assert len(chunks) > 50
    assert len(manifests) == 1  # the same manifest id: same chunks, same order, same tree
