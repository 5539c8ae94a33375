"""Importing thousands of tensors under a low descriptor limit (``ulimit -n 256``).

A safetensors file is memory-mapped once (the ``safetensors`` package's ``safe_open``) and
its tensors are views of that mapping; the mapping holds no file descriptor, so neither the
number of tensors nor the number of files is bounded by ``RLIMIT_NOFILE`` (a ``mmap.mmap``
per shard kept a duplicate descriptor open for the whole commit: a directory of 300 shards
failed with EMFILE under 256). 5,000 tensors are spread four ways: 5,000 files of one, 500
files of ten, 20 of 250, and one file of all. The import runs in a child with the limit; the
parent checks the commit out and compares every tensor bit for bit with what was written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.formats.safetensors import INDEX_NAME, read_directory

safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR_LIMIT = 256
DTYPES = (torch.float32, torch.bfloat16, torch.int64, torch.float16)


def _tensors(first: int, count: int) -> dict[str, torch.Tensor]:
    """``count`` small tensors of mixed dtypes and sizes, named ``layers.<i>.weight``; float
    ones hold random bits (NaNs and negative zeros included), so equality is bit for bit."""
    g = torch.Generator().manual_seed(first)
    out = {}
    for i in range(first, first + count):
        dtype = DTYPES[i % len(DTYPES)]
        size_bytes = (i % 7 + 1) * 8
        raw = torch.randint(0, 256, (size_bytes,), dtype=torch.uint8, generator=g)
        out[f"layers.{i}.weight"] = raw.view(dtype)
    return out


def _write_sharded(directory: Path, *, shards: int, per_shard: int) -> dict[str, torch.Tensor]:
    """A Hugging Face style directory of ``shards`` files with ``model.safetensors.index.json``."""
    directory.mkdir()
    written: dict[str, torch.Tensor] = {}
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = _tensors(s * per_shard, per_shard)
        safetensors_torch.save_file(tensors, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
        written.update(tensors)
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return written


def _import_under_limit(store_path: Path, source: Path) -> str:
    """Import ``source`` in a child allowed :data:`DESCRIPTOR_LIMIT` descriptors; the commit id."""
    code = f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, ({DESCRIPTOR_LIMIT}, {DESCRIPTOR_LIMIT}))
        import ckptstore
        store = ckptstore.open({str(store_path)!r})
        print(store.import_checkpoint({str(source)!r}).id)
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()[-1]


def _assert_bit_exact(store_path: Path, commit_id: str, written: dict[str, torch.Tensor]) -> None:
    model = ckptstore.open(str(store_path)).checkout(commit_id)["model"]
    assert sorted(model) == sorted(written)
    for name, tensor in written.items():
        got = model[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_directory_of_500_shards_imports_under_256_descriptors(tmp_path):
    """5,000 tensors in 500 shard files: more files than descriptors allowed."""
    written = _write_sharded(tmp_path / "model", shards=500, per_shard=10)
    commit_id = _import_under_limit(tmp_path / "store", tmp_path / "model")
    _assert_bit_exact(tmp_path / "store", commit_id, written)


def test_a_directory_of_5000_files_of_one_tensor_imports_under_256_descriptors(tmp_path):
    """The issue's case at its worst: 5,000 tensors, each in a file of its own, so twenty
    times as many files as descriptors allowed."""
    written = _write_sharded(tmp_path / "model", shards=5000, per_shard=1)
    commit_id = _import_under_limit(tmp_path / "store", tmp_path / "model")
    _assert_bit_exact(tmp_path / "store", commit_id, written)


def test_a_directory_of_20_shards_of_250_tensors_imports_under_256_descriptors(tmp_path):
    written = _write_sharded(tmp_path / "model", shards=20, per_shard=250)
    commit_id = _import_under_limit(tmp_path / "store", tmp_path / "model")
    _assert_bit_exact(tmp_path / "store", commit_id, written)


def test_one_file_of_5000_tensors_imports_under_256_descriptors(tmp_path):
    written = _tensors(0, 5000)
    safetensors_torch.save_file(written, str(tmp_path / "model.safetensors"))
    commit_id = _import_under_limit(tmp_path / "store", tmp_path / "model.safetensors")
    _assert_bit_exact(tmp_path / "store", commit_id, written)


def test_read_tensors_hold_no_descriptor(tmp_path):
    """While the tensors of 300 shards are alive (as during a commit), no descriptor is open
    for any of them, and each file is still mapped once."""
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd and /proc/self/maps")
    written = _write_sharded(tmp_path / "model", shards=300, per_shard=2)
    before = len(os.listdir("/proc/self/fd"))
    tensors = read_directory(str(tmp_path / "model"))
    assert len(os.listdir("/proc/self/fd")) - before < 5
    maps = Path("/proc/self/maps").read_text()
    assert all(maps.count(str(tmp_path / "model" / f"model-{s + 1:05d}-of-00300.safetensors")) == 1 for s in range(300))
    assert all(torch.equal(tensors[name].view(torch.uint8), tensor.view(torch.uint8)) for name, tensor in written.items())
