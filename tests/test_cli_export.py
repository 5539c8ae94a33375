"""``store.export`` and ``ckpt export``: nothing at the target is replaced without
``force=True`` / ``--force``, every path error is typed and names the path, and
``--format pt`` writes the whole state as one ``torch.save`` file that
``torch.load(weights_only=True)`` reads back as ``store.checkout`` returns it.

The CLI runs in this process as the ``ckpt`` script runs it (``ckptstore.cli.main``)."""

from __future__ import annotations

import contextlib
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import Run, ckpt
from safetensors.torch import load_file

import ckptstore
from ckptstore.errors import InvalidOption, StorageError, TargetExists, UnsupportedValue


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    embedding = torch.nn.Parameter(torch.randn(16, 8, generator=g))
    model = OrderedDict(
        [
            ("embed.weight", embedding),
            ("encoder.0.weight", torch.randn(8, 8, generator=g)),
            ("encoder.0.bias", torch.randn(8, generator=g)),
            ("lm_head.weight", embedding),
        ]
    )
    model._metadata = OrderedDict([("", {"version": 1}), ("encoder.0", {"version": 2})])  # as nn.Module.state_dict() leaves it
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(16, 8, generator=g)}, 1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 8, generator=g)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False, "foreach": None, "name": "all"}],
    }  # fmt: skip
    extra = {
        "half": torch.randn(5, generator=g).to(torch.bfloat16), "mask": torch.tensor([True, False, True]), "codes": torch.arange(-4, 4, dtype=torch.int8),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]), "scalar": torch.tensor(7), "big": 2**70, "blob": b"\x00\xffraw", "dtype": torch.float16, "size": torch.Size([2, 3]),
    }  # fmt: skip
    return {"model": model, "optimizer": optimizer, "extra": extra, "step": 100 + seed}


def _store(tmp_path: Path) -> tuple[Path, ckptstore.Store, list[str]]:
    url = tmp_path / "store"
    store = ckptstore.open(str(url))
    ids = [store.commit(_state(seed), message=f"step {seed}").id for seed in (1, 2)]
    return url, store, ids


def _snapshot(path: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``path`` (or ``path`` itself): its bytes (None for a folder) and mtime."""
    if not path.is_dir():
        return {".": (path.read_bytes(), path.stat().st_mtime_ns)}
    found = {".": (None, path.stat().st_mtime_ns)}
    for p in sorted(path.rglob("*")):
        found[str(p.relative_to(path))] = (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
    return found


def _siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


def _bits_equal(a: object, b: object, where: str = "") -> None:
    """``a`` and ``b`` are the same structure (types included) with bit-identical tensors."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.contiguous().reshape(-1).view(torch.uint8).tolist(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _bits_equal(a[k], b[k], f"{where}/{k}")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _bits_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _refused_in_one_line(run: Run, path: Path, *words: str) -> None:
    assert run.rc == 1, run
    assert run.out == "", run
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), run
    assert str(path) in lines[0], run
    for word in words:
        assert word in lines[0], run
    _in_cli_words(run)


def _in_cli_words(run: Run) -> None:
    """No Python keyword syntax (``force=True``, ``exclude=[...]``) and no traceback."""
    assert not re.search(r"\w=(True|False|None|\[)", run.err) and "Traceback" not in run.err, run


# -- nothing existing is replaced without force -----------------------------------------------


@pytest.mark.parametrize(
    "name,options",
    [("model.pt", []), ("model.safetensors", []), ("state.bin", ["--format", "pt"]), ("weights", ["--format", "safetensors"])],
)
def test_an_existing_file_is_refused_and_left_byte_identical_until_forced(tmp_path, name, options):
    url, store, (first, second) = _store(tmp_path)
    target = tmp_path / name
    assert ckpt(url, "export", first, str(target), *options).rc == 0
    before, beside = _snapshot(target), _siblings(target)
    fmt = options[1] if options else None

    with pytest.raises(TargetExists) as caught:
        store.export(second, str(target), format=fmt)
    assert isinstance(caught.value, FileExistsError) and caught.value.path == str(target)
    assert str(target) in str(caught.value)
    refused = ckpt(url, "export", second, str(target), *options)
    _refused_in_one_line(refused, target, "--force")
    assert _snapshot(target) == before and _siblings(target) == beside  # no temp file or lock left either

    forced = ckpt(url, "export", second, str(target), *options, "--force")
    assert forced.rc == 0, forced
    assert forced.out.splitlines() == [str(target)]
    assert _snapshot(target) != before and _siblings(target) == beside
    if name.endswith(".safetensors") or fmt == "safetensors":
        loaded = load_file(str(target))
        _bits_equal(loaded["encoder.0.weight"], store.checkout(second)["model"]["encoder.0.weight"])
    else:
        loaded = torch.load(target, weights_only=True)
        _bits_equal(loaded, store.checkout(second) if fmt == "pt" else store.checkout(second)["model"])


