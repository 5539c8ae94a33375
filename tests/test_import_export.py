"""Importing checkpoints that cannot be trusted, and exports that cannot be mixed, torn or
redirected.

Import: a malformed safetensors file (overlapping tensors, holes, a name twice, a
``__metadata__`` that is not an object of strings, a lone surrogate), a sharded directory
whose index disagrees with its shards, malformed ``model.safetensors.index.json`` or
``trainer_state.json``, and a FIFO where a file should be each raise ``InvalidCheckpoint``
naming the file, and leave the store as it was. Each file is mapped once, so a directory of
hundreds of tensors imports under a low descriptor limit. Checkpoint files may be symlinks
(Hugging Face cache snapshots); other files are not followed.

Export: a directory always holds exactly one export (a failed or killed export leaves the old
one; a second export at the same time is refused with ``ExportBusy``; a user's other files are
kept), temp files are created exclusively under random names, and ``.pt`` export honours
``include``.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.errors import ExportBusy, InvalidCheckpoint, TargetExists
from ckptstore.formats.safetensors import INDEX_NAME, read_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 120


# -- helpers ---------------------------------------------------------------------------------


def _store(tmp_path: Path) -> ckptstore.Store:
    return ckptstore.open(str(tmp_path / "store"), chunk_size_bytes=256, inline_threshold_bytes=64)


def _stored(tmp_path: Path) -> dict[str, bytes]:
    """Every object of the store at ``tmp_path / "store"`` (commits, manifests, chunks, refs),
    by key, with its bytes."""
    root = tmp_path / "store"
    out = {}
    for kind in ("commits", "manifests", "chunks", "refs"):
        for path in sorted((root / kind).rglob("*")) if (root / kind).exists() else ():
            if path.is_file() and not path.name.startswith("."):
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def _import_refused(tmp_path: Path, source: Path, match: str) -> InvalidCheckpoint:
    """Import ``source`` into a fresh store, expect ``InvalidCheckpoint`` whose message
    matches ``match``, and check that nothing was stored."""
    store = _store(tmp_path)
    before = _stored(tmp_path)
    with pytest.raises(InvalidCheckpoint, match=match) as info:
        store.import_checkpoint(str(source))
    assert _stored(tmp_path) == before
    assert store.branches() == {}
    return info.value


def _safetensors_file(path: Path, header: str | dict, data: bytes) -> Path:
    """A safetensors file with exactly this header text (or dict) and data section."""
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _f32(n: int, offset: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}


def _write_sharded(directory: Path, state: dict[str, torch.Tensor], per_shard: int) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        safetensors_torch.save_file({k: state[k] for k in group}, str(directory / file))
        weight_map.update(dict.fromkeys(group, file))
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return weight_map


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every entry under ``directory`` (hidden ones included), by relative path: a file's
    bytes, a symlink's target."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            out[rel] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def _leftovers(directory: Path) -> list[str]:
    """Entries an export of ``directory`` may leave beside it or in it while it runs."""
    beside = [p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.export")]
    inside = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] if directory.is_dir() else []
    return beside + inside


def _run_child(code: str, *, timeout_s: float = CHILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter importing this tree's ckptstore; a child that
    outlives ``timeout_s`` (an import blocked forever) fails the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish in {timeout_s} s (blocked)")


def _state(seed: int, n: int = 4, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(size, generator=g) for i in range(n)}


# -- 17.6: a sharded import refuses what its index and shards disagree on --------------------


def test_index_listing_a_tensor_no_shard_holds_is_refused(tmp_path):
    src = tmp_path / "src"
    weight_map = _write_sharded(src, _state(0), per_shard=2)
    weight_map["layer9.weight"] = "model-00001-of-00002.safetensors"
    (src / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    error = _import_refused(tmp_path, src, r"layer9\.weight")
    assert error.path == str(src / INDEX_NAME)


@pytest.mark.parametrize("change", ["elsewhere", "unlisted"])
def test_shard_holding_a_tensor_the_index_places_elsewhere_or_omits_is_refused(tmp_path, change):
    """A shard and the index must agree on every tensor: a mismatch is what a mix of two
    exports looks like, so the import refuses rather than guess which is right."""
    src = tmp_path / "src"
    weight_map = _write_sharded(src, _state(0), per_shard=2)
    assert weight_map["layer1.weight"] == "model-00001-of-00002.safetensors"
    if change == "elsewhere":  # layer1 also written into shard 2, which the index names for it
        weight_map["layer1.weight"] = "model-00002-of-00002.safetensors"
    else:
        del weight_map["layer1.weight"]
    (src / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    error = _import_refused(tmp_path, src, r"layer1\.weight")
    assert error.path == str(src / "model-00001-of-00002.safetensors")


@pytest.mark.parametrize(
    ("header", "data_size", "match"),
    [
        ({"a": _f32(4, 0), "b": _f32(4, 8)}, 24, "overlap"),
        ({"a": _f32(4, 0), "b": _f32(4, 24)}, 40, "belong to no tensor"),
        ({"a": _f32(4, 0)}, 24, "belong to no tensor"),  # bytes after the last tensor
        (f'{{"a": {json.dumps(_f32(4, 0))}, "a": {json.dumps(_f32(4, 16))}}}', 32, "twice"),
        ('{"a": {"dtype": "F32", "dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}', 16, "twice"),
        ({"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, 16, "malformed entry"),
    ],
    ids=["overlap", "hole", "trailing-bytes", "duplicate-name", "duplicate-field", "bool-dimension"],
)
def test_malformed_safetensors_layout_is_refused(tmp_path, header, data_size, match):
    src = tmp_path / "src"
    path = _safetensors_file(src / "model.safetensors", header, bytes(range(data_size)))
    error = _import_refused(tmp_path, src, match)
    assert error.path == str(path)


# -- 16.9: __metadata__ and lone surrogates ----------------------------------------------------


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"__metadata__": ["format", "pt"], "w": _f32(4, 0)}, "__metadata__"),
        ({"__metadata__": {"step": 5}, "w": _f32(4, 0)}, "__metadata__"),
        (f'{{"w\\udcff": {json.dumps(_f32(4, 0))}}}', "not valid Unicode"),
        (f'{{"__metadata__": {{"note": "\\ud800"}}, "w": {json.dumps(_f32(4, 0))}}}', "not valid Unicode"),
    ],
    ids=["metadata-list", "metadata-int-value", "surrogate-name", "surrogate-metadata"],
)
def test_malformed_metadata_or_lone_surrogate_is_refused(tmp_path, header, match):
    path = _safetensors_file(tmp_path / "w.safetensors", header, bytes(16))
    error = _import_refused(tmp_path, path, match)
    assert error.path == str(path)


# -- 17.17: malformed index.json and trainer_state.json ----------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b'{"weight_map": ["model-00001-of-00001.safetensors"]}',
        b'{"weight_map": {"w": 7}}',
        b'["weight_map"]',
        b'{"weight_map": {"w": "model.safetensors"',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"weight_map": {"w": "\xff.safetensors"}}',
        b'{"weight_map": {"w": ".."}}',
    ],
    ids=["weight-map-list", "shard-not-str", "not-an-object", "truncated", "deep", "not-utf8", "dotdot"],
)
def test_malformed_index_is_refused_naming_it(tmp_path, text):
    src = tmp_path / "src"
    src.mkdir()
    safetensors_torch.save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    (src / INDEX_NAME).write_bytes(text)
    error = _import_refused(tmp_path, src, INDEX_NAME.replace(".", r"\."))
    assert error.path == str(src / INDEX_NAME)


@pytest.mark.parametrize(
    "text",
    [
        b'["global_step", 5]',
        b'{"global_step": 5,',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"global_step": 5, "note": "\xff\xfe"}',
        b'{"global_step": true}',
        b'{"global_step": "12"}',
        b'{"global_step": 5, "global_step": 6}',
        b'{"global_step": 5, "log_history": [{"note": "\\udcff"}]}',
    ],
    ids=["list", "truncated", "deep", "not-utf8", "step-true", "step-str", "duplicate-key", "surrogate"],
)
def test_malformed_trainer_state_is_refused_naming_it(tmp_path, text):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    safetensors_torch.save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    (src / "trainer_state.json").write_bytes(text)
    error = _import_refused(tmp_path, src, r"trainer_state\.json")
    assert error.path == str(src / "trainer_state.json")


def test_trainer_state_step_and_nan_are_imported(tmp_path):
    src = tmp_path / "checkpoint-7"
    src.mkdir()
    safetensors_torch.save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    (src / "trainer_state.json").write_text('{"global_step": 7, "log_history": [{"grad_norm": NaN}]}')
    commit = _store(tmp_path).import_checkpoint(str(src))
    assert commit.metadata["step"] == 7 and type(commit.metadata["step"]) is int


# -- 17.14: a FIFO never blocks an import ------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json", "optimizer.pt"])
def test_fifo_in_place_of_a_checkpoint_file_is_refused_without_blocking(tmp_path, name):
    src = tmp_path / "checkpoint-1"
    src.mkdir()
    if name != "model.safetensors":
        safetensors_torch.save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    os.mkfifo(src / name)
    store_root = tmp_path / "store"
    ckptstore.open(str(store_root))
    before = _stored(tmp_path)
    result = _run_child(
        f"""
        import ckptstore
        from ckptstore.errors import InvalidCheckpoint
        store = ckptstore.open({str(store_root)!r})
        try:
            store.import_checkpoint({str(src)!r})
        except InvalidCheckpoint as exc:
            print("refused", exc.path)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"refused {src / name}"
    assert _stored(tmp_path) == before


