"""The store's public API on every backend: round trips, dedup, refs, history, errors.

Tests take ``store_url`` (tests/conftest.py), the fixture the storage contract suite
(test_objectstore.py) runs on: local, memory and S3 (moto, marked ``s3``). The few that
are not run on all three say why."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import msgpack
import pytest
import torch
from states import assert_same, full_state, trained

import ckptstore
from ckptstore.backends import open_object_store
from ckptstore.layout import chunk_key, commit_key, manifest_key

CHUNK = 4096
INLINE = 256  # shrunk with the chunk size so small tensors take the chunked path
TESTS_DIR = os.path.dirname(__file__)


def open_store(url_and_options, **kwargs):
    """The store at ``(url, storage_options)`` with small chunks (so small tensors are chunked)."""
    return open_with_defaults(url_and_options, chunk_size_bytes=CHUNK, inline_threshold_bytes=INLINE, **kwargs)


def open_with_defaults(url_and_options, **kwargs):
    url, options = url_and_options
    return ckptstore.open(url, storage_options=options, **kwargs)


def sibling(url_and_options, name):
    """Another store on the same backend, beside the one at ``url_and_options``."""
    url, options = url_and_options
    return f"{url}-{name}", options


def keys(store, prefix):
    return set(store.objects.list(prefix))


# -- acceptance 1: bit-exact round trips --------------------------------------------------


def test_full_state_round_trips_bit_exact(store_url):
    state = full_state(seed=1)
    store = open_store(store_url)
    commit = store.commit(state, message="everything")
    assert_same(state, store.checkout(commit.id))
    # A second handle on the same store (memory included) sees the same commit.
    assert_same(state, open_store(store_url).checkout("latest"))


def _run_child(code: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env, "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Not memory: a memory store lives in one process, and this reads it from another.
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_checkout_in_fresh_process_with_empty_cache(backend, tmp_path, request):
    url, options = (str(tmp_path / "store"), {}) if backend == "local" else request.getfixturevalue("s3_url")
    store = ckptstore.open(url, storage_options=options, chunk_size_bytes=CHUNK, inline_threshold_bytes=INLINE)
    store.commit(full_state(seed=2), message="for a fresh process")
    store.close()
    _run_child(
        f"""
        import ckptstore, torch
        from states import full_state, assert_same, trained
        store = ckptstore.open({url!r}, storage_options={options!r})
        state = store.checkout("main")
        assert_same(full_state(seed=2), state)
        model, opt, _ = trained(seed=5)
        opt.load_state_dict(state["optimizer"])
        model.load_state_dict(state["model"])
        """,
        {"CKPTSTORE_CACHE_DIR": str(tmp_path / "empty-cache")},
    )


def test_restore_loads_components_in_place(store_url):
    store = open_with_defaults(store_url)
    model, opt, sched = trained(seed=3)
    store.commit({"model": model, "optimizer": opt, "scheduler": sched, "step": 3})
    model2, opt2, sched2 = trained(seed=9, steps=1)
    state = store.restore("latest", {"model": model2, "optimizer": opt2, "scheduler": sched2})
    assert state["step"] == 3
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert model2.out.weight is model2.embed.weight
    with pytest.raises(KeyError, match="ema"):
        store.restore("latest", {"ema": model2})


def test_map_location_and_device_values(store_url):
    store = open_with_defaults(store_url)
    store.commit({"w": torch.ones(2)})
    assert store.checkout(map_location="cpu")["w"].device.type == "cpu"


# -- acceptance 2: dedup and statistics ---------------------------------------------------


def test_identical_recommit_stores_no_new_chunk(store_url):
    store = open_store(store_url)
    state = full_state(seed=4)
    first = store.commit(state)
    assert first.stats.new_chunks > 0 and first.stats.reused_chunks == 0
    chunks, manifests, commits = keys(store, "chunks/"), keys(store, "manifests/"), keys(store, "commits/")
    second = store.commit(state)
    assert second.stats.new_chunks == 0
    assert second.stats.new_bytes == 0
    assert second.stats.reused_chunks == first.stats.new_chunks
    assert second.stats.dedup_ratio == float("inf")
    assert second.manifest == first.manifest
    assert keys(store, "chunks/") == chunks and keys(store, "manifests/") == manifests
    assert keys(store, "commits/") == commits | {commit_key(second.id)}


def test_changing_one_tensor_stores_only_its_chunks(store_url):
    store = open_store(store_url)
    state = {"frozen": torch.randn(20_000), "trained": torch.randn(10_000), "step": 1}
    first = store.commit(state)
    before = keys(store, "chunks/")
    state["trained"] = state["trained"] + 1
    state["step"] = 2
    second = store.commit(state)
    new = keys(store, "chunks/") - before
    expected_chunks = -(-state["trained"].numel() * 4 // CHUNK)
    assert len(new) == expected_chunks == second.stats.new_chunks
    assert second.stats.reused_chunks == first.stats.new_chunks - expected_chunks
    assert second.stats.reused_bytes == 20_000 * 4
    assert 2.9 < second.stats.dedup_ratio < 3.1
    manifest = store.get_manifest(second.manifest)
    trained_blob = manifest.blobs[next(t.blob for t in manifest.tensors if t.path == "trained")]
    assert {chunk_key(c.id) for c in trained_blob.chunks} == new


# -- acceptance 3: refs, revisions and history --------------------------------------------


def test_branch_tag_log_and_revisions(store_url):
    store = open_with_defaults(store_url)
    ids = [store.commit({"step": i}, message=f"m{i}", metadata={"step": i}).id for i in range(4)]
    assert [c.id for c in store.log("main")] == ids[::-1]
    assert store.resolve("main") == store.resolve("latest") == ids[3]
    assert store.resolve("main~2") == store.resolve("main^^") == store.resolve("main~1~1") == ids[1]
    assert store.resolve(ids[2][:8]) == ids[2]
    assert store.checkout("main~3") == {"step": 0}
    with pytest.raises(ckptstore.UnknownRef):
        store.resolve("main~4")

    fork = store.branch("sweep", at="main~1")
    assert fork.id == ids[2]
    sweep = store.commit({"step": 99}, branch="sweep", message="on sweep")
    assert sweep.parents == (ids[2],)
    assert store.branches() == {"main": ids[3], "sweep": sweep.id}
    assert store.resolve("latest") == sweep.id
    assert [c.id for c in store.log("sweep")] == [sweep.id, *ids[:3][::-1]]
    assert store.log("main", limit=2)[1].message == "m2"

    store.tag("release", at=ids[1])
    assert store.tags()["release"] == ids[1]
    with pytest.raises(ckptstore.RefExists):
        store.tag("release", at=ids[2])
    store.tag("release", at=ids[2], force=True)
    assert store.resolve("release") == ids[2]
    store.delete_tag("release")
    assert "release" not in store.tags()
    with pytest.raises(ckptstore.UnknownRef):
        store.delete_tag("release")

    with pytest.raises(ckptstore.RefExists):
        store.branch("sweep", at="main")
    with pytest.raises(ckptstore.ProtectedBranch):  # its commit "on sweep" has no other ref
        store.delete_branch("sweep")
    assert store.delete_branch("sweep", force=True) == sweep.id
    assert list(store.branches()) == ["main"]
    with pytest.raises(ckptstore.InvalidRefName):
        store.tag("latest", at="main")
    for bad in ["", "a..b", "-x", "a/", "x.lock", "a b", "../up", "/abs"]:
        with pytest.raises(ckptstore.InvalidRefName):
            store.branch(bad, at="main")


def test_commit_tags_and_metadata(store_url):
    store = open_with_defaults(store_url)
    c = store.commit({"x": 1}, message="hello", tags=["warmup-done"], metadata={"step": 7, "cfg": {"lr": 0.1}})
    assert store.resolve("warmup-done") == c.id
    got = store.commit_of("warmup-done")
    assert (got.message, got.metadata, got.parents, got.branch) == ("hello", {"step": 7, "cfg": {"lr": 0.1}}, (), "main")
    assert got.created_at.tzinfo is not None


def test_unknown_revisions(store_url):
    store = open_with_defaults(store_url)
    store.commit({"x": 0})
    store.branch("feature", at="main")
    with pytest.raises(ckptstore.UnknownRef) as excinfo:
        store.resolve("featrue")
    assert "feature" in excinfo.value.suggestions and "did you mean 'feature'" in str(excinfo.value)
    with pytest.raises(ckptstore.UnknownRef):
        store.checkout("0" * 32)


# Memory only: it makes a few hundred commits to find two ids with a common 4-digit prefix (a
# minute on moto), and an id prefix is resolved in the catalog, the same on every backend.
def test_ambiguous_revision_prefix():
    store = ckptstore.open("memory://ambiguous")
    seen: dict[str, str] = {}
    for i in range(3000):
        c = store.commit({"x": i})
        if c.id[:4] in seen:
            break
        seen[c.id[:4]] = c.id
    else:
        pytest.fail("no two commit ids shared a 4-digit prefix")
    with pytest.raises(ckptstore.AmbiguousRef) as excinfo:
        store.resolve(c.id[:4])
    assert set(excinfo.value.candidates) == {c.id, seen[c.id[:4]]}
    assert store.resolve(c.id[:12]) == c.id


def test_best_follows_metric_and_direction(store_url):
    store = open_with_defaults(store_url)
    a = store.commit({"s": 1}, metrics={"eval_loss": 2.0})
    assert store.resolve("best") == a.id
    b = store.commit({"s": 2}, metrics={"eval_loss": 1.5})
    store.commit({"s": 3}, metrics={"eval_loss": 1.7})
    store.commit({"s": 4})
    assert store.resolve("best") == b.id
    assert store.resolve("latest") != b.id

    acc = open_with_defaults(sibling(store_url, "acc"), best_metric="accuracy")
    x = acc.commit({"s": 1}, metrics={"accuracy": 0.5})
    acc.commit({"s": 2}, metrics={"accuracy": 0.4})
    assert acc.resolve("best") == x.id
    y = acc.commit({"s": 3}, metrics={"accuracy": torch.tensor(0.9)})
    assert acc.resolve("best") == y.id
    # Per-call setting, HF style: greater_is_better given explicitly.
    z = acc.commit({"s": 4}, metrics={"accuracy": 0.1}, greater_is_better=False)
    assert acc.resolve("best") == z.id


# -- acceptance 5: corruption, no pickle, unsupported values ------------------------------


def _flip_byte(objects, key, position):
    data = bytearray(objects.get(key))
    data[position % len(data)] ^= 0x40
    objects.delete(key)
    objects.put_if_absent(key, bytes(data))


# Local only: it copies the store's directory for each byte it flips (the next test flips a
# byte on every backend).
def test_flipped_byte_in_any_object_fails_only_the_commits_that_use_it(tmp_path):
    original = tmp_path / "original"
    store = ckptstore.open(str(original), chunk_size_bytes=CHUNK, inline_threshold_bytes=INLINE)
    state_a = {"shared": torch.randn(3000), "own": torch.randn(2000), "small": torch.ones(4)}
    a = store.commit(state_a)
    state_b = {**state_a, "own": torch.randn(2000), "small": torch.zeros(4)}
    b = store.commit(state_b)
    states = {a.id: state_a, b.id: state_b}
    uses = {}
    for commit in (a, b):
        manifest = store.get_manifest(commit.manifest)
        uses[commit.id] = {commit_key(commit.id), manifest_key(commit.manifest)} | {chunk_key(c) for c in manifest.chunk_ids()}
    objects = sorted(keys(store, "chunks/") | keys(store, "manifests/") | keys(store, "commits/"))
    store.close()
    for i, key in enumerate(objects):
        for position in (5, 30, -1):  # header, body start, last byte
            copy = tmp_path / f"copy-{i}-{position}"
            shutil.copytree(original, copy, ignore=shutil.ignore_patterns(".catalog"))
            _flip_byte(open_object_store(str(copy)), key, position)
            damaged = ckptstore.open(str(copy))
            for commit_id, state in states.items():
                if key in uses[commit_id]:
                    with pytest.raises(ckptstore.IntegrityError) as excinfo:
                        damaged.checkout(commit_id)
                    assert key in str(excinfo.value)
                else:
                    assert_same(state, damaged.checkout(commit_id))


def test_integrity_error_names_tensor_key_path(store_url):
    store = open_store(store_url)
    store.commit({"model": {"layer.weight": torch.randn(5000)}})
    key = sorted(keys(store, "chunks/"))[0]
    _flip_byte(store.objects, key, 100)
    with pytest.raises(ckptstore.IntegrityError) as excinfo:
        store.checkout()
    assert excinfo.value.key == key and excinfo.value.path == "model/layer.weight"


def _recommit(store, commit, **changes):
    """Store a copy of ``commit``'s object with fields changed (as a writer of another
    version, or a forger, would); return its id."""
    from ckptstore.codec import Kind, encode_object_bytes
    from ckptstore.ids import content_id

    doc = msgpack.unpackb(store.catalog.commit_object(commit.id), raw=False)
    for name, value in changes.items():
        if value is None:
            del doc[name]
        else:
            doc[name] = value
    raw = msgpack.packb(doc, use_bin_type=True)
    cid = content_id(raw)
    store.objects.put_if_absent(commit_key(cid), encode_object_bytes(Kind.COMMIT, raw, compression_level=None))
    return cid


def test_commit_records_its_manifest_size_and_checkout_holds_it_to_that(store_url):
    store = open_with_defaults(store_url)
    state = {"w": torch.randn(100), "step": 3}
    commit = store.commit(state)
    raw_manifest = store.get_manifest(commit.manifest).to_bytes()
    assert commit.manifest_size_bytes == len(raw_manifest) > 0
    assert store.read_commit(commit.id).manifest_size_bytes == len(raw_manifest)
    # A commit of an older writer, without the field: read with the general bound.
    legacy = _recommit(store, commit, manifest_size=None)
    store.close()
    with open_with_defaults(store_url) as store:
        assert store.get_commit(legacy).manifest_size_bytes is None
        assert_same(state, store.checkout(legacy))
        # A commit recording another size: its manifest is refused before it is inflated.
        wrong = _recommit(store, commit, manifest_size=len(raw_manifest) - 1)
        with pytest.raises(ckptstore.IntegrityError) as excinfo:
            store.checkout(wrong)
        assert excinfo.value.key == manifest_key(commit.manifest)
        assert_same(state, store.checkout(commit.id))
        # A size of the wrong type is a malformed commit.
        with pytest.raises(ckptstore.IntegrityError, match="malformed commit"):
            store.read_commit(_recommit(store, commit, manifest_size="123"))


def test_config_checksum_from_store_format_3_and_older_configs_still_open(store_url):
    from ckptstore.codec import Kind, encode_object_bytes
    from ckptstore.config import CONFIG_KEY, StoreConfig

    new = sibling(store_url, "new")
    open_with_defaults(new, chunk_size_bytes=8192).close()
    with open_with_defaults(new, create=False) as store:
        assert store.config.format == 3 and store.config.chunk_size_bytes == 8192
    # A format-2 config (no checksum), as stores made before format 3 have.
    old = StoreConfig(format=2, chunk_size_bytes=8192)
    assert b"checksum" not in old.to_bytes()
    old_url, options = sibling(store_url, "old")
    open_object_store(old_url, storage_options=options).put_if_absent(CONFIG_KEY, encode_object_bytes(Kind.CONFIG, old.to_bytes(), compression_level=None))
    with open_with_defaults((old_url, options), create=False) as store:
        assert store.config == old
        store.commit({"w": torch.ones(3)})
    # A changed field under a checksum, or a checksum in a format-2 config, is refused.
    doc = msgpack.unpackb(StoreConfig(chunk_size_bytes=4096).to_bytes())
    for changed in ({**doc, "chunk_size_bytes": 8192}, {**doc, "format": 2}):
        with pytest.raises(ckptstore.IntegrityError, match="checksum"):
            StoreConfig.from_bytes(msgpack.packb(changed))


def test_checkout_never_unpickles(store_url, monkeypatch):
    store = open_with_defaults(store_url)
    state = full_state(seed=6)
    store.commit(state)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on the checkout path")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert_same(state, open_with_defaults(store_url).checkout())


class Custom:
    pass


#: Values a commit refuses, and the key path its error names.
UNSUPPORTED = [
    ({"model": {"fn": lambda x: x}}, "model/fn"),
    ({"opt": [1, 2, Custom()]}, "opt/2"),
    ({"cfg": {"keys": {(1, 2): 3}}}, "cfg/keys"),
    ({"s": {1, 2}}, "s"),
    ({"sparse": torch.eye(3).to_sparse()}, "sparse"),
]


def test_unsupported_value_names_key_path_and_moves_nothing(store_url):
    store = open_with_defaults(store_url)  # one store for every value: each refusal moves nothing
    store.commit({"ok": 1})
    for value, path in UNSUPPORTED:
        refs_before = (store.branches(), store.tags())
        objects_before = keys(store, "")
        with pytest.raises(TypeError) as excinfo:
            store.commit(value)
        assert isinstance(excinfo.value, ckptstore.UnsupportedValue), path
        assert excinfo.value.path == path and path in str(excinfo.value)
        assert (store.branches(), store.tags()) == refs_before, path
        assert keys(store, "") == objects_before, path


# -- acceptance 6: the catalog is a rebuildable cache -------------------------------------


def test_deleting_catalog_loses_nothing(store_url):
    store = open_with_defaults(store_url)
    for i in range(3):
        store.commit({"i": i}, metrics={"eval_loss": 3.0 - i}, metadata={"step": i})
    store.branch("fork", at="main~1")
    store.commit({"i": 10}, branch="fork")
    store.tag("v1", at="main~2")
    before = (store.branches(), store.tags(), store.log("main"), store.log("fork"))
    catalog_path = store.catalog.path  # local: in the store's directory; S3: in the cache; memory: none
    store.close()
    if catalog_path is not None:
        shutil.rmtree(os.path.dirname(catalog_path))
    reopened = open_with_defaults(store_url)
    after = (reopened.branches(), reopened.tags(), reopened.log("main"), reopened.log("fork"))
    assert after == before
    assert reopened.catalog.commit_ids() == {c.id for c in before[2] + before[3]}


def test_catalog_reconciles_with_refs_moved_by_another_handle(store_url):
    one, two = open_with_defaults(store_url), open_with_defaults(store_url)
    c = two.commit({"x": 1})
    assert one.resolve("main") == c.id and one.log()[0].id == c.id
    two.branch("other", at="main")
    assert open_with_defaults(store_url).catalog.refs("heads") == {"main": c.id, "other": c.id}


def test_open_missing_store_without_create(store_url):
    with pytest.raises(ckptstore.StoreNotFound):
        open_with_defaults(store_url, create=False)


def test_branches_and_tags_share_one_namespace(store_url):
    store = open_with_defaults(store_url)
    store.commit({"x": 1})
    for name in ("latest", "best"):
        with pytest.raises(ckptstore.InvalidRefName):
            store.commit({"x": 2}, branch=name)
    with pytest.raises(ckptstore.InvalidRefName):
        store.commit({"x": 2}, tags=["main"])
    store.tag("v1", at="main")
    with pytest.raises(ckptstore.InvalidRefName):
        store.branch("v1", at="main")
    store.branch("exp/a", at="main")
    for clash in ("exp", "exp/a/b"):
        with pytest.raises(ckptstore.InvalidRefName, match="clashes"):
            store.branch(clash, at="main")
    for bad in ("a/-b", "a/_b", "a//b"):
        with pytest.raises(ckptstore.InvalidRefName):
            store.branch(bad, at="main")
    assert store.branches().keys() == {"main", "exp/a"}


def test_nan_metric_never_becomes_best(store_url):
    store = open_with_defaults(store_url)
    a = store.commit({"s": 1}, metrics={"eval_loss": 1.0})
    store.commit({"s": 2}, metrics={"eval_loss": float("nan")})
    assert store.resolve("best") == a.id


def test_every_error_pickles_as_itself_with_its_attributes():
    """Errors cross process boundaries (torch.distributed hands a rank's error to the others,
    multiprocessing returns a worker's): each comes back as its own class, same message and
    attributes, although most take keyword-only arguments that pickle's default would lose."""
    import inspect
    import pickle

    from ckptstore import errors

    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, errors.CkptStoreError)]
    assert len(classes) > 20
    for cls in classes:
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        positional = [f"{p.name}-value" for p in params if p.default is p.empty and p.kind is not p.KEYWORD_ONLY]
        keywords = {p.name: f"{p.name}-value" for p in params if p.default is p.empty and p.kind is p.KEYWORD_ONLY}
        try:
            error = cls(*positional, **keywords)
        except (TypeError, AttributeError, ValueError):  # wants a non-str argument: the message form is enough
            error = errors._rebuild_error(cls, ("message",), {"detail": 1})
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is cls and str(copy) == str(error) and vars(copy) == vars(error), cls.__name__
