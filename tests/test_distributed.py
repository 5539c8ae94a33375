"""torch.distributed: dcp.save into a store on 4 ranks, dcp.load on 2 and on 1 (resharded),
replicated tensors stored once; the same with ckptstore's own multi-rank commit."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptstore
import ckptstore.integrations.distributed
from ckptstore.integrations.distributed import StoreReader, StoreWriter
from tests.dist_worker import reference

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"result-{args[0]}-{nproc}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        str(WORKER),
        args[0],
        args[1],
        str(out),
        *args[2:],
    ]
    done = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    url = str(tmp / "store")
    results = _torchrun(4, "save", url, tmp_path=tmp)
    return url, results, tmp


def test_dcp_save_on_4_ranks_loads_on_2_and_on_1(saved):
    url, results, tmp = saved
    dcp_commit = results[0]["dcp_commit"]
    assert [r.get("dcp_commit") for r in results[1:]] == [None, None, None]  # the coordinator commits
    loaded = _torchrun(2, "load", url, dcp_commit, tmp_path=tmp)
    assert all(r["equal"] for r in loaded)
    # One process, no process group: plain tensors, whole.
    ref = reference()
    state = {"model": {k: torch.zeros_like(v) for k, v in ref.items()}, "step": 0}
    dcp.load(state, storage_reader=StoreReader(ckptstore.open(url, create=False), dcp_commit))
    assert all(torch.equal(state["model"][k], ref[k]) for k in ref) and state["step"] == 7


def test_ranks_that_resolve_the_revision_to_different_commits_refuse_the_load(saved):
    """Each rank resolves the revision itself; if a commit lands on the branch in between,
    they would restore two checkpoints. Two ranks given two commits stand for that race: the
    coordinator refuses the load on every rank."""
    url, results, tmp = saved
    store = ckptstore.open(url, create=False)
    ref = reference()
    again = StoreWriter(store, branch="again", message="the same state, saved in one process")
    dcp.save({"model": ref, "step": 7}, storage_writer=again)
    loaded = _torchrun(2, "load", url, f"{results[0]['dcp_commit']},{again.commit.id}", tmp_path=tmp)
    for r in loaded:
        assert "equal" not in r and "changed concurrently" in r["error"], r

    assert all(r["equal"] for r in _torchrun(2, "load", url, f"{again.commit.id},{again.commit.id}", tmp_path=tmp))


def test_replicated_tensors_are_stored_once(saved):
    url, results, _ = saved
    store = ckptstore.open(url, create=False)
    ref = reference()
    dcp_commit = store.get_commit(results[0]["dcp_commit"])
    data_bytes = sum(t.numel() * t.element_size() for t in ref.values())  # each tensor once
    # The replicated tensor (16 KiB) sits on 4 ranks; the commit stored it once.
    assert dcp_commit.stats.new_bytes < data_bytes + 8192  # + framing, manifest, tree
    multi = store.get_commit(results[0]["multi_commit"])
    assert all(r["multi_commit"] == multi.id for r in results)
    state = store.checkout(multi.id)
    assert sorted(state) == [0, 1, 2, 3]
    for rank in range(4):
        assert torch.equal(state[rank]["local"], torch.full((512,), float(rank)))
        assert torch.equal(state[rank]["replicated"], ref["r"]) and state[rank]["rank"] == rank
    # Logical: 4 replicated copies + 4 locals. Stored: the replicated bytes were already there.
    assert multi.stats.logical_bytes > 4 * 16384
    assert multi.stats.new_bytes < 4 * 2048 + 8192
    usage = store.du()
    chunk_raw = usage.unique_raw_bytes
    assert chunk_raw <= data_bytes + 4 * 2048  # every distinct byte once
    assert store.fsck(read_data=True).ok


def test_dcp_async_save_into_a_store(tmp_path):
    """dcp.async_save stages the state, then writes through the StoreWriter in the background."""
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=1024, inline_threshold_bytes=128)
    state = {"w": torch.randn(100, 10), "n": 3}
    before = state["w"].clone()
    writer = ckptstore.integrations.distributed.StoreWriter(store, message="async")
    future = dcp.async_save(state, storage_writer=writer)
    state["w"].add_(1)  # training goes on
    future.result()
    out = {"w": torch.zeros(100, 10), "n": 0}
    dcp.load(out, storage_reader=StoreReader(store, "latest"))
    assert torch.equal(out["w"], before) and out["n"] == 3
    assert writer.commit is not None and store.tags()["latest"] == writer.commit.id


def test_the_store_methods_a_rank_writes_through(tmp_path):
    """What the DCP writer and reader use instead of the store's internals: writer markers
    (held, seen by key, removed by another process), the branch head, option checks, blob reads."""
    from ckptstore.errors import InvalidOption, InvalidRefName
    from ckptstore.manifest import build_tensor

    store = ckptstore.open(str(tmp_path / "store"))
    marker = store.hold_writer_marker()
    assert store.writer_marker_exists(marker.key)
    marker.check()  # fresh
    store.remove_writer_marker(marker.key)
    store.remove_writer_marker(marker.key)  # idempotent
    assert not store.writer_marker_exists(marker.key)
    marker.release()  # idempotent too, after another process removed it
    for key in ("refs/heads/main", "locks/gc", "locks/writers/../config", 7):
        with pytest.raises(InvalidOption):
            store.remove_writer_marker(key)  # type: ignore[arg-type]
    with pytest.raises(InvalidOption):
        store.check_write_options(delta="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidOption):
        store.check_write_options(compression="maybe")  # type: ignore[arg-type]
    store.check_write_options(delta="on", compression="never")

    assert store.branch_head("main") is None
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    commit = store.commit({"w": w})
    assert store.branch_head("main") == commit.id
    with pytest.raises(InvalidRefName):
        store.branch_head("../x")
    manifest = store.manifest_of(commit)
    for given in (None, manifest):
        buffers = store.read_blobs(commit, [manifest.tensors[0].blob], manifest=given)
        assert torch.equal(build_tensor(manifest.tensors[0], buffers[manifest.tensors[0].blob]), w)
    assert commit.manifest in store.manifest_key_of(commit)