def test_a_directory_with_files_is_refused_and_left_as_it_was_until_forced(tmp_path):
    url, store, (first, second) = _store(tmp_path)
    target = tmp_path / "release"
    assert ckpt(url, "export", first, str(target), "--max-shard-size", "300B").rc == 0
    (target / "README.md").write_text("my notes")
    (target / "sub").mkdir()
    (target / "sub" / "keep.txt").write_text("kept")
    before, beside = _snapshot(target), _siblings(target)
    assert "model.safetensors.index.json" in before

    with pytest.raises(TargetExists) as caught:
        store.export(second, str(target), max_shard_size_bytes=300)
    assert caught.value.path == str(target)
    _refused_in_one_line(ckpt(url, "export", second, str(target)), target, "--force")
    assert _snapshot(target) == before and _siblings(target) == beside

    # Forced, the swap replaces the export's own files and keeps the others.
    assert ckpt(url, "export", second, str(target), "--force").rc == 0
    assert sorted(os.listdir(target)) == ["README.md", "model.safetensors", "sub"]
    assert (target / "README.md").read_text() == "my notes" and (target / "sub" / "keep.txt").read_text() == "kept"
    _bits_equal(load_file(str(target / "model.safetensors"))["encoder.0.bias"], store.checkout(second)["model"]["encoder.0.bias"])


def test_an_empty_directory_is_exported_into_without_force(tmp_path):
    url, store, (first, _) = _store(tmp_path)
    target = tmp_path / "empty"
    target.mkdir()
    assert store.export(first, str(target)) == ["model.safetensors"]
    assert sorted(os.listdir(target)) == ["model.safetensors"]


# -- every other path error is a typed StorageError naming the path ---------------------------


def _refused_as_storage_error(url: Path, store: ckptstore.Store, rev: str, target: Path, options: list[str], *, named: Path) -> None:
    fmt = options[1] if options else None
    for force in (False, True):
        with pytest.raises(StorageError) as caught:
            store.export(rev, str(target), format=fmt, force=force)
        assert not isinstance(caught.value, TargetExists) and str(named) in str(caught.value)
        run = ckpt(url, "export", rev, str(target), *options, *(["--force"] if force else []))
        _refused_in_one_line(run, named)
        assert "--force" not in run.err  # forcing would not help


def test_a_file_where_the_directory_goes_and_a_directory_where_the_file_goes(tmp_path):
    url, store, (first, _) = _store(tmp_path)
    a_file = tmp_path / "release"
    a_file.write_bytes(b"not a directory")
    before = _snapshot(a_file)
    _refused_as_storage_error(url, store, first, a_file, [], named=a_file)
    assert _snapshot(a_file) == before

    a_dir = tmp_path / "model.pt"
    a_dir.mkdir()
    (a_dir / "inside").write_text("x")
    before = _snapshot(a_dir)
    for options in ([], ["--format", "pt"], ["--format", "safetensors"]):
        _refused_as_storage_error(url, store, first, a_dir, options, named=a_dir)
    assert _snapshot(a_dir) == before


@pytest.mark.parametrize("name,options", [("release", []), ("model.pt", []), ("model.safetensors", []), ("all.pt", ["--format", "pt"])])
def test_a_missing_parent_or_a_parent_that_is_a_file_is_refused_naming_it(tmp_path, name, options):
    url, store, (first, _) = _store(tmp_path)
    missing = tmp_path / "no" / "such"
    _refused_as_storage_error(url, store, first, missing / name, options, named=missing)
    assert not (tmp_path / "no").exists()  # nothing made on the way

    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file")
    _refused_as_storage_error(url, store, first, a_file / name, options, named=a_file)
    assert a_file.read_text() == "a file"


