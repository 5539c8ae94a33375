"""Child processes for tests/test_repack.py: ``python tests/repack_child.py MODE URL ARGS``.

``commit URL STEPS``       commits ``state(step)`` for each step on ``main``: even steps
                           raw (``compression_level=None``), odd ones with byte planes and
                           ``delta="on"`` (deltas against the raw chunks repack rewrites)
``checkout URL SECONDS``   checks out ``main`` and its ancestors until told time is up, each
                           compared bit for bit with ``state(step)``
``gc URL SECONDS``         collects with ``KeepLast(3)`` and no grace period, over and over
``repack URL SECONDS``     repacks every reachable commit, over and over
``repack-slow URL``        one repack on one thread, printing ``chunk`` after each chunk and
                           pausing, so that the parent can SIGKILL it mid-run

Every state is a pure function of its step, so any process can check any commit. A failure
prints a line starting ``FAIL`` and exits 1.
"""

from __future__ import annotations

import sys
import time

import torch
from states import assert_same

import ckptstore
from ckptstore.errors import CkptStoreError, CollectorBusy
from ckptstore.layout import commit_key
from ckptstore.retention import KeepLast

CHUNK_SIZE_BYTES = 32 << 10
TENSORS = 3
NUMEL = 48 << 10  # 96 KiB of bf16: three chunks per tensor


def state(step: int) -> dict:
    """bf16 weights that move a little each step (so deltas pay), an fp32 tensor, the step."""
    out: dict = {"step": step}
    for i in range(TENSORS):
        base = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000 + i)) * 0.05
        nudge = torch.randn(NUMEL, generator=torch.Generator().manual_seed(step * 31 + i)) * 1e-4
        out[f"layer{i}.weight"] = (base + step * nudge).to(torch.bfloat16)
    out["head.bias"] = torch.randn(NUMEL // 2, generator=torch.Generator().manual_seed(step))
    return out


def check_commit(store: ckptstore.Store, commit_id: str) -> None:
    """Check out a commit and compare it with its state; raise AssertionError if it differs."""
    step = store.get_commit(commit_id).metadata["step"]
    assert_same(state(step), store.checkout(commit_id), f"commit {commit_id} (step {step})")


def open_store(url: str, **options: object) -> ckptstore.Store:
    return ckptstore.open(url, create=False, chunk_size_bytes=CHUNK_SIZE_BYTES, **options)


def main(mode: str, url: str, *args: str) -> int:
    if mode == "commit":
        raw = open_store(url, compression_level=None)
        packed = open_store(url, compression_level=3, delta="on")
        for step in range(int(args[0])):
            (raw if step % 2 == 0 else packed).commit(state(step), metadata={"step": step}, message=f"step {step}")
        return 0
    deadline = time.monotonic() + float(args[0]) if args else 0.0
    store = open_store(url)
    if mode == "checkout":
        checked = 0
        while time.monotonic() < deadline:
            for back in range(4):
                try:
                    commit_id = store.resolve(f"main~{back}")
                except CkptStoreError:  # no such ancestor (yet), or collected while walked
                    break
                try:
                    check_commit(store, commit_id)
                    checked += 1
                except CkptStoreError as exc:  # a collector deletes a commit object before what it needs
                    if store.objects.exists(commit_key(commit_id)):
                        print(f"FAIL commit {commit_id} is stored but did not check out: {exc}", flush=True)
                        return 1
                    break
        print(f"checked {checked}", flush=True)
        return 0
    if mode == "gc":
        runs = 0
        while time.monotonic() < deadline:
            try:
                store.gc(KeepLast(3), grace_period_s=0)
                runs += 1
            except CollectorBusy:
                pass
            time.sleep(0.2)
        print(f"collected {runs}", flush=True)
        return 0
    if mode == "repack":
        rewritten = 0
        while time.monotonic() < deadline:
            rewritten += store.repack(threads=2).rewritten_chunks
        print(f"rewrote {rewritten}", flush=True)
        return 0
    if mode == "repack-slow":

        def progress(phase: str, done: int, total: int) -> None:
            print("chunk", flush=True)
            time.sleep(0.05)

        store.repack(threads=1, progress=progress)
        print("done", flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    try:
        sys.exit(main(*sys.argv[1:]))
    except AssertionError as exc:
        print(f"FAIL {exc}", flush=True)
        sys.exit(1)