# -- 16.9: one mapping per file, not one descriptor per tensor ---------------------------------


def test_many_tensors_import_under_a_low_descriptor_limit(tmp_path):
    """400 tensors in one file import with 256 descriptors allowed (each tensor was its own
    np.memmap, and so its own descriptor, and failed with EMFILE), and each is still its own
    blob: two equal tensors are stored once."""
    path = tmp_path / "many.safetensors"
    tensors = {f"t{i:03d}": torch.full((32,), float(i % 200)) for i in range(400)}
    safetensors_torch.save_file(tensors, str(path))
    result = _run_child(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        import torch, ckptstore
        store = ckptstore.open({str(tmp_path / "store")!r}, inline_threshold_bytes=16)
        commit = store.import_checkpoint({str(path)!r})
        model = store.checkout(commit.id)["model"]
        assert len(model) == 400 and all(torch.equal(model[f"t{{i:03d}}"], torch.full((32,), float(i % 200))) for i in range(400))
        print(commit.stats.new_chunks)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == 200  # t000 == t200, ...: one chunk each pair


def test_a_file_is_mapped_once_and_each_tensor_is_its_own_storage(tmp_path):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    path = tmp_path / "mapped.safetensors"
    safetensors_torch.save_file({f"t{i}": torch.randn(1024) for i in range(20)}, str(path))
    descriptors = len(os.listdir("/proc/self/fd"))
    tensors, _ = read_safetensors(str(path))
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert sum(line.endswith(str(path)) for line in maps) == 1
    assert len(os.listdir("/proc/self/fd")) - descriptors < 5  # not one per tensor
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) == 20 and all(t.untyped_storage().nbytes() == t.nbytes for t in tensors.values())


