"""Asynchronous commits: the call returns once the state is copied; the commit holds the
values from before any change the caller makes afterwards."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch

import ckptstore
from tests.states import TinyNet, trained


def _snapshot(state):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}


def test_mutating_every_tensor_after_the_call_does_not_reach_the_commit(store_url):
    url, options = store_url
    store = ckptstore.open(url, storage_options=options, chunk_size_bytes=4096, inline_threshold_bytes=256)
    torch.manual_seed(0)
    base = torch.randn(64, 64)
    state = {
        "big": torch.randn(20_000),
        "view": base[:, 3:40],  # a non-contiguous view (copied while encoding)
        "shared_a": base,  # shares storage with the view
        "small": torch.arange(10.0),  # inline in the manifest
        "bf16": torch.randn(5000).to(torch.bfloat16),
        "array": np.arange(3000, dtype=np.float32),
        "step": 7,
    }
    expected = _snapshot(state)
    future = store.commit(state, blocking=False, metadata={"step": 7})
    assert isinstance(future, Future)
    for value in state.values():  # training goes on and changes everything in place
        if isinstance(value, torch.Tensor):
            value.add_(1)
        elif isinstance(value, np.ndarray):
            value += 1
    commit = future.result(timeout=60)
    assert isinstance(commit, ckptstore.Commit)
    out = store.checkout(commit.id)
    for key in ("big", "view", "shared_a", "small", "bf16"):
        assert torch.equal(out[key], expected[key]), key
    assert np.array_equal(out["array"], expected["array"])
    assert out["view"].untyped_storage().data_ptr() == out["shared_a"].untyped_storage().data_ptr()
    assert store.tags()["latest"] == commit.id and commit.metadata == {"step": 7}
    store.close()


def test_async_commits_of_a_training_run_keep_each_step():
    store = ckptstore.open("memory://async-run", chunk_size_bytes=4096, inline_threshold_bytes=256)
    model, opt, _ = trained(seed=1, steps=2)
    futures, expected = [], []
    for step in range(4):
        futures.append(store.commit({"model": model, "optimizer": opt, "step": step}, blocking=False, metrics={"eval_loss": 4.0 - step}))
        expected.append({"model": {k: v.clone() for k, v in model.state_dict().items()}})  # noqa: C416
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5).add_(0.25)  # every parameter changes right after the call
    commits = [f.result(timeout=60) for f in futures]
    assert [c.id for c in store.log()] == [c.id for c in reversed(commits)]  # in order, one chain
    for commit, want in zip(commits, expected):
        got = store.checkout(commit.id)["model"]
        assert list(got) == list(want["model"]) and all(torch.equal(got[k], want["model"][k]) for k in got)
    assert store.tags()["best"] == commits[-1].id
    store.close()


def test_a_second_async_commit_waits_for_the_first():
    store = ckptstore.open("memory://async-backpressure", chunk_size_bytes=4096)
    gate = threading.Event()
    original = store.pipeline.write_blobs

    def slow_write(*args, **kwargs):
        gate.wait(30)
        return original(*args, **kwargs)

    store.pipeline.write_blobs = slow_write
    first = store.commit({"w": torch.randn(50_000)}, blocking=False)
    second_started = threading.Event()
    second: list[Future] = []

    def commit_again() -> None:
        second.append(store.commit({"w": torch.randn(50_000)}, blocking=False))
        second_started.set()

    t = threading.Thread(target=commit_again)
    t.start()
    assert not second_started.wait(0.5)  # held back: one snapshot in memory at a time
    gate.set()
    t.join(30)
    assert second_started.is_set()
    assert second[0].result(timeout=30).parents == (first.result().id,)
    store.close()


def test_errors_surface_from_the_call_or_the_future():
    store = ckptstore.open("memory://async-errors")
    with pytest.raises(ckptstore.UnsupportedValue, match="bad"):
        store.commit({"bad": object()}, blocking=False)  # refused before anything is staged
    store.pipeline.write_blobs = lambda *a, **k: (_ for _ in ()).throw(OSError("disk on fire"))
    future = store.commit({"w": torch.randn(50_000)}, blocking=False)
    with pytest.raises(OSError, match="disk on fire"):
        future.result(timeout=30)
    assert "main" not in store.branches()  # nothing became visible
    store.close()


def test_close_waits_for_pending_async_commits(tmp_path):
    store = ckptstore.open(str(tmp_path / "s"))
    future = store.commit({"model": TinyNet()}, blocking=False)
    store.close()
    assert future.done() and future.exception() is None
    with ckptstore.open(str(tmp_path / "s")) as reopened:
        assert reopened.branches()["main"] == future.result().id
