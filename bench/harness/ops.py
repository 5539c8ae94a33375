"""One timed operation on a ``{"model", "optimizer"}`` state, in the child process that runs
it: a peer's durable save or full load (``torch.save``, safetensors, DCP), or a ckptstore
commit, checkout or repack. Its input is prepared before the timer (the source state loaded
from a plain ``torch.save`` file, the store opened), its output checked after it.

Imports torch: child processes only."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .files import fsync_with_directory
from .measure import Measure
from .state import (
    empty_like_state,
    flatten_for_safetensors,
    get_path,
    states_equal,
    tie_preserved,
    touch_every_page,
)

#: Operations that read the source state first, and write it.
WRITE_OPS = frozenset({"torch_save", "st_save", "dcp_save", "ckpt_commit", "ckpt_recommit_same", "ckpt_recommit_1pct"})
#: Commits: their result carries the commit's stats and the store's configuration.
COMMIT_OPS = frozenset({"ckpt_commit", "ckpt_recommit_same", "ckpt_recommit_1pct"})
#: Full reads, which ``verify`` compares with the source state.
READ_OPS = frozenset({"torch_load", "st_load", "st_load_pread", "st_load_touched", "dcp_load", "ckpt_checkout", "ckpt_checkout_first"})


def store_options(args: Any, threads: int | None = None) -> dict:
    """``ckptstore.open`` keywords from the store options of :func:`harness.cli.add_store_options`
    (those not given keep the store's defaults); ``threads`` overrides ``--threads``."""
    kw: dict[str, Any] = {}
    if args.chunk_size_mb is not None:
        kw["chunk_size_bytes"] = int(args.chunk_size_mb * (1 << 20))
    if args.compression_level is not None:
        kw["compression_level"] = None if args.compression_level == "none" else int(args.compression_level)
    if getattr(args, "compression", None) is not None:
        kw["compression"] = args.compression
    t = threads if threads is not None else args.threads
    if t is not None:
        kw["threads"] = t
    return kw


def commit_stats(commit: Any) -> dict:
    s = commit.stats
    return {"logical_bytes": s.logical_bytes, "new_bytes": s.new_bytes, "new_chunks": s.new_chunks,
            "reused_chunks": s.reused_chunks, "reused_bytes": s.reused_bytes, "dedup_ratio": s.dedup_ratio}  # fmt: skip


class Operation:
    """``op`` with its input prepared (untimed); calling it runs the operation once.
    ``changed``/``change``: the tensor paths a ``ckpt_recommit_1pct`` changes, and how."""

    def __init__(self, op: str, *, source: str, target: str, options: dict, changed: Sequence = (), change: Callable | None = None) -> None:
        import safetensors.torch

        import ckptstore

        self.op, self.target, self.result = op, target, {}
        self.sft = safetensors.torch
        self.state = torch.load(source, weights_only=True) if op in WRITE_OPS else None
        if op == "ckpt_recommit_1pct":
            with torch.no_grad():
                for p in changed:
                    change(get_path(self.state, p))
        self.flat, self.meta = flatten_for_safetensors(self.state) if op == "st_save" else (None, None)
        if op.startswith("dcp_"):
            import warnings

            import torch.distributed.checkpoint as dcp

            self.dcp = dcp
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # DCP without a process group
        self.dcp_target = empty_like_state(torch.load(source, weights_only=True, mmap=True)) if op == "dcp_load" else None
        self.store = None
        if op.startswith("ckpt_"):
            t0 = time.perf_counter()
            self.store = ckptstore.open(target, **options)
            self.result["open_s"] = time.perf_counter() - t0

    def __call__(self) -> Any:
        op, target, sft = self.op, self.target, self.sft
        if op == "torch_save":
            torch.save(self.state, target)
            fsync_with_directory(target)
            return None
        if op == "torch_load":
            return torch.load(target, weights_only=True, map_location="cpu")
        if op == "st_save":
            sft.save_file(self.flat, target, metadata=self.meta)
            fsync_with_directory(target)
            return None
        if op == "st_load":
            return sft.load_file(target, device="cpu")  # default backend: mmap, bytes read lazily
        if op == "st_load_pread":
            return sft.load_file(target, device="cpu", backend="pread")  # every byte read into memory, as torch.load
        if op == "st_load_touched":
            return touch_every_page(sft.load_file(target, device="cpu"))  # mmap, every page faulted in
        if op == "dcp_save":
            self.dcp.save(self.state, storage_writer=self.dcp.FileSystemWriter(target, thread_count=2, sync_files=True))
            fsync_with_directory(target)  # DCP fsyncs its files but not the directory after the rename
            return None
        if op == "dcp_load":
            self.dcp.load(self.dcp_target, storage_reader=self.dcp.FileSystemReader(target))
            return self.dcp_target
        if op in COMMIT_OPS:
            return self.store.commit(self.state, message=op)
        if op == "ckpt_checkout":
            return self.store.checkout("latest")
        if op == "ckpt_checkout_first":  # the first commit (the source state), after the 1% re-commit
            return self.store.checkout("main~1")
        if op == "ckpt_repack":
            return self.store.repack()
        raise SystemExit(f"unknown op {op}")


def _stored_raw_chunks(store: Any) -> int:
    from ckptstore.codec import HEADER_SIZE, Codec

    return sum(1 for key in store.objects.list("chunks/") if store.objects.get_range(key, 0, HEADER_SIZE)[6] == Codec.RAW)


def _describe_output(operation: Operation, out: Any, *, count_raw_chunks: bool) -> dict:
    """What the operation's output says: a commit's stats and the store's configuration, a
    repack's counts."""
    result: dict[str, Any] = {}
    store = operation.store
    if operation.op == "ckpt_repack":
        result["repack"] = {
            "rewritten_chunks": out.rewritten_chunks,
            "chunks": out.chunks,
            "stored_bytes_before": out.stored_bytes_before,
            "stored_bytes_after": out.stored_bytes_after,
        }
    if operation.op in COMMIT_OPS:
        result["stats"] = commit_stats(out)
        result["store_threads"] = store.pipeline.threads
        result["store_config"] = {
            "chunk_size_bytes": store.config.chunk_size_bytes,
            "compression_level": store.config.compression_level,
            "compression": store.config.compression,
        }
        if count_raw_chunks:
            result["stored_raw_chunks"] = _stored_raw_chunks(store)
    return result


def _verify(op: str, out: Any, source: str) -> dict:
    """Compare a full read with the source state; SystemExit where they differ."""
    result: dict[str, Any] = {}
    ref = torch.load(source, weights_only=True)
    if op.startswith("st_load"):
        flat_ref, _ = flatten_for_safetensors(ref)
        ok = flat_ref.keys() == out.keys() and all(torch.equal(flat_ref[k], out[k]) for k in flat_ref)
    else:
        ok = states_equal(ref, out)
        result["tied_preserved"] = tie_preserved(out)
    result["verified"] = bool(ok)
    if not ok:
        raise SystemExit(f"{op}: loaded state differs from the source state")
    return result


def run_op(op: str, *, source: str, target: str, options: dict, verify: bool = False, profile: str | None = None,
           changed: Sequence = (), change: Callable | None = None, count_raw_chunks: bool = False) -> dict:  # fmt: skip
    """Prepare ``op``, time it (:class:`~harness.measure.Measure`), describe and (``verify``)
    check its output; the child's result."""
    operation = Operation(op, source=source, target=target, options=options, changed=changed, change=change)
    with Measure(profile=profile) as m:
        out = operation()
    result: dict[str, Any] = {"op": op, **operation.result, **m.result(), "torch_threads": torch.get_num_threads()}
    result.update(_describe_output(operation, out, count_raw_chunks=count_raw_chunks))
    if verify and out is not None and op in READ_OPS:
        result.update(_verify(op, out, source))
    return result