# -- 17.13: symlinks -----------------------------------------------------------------------------


def test_symlinked_checkpoint_files_are_followed_as_in_a_hugging_face_cache(tmp_path):
    """A Hugging Face cache snapshot: every file a symlink into ``blobs/``."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    state = _state(3)
    staging = tmp_path / "staging"
    _write_sharded(staging, state, per_shard=2)
    for i, file in enumerate(sorted(os.listdir(staging))):
        (blobs / f"blob{i}").write_bytes((staging / file).read_bytes())
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snapshot / file)
    commit = _store(tmp_path).import_checkpoint(str(snapshot))
    model = _store(tmp_path).checkout(commit.id)["model"]
    assert set(model) == set(state) and all(torch.equal(model[k], v) for k, v in state.items())


def test_trainer_import_does_not_follow_a_symlink_that_is_not_a_checkpoint_file(tmp_path):
    pytest.importorskip("transformers")
    from ckptstore.integrations.huggingface import FILES_KEY, read_trainer_checkpoint

    secret = tmp_path / "secret.txt"
    secret.write_text("do not store me")
    src = tmp_path / "checkpoint-3"
    src.mkdir()
    safetensors_torch.save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    os.symlink(secret, src / "notes.txt")
    state, _ = read_trainer_checkpoint(str(src))
    assert set(state[FILES_KEY]) == {"config.json"}


# -- 17.7: an export directory holds exactly one export ------------------------------------------


def _two_commits(tmp_path: Path):
    store = _store(tmp_path)
    a = store.commit({"model": _state(1)})
    b = store.commit({"model": _state(2)})
    return store, a, b


def test_failed_export_leaves_the_previous_export_whole(tmp_path):
    store, a, _ = _two_commits(tmp_path)
    out = tmp_path / "out"
    store.export(a.id, str(out), max_shard_size_bytes=256)  # 4 shards
    before = _snapshot(out)
    assert len(before) == 5
    # A commit whose last tensor's chunk is gone: its export fails at the last shard.
    last = _state(5)["layer3.weight"]
    stored = set(_stored(tmp_path))
    store.commit({"only": last}, branch="probe")
    chunks_of_last = {k for k in set(_stored(tmp_path)) - stored if k.startswith("chunks/")}
    c = store.commit({"model": {**_state(4, n=3), "layer3.weight": last}})
    assert chunks_of_last
    for key in chunks_of_last:
        os.unlink(tmp_path / "store" / key)
    with pytest.raises(ckptstore.IntegrityError):
        store.export(c.id, str(out), max_shard_size_bytes=256, force=True)
    assert _snapshot(out) == before
    assert _leftovers(out) == []


def test_export_keeps_a_users_files_and_replaces_only_its_own(tmp_path):
    store, a, b = _two_commits(tmp_path)
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "gpt2"}')
    (out / "README.md").write_text("# release\n")
    (out / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (out / "model-card.safetensors.txt").write_text("not ours")
    os.symlink("config.json", out / "config-link.json")
    os.chmod(out, 0o750)
    inode = (out / "config.json").stat().st_ino
    user_files = {k: v for k, v in _snapshot(out).items()}

    store.export(a.id, str(out), max_shard_size_bytes=256, force=True)
    assert {k for k in _snapshot(out) if k not in user_files} == {INDEX_NAME, *(f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5))}
    files = store.export(b.id, str(out), force=True)  # one shard: the four and the index go
    assert files == ["model.safetensors"]
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "model.safetensors"} == user_files
    assert (out / "config.json").stat().st_ino == inode and os.path.islink(out / "config-link.json")
    assert os.stat(out).st_mode & 0o777 == 0o750
    back = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in _state(2).items())
    assert _leftovers(out) == []


_EXPORT_CHILD = """
import os, signal, sys, time
import ckptstore
store = ckptstore.open({store!r})
mode, started, release = {mode!r}, {started!r}, {release!r}

