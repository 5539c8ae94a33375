"""The bytes stored are the bytes hashed (issue 17, item 2): a state that changes while it is
committed, by another thread or by another process writing the file an import maps, fails the
commit with SourceChanged, stores no chunk whose bytes differ from its id, and never leaves a
chunk that a later clean commit would trust and reuse."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import SourceChanged
from ckptstore.manifest import ChunkRef
from ckptstore.pipeline import ChunkReader

SETTINGS = {"chunk_size_bytes": 64 << 10, "inline_threshold_bytes": 1024}


def assert_every_chunk_is_its_id(store) -> int:
    """Read every stored chunk through its chain and check it hashes to its name; how many."""
    reader = ChunkReader(store.objects)
    checked = 0
    for key in store.objects.list("chunks/"):
        chunk_id = key.rsplit("/", 1)[-1]
        chain = reader.bases_of(chunk_id)
        size = int.from_bytes(store.objects.get_range(key, 8, 16), "little")
        target = np.empty(size, dtype=np.uint8)
        reader.read_into(ChunkRef(chunk_id, size, chain), target)  # raises on a mismatch
        checked += 1
    return checked


def test_a_tensor_written_by_another_thread_during_a_blocking_commit(tmp_path):
    store = ckptstore.open(str(tmp_path / "s"), **SETTINGS)
    original = torch.randn(4 << 20)  # 16 MiB: 256 chunks
    weights = original.clone()
    stop = threading.Event()

    def train() -> None:  # an optimizer step in another thread, in place
        g = torch.Generator().manual_seed(1)
        while not stop.is_set():
            index = torch.randint(0, weights.numel(), (4096,), generator=g)
            weights[index] += 1.0

    thread = threading.Thread(target=train)
    thread.start()
    try:
        with pytest.raises(SourceChanged) as info:
            for _ in range(20):  # each commit reads every byte; one that races the writer fails
                store.commit({"model": {"w": weights}})
    finally:
        stop.set()
        thread.join()
    assert info.value.path == "model/w"
    assert_every_chunk_is_its_id(store)  # (what raced was removed: maybe every chunk)
    weights.copy_(original)  # the clean state: whatever was stored meanwhile is trusted only by its id
    commit = store.commit({"model": {"w": weights}})
    assert torch.equal(store.checkout(commit.id)["model"]["w"], original)
    assert store.fsck(read_data=True).ok


REWRITER = """
import os, sys, time
path, offset, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fd = os.open(path, os.O_WRONLY)
rng = __import__("random").Random(0)
print("writing", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    os.pwrite(fd, os.urandom(4096), offset + rng.randrange(0, size - 4096))
os.close(fd)
"""


def test_a_mapped_file_rewritten_by_another_process_during_an_import(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    original = {f"layer{i}": torch.randn(1 << 20) for i in range(4)}  # 16 MiB
    safetensors_torch.save_file(original, str(path))
    pristine = path.read_bytes()
    header = 8 + int.from_bytes(pristine[:8], "little")
    store = ckptstore.open(str(tmp_path / "s"), **SETTINGS)
    child = subprocess.Popen(
        [sys.executable, "-c", REWRITER, str(path), str(header), str(len(pristine) - header), "60"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "writing"
        with pytest.raises(SourceChanged):
            for _ in range(20):
                store.import_checkpoint(str(path))
    finally:
        child.kill()
        child.wait()
    assert_every_chunk_is_its_id(store)
    path.write_bytes(pristine)
    commit = store.import_checkpoint(str(path), branch="clean")
    model = store.checkout(commit.id)["model"]
    assert all(torch.equal(model[name], t) for name, t in original.items())
    assert store.fsck(read_data=True).ok