@contextlib.contextmanager
def _unwritable_directory(tmp_path: Path):
    """A directory this process cannot create files in: one made read-only, or, for root
    (whom permissions do not stop), sysfs, which refuses new files to everyone."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            yield locked
        finally:
            locked.chmod(0o755)
        return
    sysfs = Path("/sys")
    try:
        os.close(os.open(sysfs / "ckptstore-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        yield sysfs
        return
    os.unlink(sysfs / "ckptstore-probe")
    pytest.skip("running as root, and /sys accepts new files here: no directory refuses root's writes")


@pytest.mark.parametrize("name,options", [("release", []), ("model.pt", []), ("model.safetensors", []), ("all.pt", ["--format", "pt"])])
def test_a_directory_that_cannot_be_written_is_refused_naming_the_path(tmp_path, name, options):
    url, store, (first, _) = _store(tmp_path)
    with _unwritable_directory(tmp_path) as locked:
        before = sorted(os.listdir(locked))
        with pytest.raises(StorageError) as caught:
            store.export(first, str(locked / name), format=options[1] if options else None)
        assert str(locked / name) in str(caught.value)
        _refused_in_one_line(ckpt(url, "export", first, str(locked / name), *options), locked / name)
        assert sorted(os.listdir(locked)) == before


# -- --format pt: the whole state, as checkout returns it, in one plain file --------------------


def test_format_pt_writes_the_whole_state_bit_exact_with_tied_weights_shared(tmp_path):
    url, store, (_, second) = _store(tmp_path)
    target = tmp_path / "state.pt"
    run = ckpt(url, "export", second, str(target), "--format", "pt")
    assert run.rc == 0 and run.out.splitlines() == [str(target)], run
    loaded = torch.load(target, weights_only=True)
    _bits_equal(loaded, store.checkout(second))
    model = loaded["model"]
    assert model["embed.weight"].untyped_storage().data_ptr() == model["lm_head.weight"].untyped_storage().data_ptr()
    assert type(model["embed.weight"]) is torch.nn.Parameter
    assert model["encoder.0.weight"].untyped_storage().data_ptr() != model["embed.weight"].untyped_storage().data_ptr()
    assert sorted(os.listdir(tmp_path)) == ["state.pt", "store"]  # no temp or lock file left


def test_format_pt_honours_include_exclude_and_component(tmp_path):
    url, store, (_, second) = _store(tmp_path)
    assert ckpt(url, "export", second, str(tmp_path / "no-opt.pt"), "--format", "pt", "--exclude", "optimizer").rc == 0
    loaded = torch.load(tmp_path / "no-opt.pt", weights_only=True)
    assert set(loaded) == {"model", "extra", "step"}
    _bits_equal(loaded, store.checkout(second, exclude=["optimizer"]))

    assert ckpt(url, "export", second, str(tmp_path / "some.pt"), "--format", "pt", "--include", "model/encoder*", "--include", "step").rc == 0
    _bits_equal(torch.load(tmp_path / "some.pt", weights_only=True), store.checkout(second, include=["model/encoder*", "step"]))

    store.export(second, str(tmp_path / "opt.pt"), format="pt", component="optimizer")
    _bits_equal(torch.load(tmp_path / "opt.pt", weights_only=True), store.checkout(second)["optimizer"])

    # Without --format, a .pt path keeps its meaning: the model component, a state dict.
    store.export(second, str(tmp_path / "model.pt"))
    _bits_equal(torch.load(tmp_path / "model.pt", weights_only=True), store.checkout(second)["model"])


def test_format_pt_refuses_a_value_weights_only_cannot_read_naming_its_key_path(tmp_path):
    url = tmp_path / "store"
    store = ckptstore.open(str(url))
    commit = store.commit({"model": {"w": torch.ones(3)}, "stats": {"hist": [1, np.arange(4)]}})
    target = tmp_path / "state.pt"
    with pytest.raises(UnsupportedValue) as caught:
        store.export(commit.id, str(target), format="pt")
    assert caught.value.path == "stats/hist/1"
    run = ckpt(url, "export", commit.id, str(target), "--format", "pt")
    assert run.rc == 1 and "stats/hist/1" in run.err and len(run.err.splitlines()) == 1, run
    _in_cli_words(run)
    assert sorted(os.listdir(tmp_path)) == ["store"]
    # Leaving it out works.
    assert ckpt(url, "export", commit.id, str(target), "--format", "pt", "--exclude", "stats").rc == 0
    _bits_equal(torch.load(target, weights_only=True), store.checkout(commit.id, exclude=["stats"]))


def test_an_unknown_format_is_refused_before_anything_is_written(tmp_path):
    url, store, (first, _) = _store(tmp_path)
    with pytest.raises(InvalidOption, match="format"):
        store.export(first, str(tmp_path / "x"), format="zip")
    run = ckpt(url, "export", first, str(tmp_path / "x"), "--format", "zip")
    assert run.rc == 2 and "zip" in run.err, run
    assert sorted(os.listdir(tmp_path)) == ["store"]