def progress(phase, done, total):
    if done < total and not os.path.exists(started):  # after the first shard
        open(started, "w").close()
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)

store.export({rev!r}, {out!r}, max_shard_size_bytes=256, force=True, progress=progress)
print("exported")
"""


def _start_export(tmp_path: Path, rev: str, out: Path, mode: str) -> tuple[subprocess.Popen, Path, Path]:
    started, release = tmp_path / f"started-{mode}", tmp_path / f"release-{mode}"
    code = _EXPORT_CHILD.format(store=str(tmp_path / "store"), mode=mode, started=str(started), release=str(release), rev=rev, out=str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not started.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the exporting child never got past its first shard: {child.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return child, started, release


def test_a_second_export_to_the_same_directory_is_refused_while_one_runs(tmp_path):
    store, a, b = _two_commits(tmp_path)
    out = tmp_path / "out"
    child, _, release = _start_export(tmp_path, a.id, out, "wait")
    try:
        with pytest.raises(ExportBusy) as info:
            store.export(b.id, str(out), max_shard_size_bytes=256)
        assert info.value.path == str(out)
        with pytest.raises(ExportBusy):
            store.export(b.id, str(out) + "/")  # the same directory, however it is spelled
    finally:
        release.touch()
        stdout, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0 and "exported" in stdout, stderr[-2000:]
    back = {k: v for name in os.listdir(out) if name.endswith(".safetensors") for k, v in safetensors_torch.load_file(str(out / name)).items()}
    assert set(back) == set(_state(1)) and all(torch.equal(back[k], v) for k, v in _state(1).items())
    store.export(b.id, str(out), max_shard_size_bytes=256, force=True)  # the lock went with the first export
    assert _leftovers(out) == []


def test_a_killed_export_leaves_the_old_export_and_its_lock_is_taken_over(tmp_path):
    store, a, b = _two_commits(tmp_path)
    out = tmp_path / "out"
    store.export(a.id, str(out), max_shard_size_bytes=256)
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    child, _, _ = _start_export(tmp_path, b.id, out, "kill")
    child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    assert _snapshot(out) == before
    store.export(b.id, str(out), max_shard_size_bytes=256, force=True)  # not ExportBusy: the holder is dead
    assert _leftovers(out) == []
    back = {k: v for name in os.listdir(out) if name.endswith(".safetensors") for k, v in safetensors_torch.load_file(str(out / name)).items()}
    assert set(back) == set(_state(2)) and all(torch.equal(back[k], v) for k, v in _state(2).items())
    assert (out / "config.json").read_text() == "{}"


def test_an_export_killed_between_the_renames_of_its_swap_is_put_back(tmp_path):
    """The on-disk state a kill between ``rename(out, old)`` and ``rename(new, out)`` leaves:
    ``out`` missing, the old folder and the complete new one beside it. The next export puts
    the old folder back first, so the user's files in it are not lost."""
    store, a, b = _two_commits(tmp_path)
    out = tmp_path / "out"
    store.export(a.id, str(out), max_shard_size_bytes=256)
    (out / "config.json").write_text('{"model_type": "gpt2"}')
    os.rename(out, tmp_path / f".out.export-old-{'a' * 32}")
    (tmp_path / f".out.export-new-{'b' * 32}").mkdir()
    (tmp_path / f".out.export-new-{'b' * 32}" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(TargetExists):  # put back, and then not replaced unforced
        store.export(b.id, str(out))
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        INDEX_NAME,
    ]
    store.export(b.id, str(out), force=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_text() == '{"model_type": "gpt2"}'
    back = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in _state(2).items())
    assert _leftovers(out) == []


def test_export_through_a_symlinked_directory_writes_where_it_points(tmp_path):
    store, a, _ = _two_commits(tmp_path)
    real = tmp_path / "volume" / "release"
    real.mkdir(parents=True)
    (real / "README.md").write_text("kept")
    os.symlink(real, tmp_path / "release")
    store.export(a.id, str(tmp_path / "release"), force=True)
    assert os.path.islink(tmp_path / "release")
    assert sorted(os.listdir(real)) == ["README.md", "model.safetensors"]


def test_pt_export_honours_include_and_exclude(tmp_path):
    store = _store(tmp_path)
    commit = store.commit({"model": _state(1), "optimizer": {"lr": 0.1}})
    out = tmp_path / "model.pt"
    store.export(commit.id, str(out), include=["model/layer1.weight", "model/layer2.weight"], exclude=["model/layer2.weight"])
    assert set(torch.load(out, weights_only=True)) == {"layer1.weight"}
    store.export(commit.id, str(out), force=True)
    assert set(torch.load(out, weights_only=True)) == set(_state(1))


# -- 17.10: temp files are exclusive and randomly named ----------------------------------------


def test_pt_export_does_not_write_through_a_planted_symlink(tmp_path):
    store = _store(tmp_path)
    commit = store.commit({"model": _state(1)})
    out_dir = tmp_path / "shared"
    out_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (f".tmp-{os.getpid()}-model.pt", ".model.pt.tmp", "model.pt.tmp"):
        os.symlink(victim, out_dir / name)
    store.export(commit.id, str(out_dir / "model.pt"))
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(out_dir / "model.pt")
    assert set(torch.load(out_dir / "model.pt", weights_only=True)) == set(_state(1))
    assert sorted(p.name for p in out_dir.iterdir() if not p.is_symlink()) == ["model.pt"]
